"""flocora_codec: compact, checksummed wire messages for federated learning."""
import torch  # noqa: F401  (loads libc10/libtorch before the extension)

from flocora_codec import _C  # noqa: F401  registers torch.ops.flocora
