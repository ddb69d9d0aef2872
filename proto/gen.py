#!/usr/bin/env python3
"""Regenerate the Python gRPC code for proto/eyas/v1/*.proto into eyas/serve/v1/.

Usage: python proto/gen.py [--out DIR]   (default DIR: eyas/serve/v1 next to this folder)

protoc names modules after the .proto path (`eyas.v1.generate_pb2`); the code lives in the
package `eyas.serve.v1`, so the module references are rewritten after generation. The .proto
file name inside the descriptor stays `eyas/v1/generate.proto`, which is what reflection shows.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO = PROTO_ROOT.parent
DEFAULT_OUT = REPO / "eyas" / "serve" / "v1"
PROTO_PACKAGE = "eyas.v1"     # the proto package = protoc's module path
PYTHON_PACKAGE = "eyas.serve.v1"  # where the generated modules live
PROTOS = ("eyas/v1/generate.proto", "eyas/v1/worker.proto")


def _rewrite(text: str) -> str:
    """Point protoc's module names (not the proto names, e.g. 'eyas.v1.Generation') at the
    Python package that holds the generated code."""
    text = text.replace(f"from {PROTO_PACKAGE} import ", f"from {PYTHON_PACKAGE} import ")
    return re.sub(rf"'{re.escape(PROTO_PACKAGE)}\.(\w+_pb2(?:_grpc)?)'", rf"'{PYTHON_PACKAGE}.\1'", text)


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (grpcio-tools) over PROTOS and write the rewritten modules into out_dir."""
    from grpc_tools import protoc

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp}",
                f"--grpc_python_out={tmp}", f"--pyi_out={tmp}", *PROTOS]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        written = []
        for src in sorted((Path(tmp) / PROTO_PACKAGE.replace(".", "/")).glob("*")):
            dst = out_dir / src.name
            dst.write_text(_rewrite(src.read_text()))
            written.append(dst)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
