"""Generate the align2.v1 Python stubs from protos/ (the one command; `make protos`).

Usage: python scripts/gen_protos.py [OUT_DIR]   (default: client/, next to align2.client)
Writes align2/v1/*_pb2.py, *_pb2_grpc.py and their .pyi stubs (mypy-protobuf), and
align2/v1/curation.binpb: the FileDescriptorSet with the .proto's comments (source info),
which server reflection serves (the _pb2 descriptors carry no comments).
"""

from __future__ import annotations

import pathlib
import shutil
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
DESCRIPTOR_SET = "curation.binpb"


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    protos = sorted(PROTO_ROOT.glob("align2/v1/*.proto"))
    pkg = out_dir / "align2" / "v1"
    pkg.mkdir(parents=True, exist_ok=True)
    plugin_dir = str(pathlib.Path(sys.executable).parent)
    mypy, mypy_grpc = (
        shutil.which(f"protoc-gen-{n}", path=plugin_dir) for n in ("mypy", "mypy_grpc")
    )
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--plugin=protoc-gen-mypy={mypy}",
        f"--plugin=protoc-gen-mypy_grpc={mypy_grpc}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        f"--descriptor_set_out={pkg / DESCRIPTOR_SET}",
        "--include_source_info",
        "--include_imports",
        *(str(p.relative_to(PROTO_ROOT)) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    docstring = '"""Generated align2.v1 stubs (see protos/). Do not edit."""\n'
    (pkg / "__init__.py").write_text(docstring)
    (pkg / "py.typed").write_text("")
    return sorted(p for p in pkg.iterdir() if p.is_file())


if __name__ == "__main__":
    out = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "client"
    for path in generate(out):
        print(path.relative_to(out))
