"""Generate the gRPC stubs for proto/*.proto reproducibly.

The stubs are committed so the packages import without a build step; `make proto` rewrites
them and tests/test_proto_stubs.py regenerates into a temporary folder and compares, so a
.proto edit without regenerated stubs fails CI. `-I` is the repository root, which makes the
generated `*_pb2_grpc.py` import its messages as `proto.<name>_pb2`, the package they live in.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO / "proto"


def generate(out_root: Path) -> list[Path]:
    """Run protoc on every proto/*.proto, writing under out_root/proto; return the files."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    sources = sorted(PROTO_DIR.glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    (out_root / "proto").mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{REPO}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(s.relative_to(REPO)) for s in sources],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {[s.name for s in sources]}")
    return sorted(p for p in (out_root / "proto").iterdir() if p.suffix in {".py", ".pyi"})


def main(argv: list[str]) -> int:
    target = REPO / (argv[0] if argv else "proto")
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            shutil.copyfile(path, target / path.name)
            print(f"wrote {target.name}/{path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
