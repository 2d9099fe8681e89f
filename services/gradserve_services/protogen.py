"""Regenerate the committed Python stubs of protos/gradserve/v1 into client/gradserve/v1 (`make proto`).

protoc writes files under the proto package path (gradserve/v1/...), and their imports read
`from gradserve.v1 import tensor_pb2`, which is exactly how the SDK package installs (client/gradserve/ is
`gradserve`). So we generate into a scratch directory and copy the modules into client/gradserve/v1/.
The stubs are committed so the SDK installs without grpcio-tools; a test regenerates them into a
temporary directory and compares, so they cannot drift from the .proto files.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile

__all__ = ["PROTO_ROOT", "STUB_DIR", "PROTO_FILES", "generate", "main"]

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
STUB_DIR = REPO_ROOT / "client" / "gradserve" / "v1"
PROTO_PACKAGE_DIR = pathlib.Path("gradserve") / "v1"
PROTO_FILES = ("tensor.proto", "model.proto", "describe.proto", "service.proto")


def generate(output_dir: pathlib.Path) -> list[pathlib.Path]:
    """Write the *_pb2.py / *_pb2_grpc.py modules of every proto into `output_dir`; return them."""
    from grpc_tools import protoc  # build-time tool only: imported here, not by the service

    import importlib.resources

    well_known = importlib.resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as scratch:
        arguments = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={scratch}",
            f"--grpc_python_out={scratch}",
            *(str(PROTO_PACKAGE_DIR / name) for name in PROTO_FILES),
        ]
        if protoc.main(arguments) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(arguments)}")
        written = []
        output_dir.mkdir(parents=True, exist_ok=True)
        for module in sorted((pathlib.Path(scratch) / PROTO_PACKAGE_DIR).glob("*.py")):
            target = output_dir / module.name
            shutil.copyfile(module, target)
            written.append(target)
        return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=STUB_DIR, help="where to write the stubs")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
