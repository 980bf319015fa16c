"""Regenerate the Python protobuf code under telematics/v1 from proto/.

    python proto/generate.py            # write telematics/v1/*_pb2.py(i)
    python proto/generate.py --out DIR  # write elsewhere (the staleness test)

Uses the protoc bundled with the pinned grpcio-tools, so every checkout
generates byte-identical code for the pinned protobuf runtime.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "telematics" / "v1").glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run protoc over every .proto; returns the generated files."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    pkg = out_dir / "telematics" / "v1"
    for init in (out_dir / "telematics" / "__init__.py", pkg / "__init__.py"):
        if not init.exists():
            init.write_text('"""Generated protobuf code: regenerate with proto/generate.py."""\n')
    return sorted(pkg.glob("*_pb2.py*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root")
    ns = parser.parse_args()
    for path in generate(ns.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
