"""``flocora-codec``: inspect, encode and decode wire messages from the shell.

Also runnable as ``python -m flocora_codec``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

EXIT_OK, EXIT_BAD_MESSAGE, EXIT_USAGE, EXIT_IO = 0, 1, 2, 3

_EXIT_STATUS = """\
exit status:
  0  success (also --help and --version)
  1  the message is invalid (malformed, corrupted, unsupported version, or
     over a decode limit); the reason is printed on stderr
  2  usage error (unknown option, invalid codec parameter, output format
     that cannot be inferred)
  3  input/output error (file missing, unreadable or unwritable, not a
     .safetensors/.npz file, array that cannot be encoded, the safetensors
     package missing for a .safetensors file)
"""

_DESCRIPTION = """\
Inspect, encode and decode flocora-codec messages: compact, checksummed
wire messages of named tensors (LoRA adapters, model updates) for federated
learning. The byte format is specified in docs/FORMAT.md (message versions
1, 2 and 3, and schemas).

commands:
  inspect MSG            print the tensor table (name, dtype, shape, codec and
                         its parameters, bytes by part) after verifying the
                         whole message (CRC32C, every header field, every
                         section); exit 1 with the reason if it is invalid
  encode IN -o MSG       compress the tensors of a .safetensors or .npz file
                         into one message
  decode MSG -o OUT      rebuild the tensors of a message into a .safetensors
                         (every dtype kept) or .npz file (bfloat16 as float32)

A file argument of "-" is standard input or output (messages and tensor files
are binary; the format of a tensor file on standard output comes from
--format).

Run "flocora-codec COMMAND --help" for the options of each command.
"""

_EPILOG = (
    """\
examples:
  flocora-codec encode update.npz -o update.flc --bits 4 --granularity row
  flocora-codec encode update.npz -o update.flc --bits 2 --granularity group \\
      --group-size 64 --meta-dtype float16 --rounding stochastic --seed 7
  flocora-codec encode update.npz -o update.flc --density 0.01 --values float16
  flocora-codec encode update.npz -o update.flc --raw
  flocora-codec inspect update.flc
  flocora-codec inspect --json update.flc
  flocora-codec decode update.flc -o restored.npz
  flocora-codec encode adapter_model.safetensors -o adapter.flc --bits 4
  flocora-codec decode adapter.flc -o adapter_restored.safetensors
  cat adapter_model.safetensors | flocora-codec encode - -o - | flocora-codec decode - -o out.safetensors

"""
    + _EXIT_STATUS
)


def _bits(text: str):
    if text.lower() in ("none", "raw", "0"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 1..8 or 'none', got {text!r}") from None


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flocora-codec",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action=_VersionAction, help="print the version, torch's and the ops backend, and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    ins = sub.add_parser(
        "inspect",
        help="print a message's tensor table and verify it",
        description="Verify a message (CRC32C, every header field, every section) and print its\n"
        "tensor table: name, dtype, shape, codec and parameters, kept elements and\n"
        "index code of sparse tensors, and bytes by part.",
        epilog="examples:\n  flocora-codec inspect update.flc\n"
        "  flocora-codec inspect --json update.flc | jq .bytes\n\n" + _EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ins.add_argument("message", metavar="MSG", help='message or schema file ("-": standard input)')
    ins.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    ins.add_argument(
        "--schema", metavar="FILE", action="append", default=[], help="schema file of a compact message (repeatable)"
    )

    bench = sub.add_parser(
        "bench",
        help="measure encode/decode throughput on this CPU against copy/read bandwidth and peers",
        description="CPU benchmark: encode and decode against copy_ and x.sum() bandwidth and the\n"
        "fastest plain-PyTorch formulations (torch.compile), small tensors, a whole\n"
        "adapter-set message. Prints the table and writes it with a plot under --out.",
        epilog="examples:\n  flocora-codec bench\n  flocora-codec bench --full --out results/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from flocora_codec import bench as _bench

    _bench.add_arguments(bench)

    enc = sub.add_parser(
        "encode",
        help="compress the tensors of a .safetensors or .npz file into a message",
        description="Compress every tensor of IN (.safetensors or .npz; the format comes from the\n"
        "suffix or the content) into one message. Non-float tensors travel raw; by\n"
        "default 0-d and 1-d tensors (norms, biases) do too. Names, shapes and dtypes\n"
        "(bfloat16 and float16 included) are kept.",
        epilog="examples:\n  flocora-codec encode update.npz -o update.flc --bits 4 --granularity row\n"
        "  flocora-codec encode update.npz -o update.flc --density 0.01 --values quantized --bits 8\n\n" + _EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    enc.add_argument("input", metavar="IN", help='.safetensors or .npz file of named tensors ("-": standard input)')
    enc.add_argument(
        "-o", "--output", metavar="MSG", required=True, help='message file to write ("-": standard output)'
    )
    enc.add_argument(
        "--schema",
        metavar="FILE",
        default=None,
        help="write a compact message (format v3) against this schema file; it is created "
        "from the tensors and the codec parameters if it does not exist",
    )
    g = enc.add_argument_group("codec parameters (see CodecSpec)")
    g.add_argument("--raw", action="store_true", help="no compression at all (overrides everything below)")
    g.add_argument(
        "--bits", type=_bits, default=4, metavar="B", help="affine quantization width 1..8, or 'none' (default: 4)"
    )
    g.add_argument(
        "--granularity",
        choices=("tensor", "row", "group"),
        default="row",
        help="one scale/offset per tensor, per row (dim 0) or per group (default: row)",
    )
    g.add_argument(
        "--group-size",
        type=int,
        default=64,
        metavar="N",
        help="group length for --granularity group, a power of two >= 8 (default: 64)",
    )
    g.add_argument(
        "--rounding",
        choices=("nearest", "stochastic"),
        default="nearest",
        help="rounding of the codes (default: nearest)",
    )
    g.add_argument("--seed", type=int, default=0, help="stochastic rounding seed (default: 0)")
    g.add_argument(
        "--meta-dtype",
        choices=("float32", "float16"),
        default="float32",
        help="dtype of scales and offsets (default: float32)",
    )
    g.add_argument(
        "--density", type=float, default=None, metavar="D", help="top-k: keep this fraction (0, 1] of the elements"
    )
    g.add_argument("--k", type=int, default=None, metavar="K", help="top-k: keep this many elements")
    g.add_argument(
        "--topk-scope",
        choices=("tensor", "global"),
        default="tensor",
        help="select k per tensor or over all sparse tensors (default: tensor)",
    )
    g.add_argument(
        "--values",
        choices=("float32", "float16", "bfloat16", "quantized"),
        default="float32",
        help="encoding of the kept top-k values (default: float32)",
    )
    g.add_argument(
        "--keep-1d-raw",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send 0-d and 1-d arrays raw (default: yes)",
    )

    dec = sub.add_parser(
        "decode",
        help="rebuild the tensors of a message into a .safetensors or .npz file",
        description="Verify and decode a message, writing its tensors (original names, shapes and\n"
        "dtypes) to a .safetensors file, or to an uncompressed .npz archive (bfloat16\n"
        "as float32: numpy has no bfloat16). Nothing is written if the message is\n"
        "invalid.",
        epilog="examples:\n  flocora-codec decode update.flc -o restored.npz\n"
        "  flocora-codec decode adapter.flc -o adapter_model.safetensors\n"
        "  flocora-codec decode - -o - --format safetensors < adapter.flc > out.safetensors\n\n" + _EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dec.add_argument("message", metavar="MSG", help='message file ("-": standard input)')
    dec.add_argument(
        "-o",
        "--output",
        metavar="OUT",
        required=True,
        help='.safetensors or .npz file to write ("-": standard output, needs --format)',
    )
    dec.add_argument(
        "--format", choices=("safetensors", "npz"), default=None, help="format of OUT (default: from its suffix)"
    )
    dec.add_argument(
        "--schema", metavar="FILE", action="append", default=[], help="schema file of a compact message (repeatable)"
    )
    return p


class _VersionAction(argparse.Action):
    """``--version``: imports the package only when asked (torch is slow to load)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        import torch

        import flocora_codec as fc

        print(f"flocora-codec {fc.__version__} (torch {torch.__version__}, {fc.ops.BACKEND} ops)")
        parser.exit(EXIT_OK)


def _spec_from(args):
    from flocora_codec.spec import CONFIG_KEYS, CodecSpec

    # the options are named after CONFIG_KEYS (--group-size -> group_size)
    return CodecSpec.from_dict({k: getattr(args, k) for k in CONFIG_KEYS})


def _read(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    with open(path, "rb") as f:
        return f.read()


def _write(path: str, data: bytes) -> None:
    if path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    with open(path, "wb") as f:
        f.write(data)


def _name(path: str) -> str:
    return "<stdin>" if path == "-" else path


def _fmt_bytes(n: int) -> str:
    return f"{n:,}"


def _schemas(paths) -> list:
    import flocora_codec as fc

    return [fc.Schema.from_bytes(_read(p)) for p in paths]


def _inspect_schema(args, data: bytes) -> int:
    import flocora_codec as fc
    from flocora_codec import format as fmt

    schema = fc.Schema.from_bytes(data)
    records, entries = schema.parsed.records, schema.parsed.entries
    if args.json:
        print(json.dumps({"file": _name(args.message), "kind": "schema", "schema_id": schema.id.hex(),
                          "bytes": len(data), "tensors": [
                              {"name": e.name, "dtype": str(e.dtype)[6:], "shape": list(e.shape),
                               "codec": fmt.CODEC_NAMES[records[e.codec_index].codec],
                               "params": records[e.codec_index].describe()} for e in entries]}, indent=2))  # fmt: skip
        return EXIT_OK
    print(f"{_name(args.message)}: flocora-codec schema {schema.id.hex()}, {_fmt_bytes(len(data))} bytes, "
          f"{len(entries)} tensors, {len(records)} codec records, CRC32C ok")  # fmt: skip
    table = [("name", "dtype", "shape", "codec")]
    for e in entries:
        table.append((e.name, str(e.dtype)[6:], "x".join(map(str, e.shape)) or "()",
                      records[e.codec_index].describe()))  # fmt: skip
    widths = [max(len(r[c]) for r in table) for c in range(4)]
    for r in table:
        print("  " + "  ".join(r[c].ljust(widths[c]) for c in range(4)).rstrip())
    return EXIT_OK


def _inspect(args) -> int:
    import flocora_codec as fc
    from flocora_codec import format as fmt

    data = _read(args.message)
    if data[:4] == fmt.SCHEMA_MAGIC:
        return _inspect_schema(args, data)
    schemas = _schemas(args.schema)
    sid = fmt.compact_schema_id(data)
    if sid is not None and sid not in {s.id for s in schemas}:
        print(f"{_name(args.message)}: compact flocora-codec message (format v3), {_fmt_bytes(len(data))} bytes, "
              f"schema {sid.hex()}: pass its schema file with --schema to see and verify its tensors",
              file=sys.stderr)  # fmt: skip
    info = fc.message_info(data, schemas=schemas)
    args.message = _name(args.message)
    fc.decode(data, schemas=schemas)  # section contents (index codes, padding, metadata) are checked here
    rows = info.tensors
    if args.json:
        doc = {
            "file": args.message,
            "version": info.version,
            "schema_id": info.schema_id.hex() if info.schema_id else None,
            "valid": True,
            "bytes": {
                "total": info.total_bytes, "header": info.header_bytes, "metadata": info.metadata_bytes,
                "index": info.index_bytes, "payload": info.payload_bytes, "checksum": info.checksum_bytes,
            },
            "tensors": [
                {
                    "name": t.name, "dtype": str(t.dtype)[6:], "shape": list(t.shape), "codec": t.codec,
                    "params": t.params, "bits": t.bits, "granularity": t.granularity, "group_size": t.group_size,
                    "rounding": t.rounding, "meta_dtype": t.meta_dtype, "values": t.values,
                    "topk_scope": t.topk_scope, "count": t.count, "index_code": t.index_code,
                    "metadata_bytes": t.metadata_bytes, "index_bytes": t.index_bytes,
                    "payload_bytes": t.payload_bytes,
                }
                for t in rows
            ],
        }  # fmt: skip
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    raw = sum(t.numel * t.dtype.itemsize for t in rows)
    kind = f"compact message against schema {info.schema_id.hex()}" if info.schema_id else "message"
    print(f"{args.message}: flocora-codec {kind}, format v{info.version}, {_fmt_bytes(info.total_bytes)} bytes, "
          f"{len(rows)} tensors, {info.n_codecs} codec records, CRC32C ok")  # fmt: skip
    ratio = f"{raw / info.total_bytes:.2f}x" if info.total_bytes else "-"
    print(f"  header {_fmt_bytes(info.header_bytes)} | metadata {_fmt_bytes(info.metadata_bytes)} | "
          f"index {_fmt_bytes(info.index_bytes)} | payload {_fmt_bytes(info.payload_bytes)} | "
          f"checksum {info.checksum_bytes}   (uncompressed {_fmt_bytes(raw)}, ratio {ratio})")  # fmt: skip
    table = [("name", "dtype", "shape", "codec", "kept", "metadata", "index", "payload")]
    for t in rows:
        kept = f"{t.count}/{t.numel} ({t.index_code})" if t.count is not None else ""
        table.append((t.name, str(t.dtype)[6:], "x".join(map(str, t.shape)) or "()", t.params, kept,
                      str(t.metadata_bytes), str(t.index_bytes), str(t.payload_bytes)))  # fmt: skip
    widths = [max(len(r[c]) for r in table) for c in range(len(table[0]))]
    for r in table:
        cells = [r[c].ljust(widths[c]) if c < 5 else r[c].rjust(widths[c]) for c in range(len(r))]
        print("  " + "  ".join(cells).rstrip())
    return EXIT_OK


def _encode(args) -> int:
    import flocora_codec as fc
    from flocora_codec import files

    try:
        spec = _spec_from(args)
    except ValueError as exc:
        print(f"flocora-codec encode: {exc}", file=sys.stderr)
        return EXIT_USAGE
    raw_in = _read(args.input)
    fmt = files.format_of(args.input, raw_in)
    if fmt is None:
        print(f"flocora-codec encode: {_name(args.input)} is neither a .safetensors nor an .npz file", file=sys.stderr)
        return EXIT_IO
    try:
        tensors = files.tensors_from_bytes(raw_in, fmt)
    except Exception as exc:  # noqa: BLE001  each reader has its own errors (zip, safetensors' Rust errors)
        if isinstance(exc, files.MissingDependencyError):
            print(f"flocora-codec encode: {exc}", file=sys.stderr)
        else:
            print(f"flocora-codec encode: cannot read {_name(args.input)} as .{fmt}: {exc}", file=sys.stderr)
        return EXIT_IO
    schema = None
    try:
        if args.schema is not None:
            if os.path.exists(args.schema):
                schema = fc.Schema.from_bytes(_read(args.schema))
            else:
                schema = fc.Schema.build(tensors, spec)
                _write(args.schema, schema.to_bytes())
        data = fc.encode(tensors, spec, schema=schema)
    except (TypeError, ValueError) as exc:
        print(f"flocora-codec encode: {exc}", file=sys.stderr)
        return EXIT_IO
    _write(args.output, data)
    raw = sum(t.numel() * t.element_size() for t in tensors.values())
    ratio = f", {raw / len(data):.2f}x smaller than raw" if raw else ""
    print(f"{_name(args.output) if args.output != '-' else '<stdout>'}: {len(tensors)} tensors, "
          f"{len(data):,} bytes{ratio}", file=sys.stderr)  # fmt: skip
    return EXIT_OK


def _decode(args) -> int:
    import flocora_codec as fc
    from flocora_codec import files

    fmt = args.format or files.format_of(args.output)
    if fmt is None:
        print(f"flocora-codec decode: cannot tell the format of {args.output!r}: name it .safetensors or .npz, "
              "or pass --format", file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    tensors = fc.decode(_read(args.message), schemas=_schemas(args.schema))
    try:
        data = files.tensors_to_bytes(tensors, fmt)
    except files.MissingDependencyError as exc:
        print(f"flocora-codec decode: {exc}", file=sys.stderr)
        return EXIT_IO
    _write(args.output, data)
    where = "<stdout>" if args.output == "-" else args.output
    print(f"{where}: {len(tensors)} tensors ({fmt})", file=sys.stderr)
    return EXIT_OK


def _bench_cmd(args) -> int:
    from flocora_codec import bench

    bench.run(args.full, args.out, args.repeats, args.skip_huge, not args.no_plot, args.isa)
    return EXIT_OK


def main(argv=None) -> int:
    """Entry point of ``flocora-codec``.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name (default ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status: 0 success, 1 invalid message, 2 usage error, 3 I/O error.
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    from flocora_codec.errors import CodecError

    try:
        return {"inspect": _inspect, "encode": _encode, "decode": _decode, "bench": _bench_cmd}[args.command](args)
    except CodecError as exc:
        print(f"flocora-codec {args.command}: invalid message: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_BAD_MESSAGE
    except OSError as exc:
        print(f"flocora-codec {args.command}: {exc}", file=sys.stderr)
        return EXIT_IO


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
