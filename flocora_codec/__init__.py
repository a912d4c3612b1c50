"""flocora_codec: compact, checksummed wire messages for federated learning."""

import torch  # noqa: F401  (loads libc10/libtorch before the extension)

__version__ = "0.1.0"

# Loads the compiled kernels (torch.ops.flocora), or warns once and falls back
# to the pure-PyTorch reference when they cannot be loaded (see ops.BACKEND).
from flocora_codec import ops as _ops  # noqa: F401  imported for its side effect
from flocora_codec.codec import (
    ErrorFeedback,
    MessageInfo,
    TensorInfo,
    decode,
    decode_into,
    decode_numpy,
    encode,
    encode_numpy,
    message_info,
)
from flocora_codec.errors import (
    ChecksumError,
    CodecError,
    ExpectationError,
    FormatError,
    LimitError,
    UnknownSchemaError,
    UnsupportedVersionError,
)
from flocora_codec.format import DecodeLimits
from flocora_codec.memory import reuse_freed_memory
from flocora_codec.schema import Schema, SchemaRegistry
from flocora_codec.spec import CodecSpec, Rule

__all__ = [
    "__version__",
    "CodecSpec",
    "Rule",
    "encode",
    "decode",
    "decode_into",
    "encode_numpy",
    "decode_numpy",
    "message_info",
    "MessageInfo",
    "TensorInfo",
    "ErrorFeedback",
    "DecodeLimits",
    "CodecError",
    "FormatError",
    "ChecksumError",
    "UnsupportedVersionError",
    "LimitError",
    "ExpectationError",
    "UnknownSchemaError",
    "Schema",
    "SchemaRegistry",
    "reuse_freed_memory",
]
