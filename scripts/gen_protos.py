"""Regenerate the Python gRPC stubs from protos/ into fedtwin/ (committed).

Usage: python scripts/gen_protos.py [--out DIR]. tests/test_protos.py regenerates into a
temporary folder and fails if the committed stubs differ: run this after editing a .proto.
Uses grpcio-tools (the version pinned in pyproject's test extra).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"


def generate(out: Path) -> list[Path]:
    """Run protoc on every .proto under protos/; returns the files written."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    written = []
    for proto in sorted(PROTOS.rglob("*.proto")):
        rel = proto.relative_to(PROTOS)
        args = [
            "protoc",
            f"-I{PROTOS}",
            f"-I{include}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(rel),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
        stem = out / rel.with_suffix("")
        written += [Path(f"{stem}_pb2.py"), Path(f"{stem}_pb2.pyi"), Path(f"{stem}_pb2_grpc.py")]
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: repo)")
    args = parser.parse_args()
    import os

    os.chdir(PROTOS)  # protoc resolves the relative .proto paths from here
    for path in generate(args.out.resolve()):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
