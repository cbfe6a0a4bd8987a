#!/usr/bin/env python3
"""Generates the package's protobuf and gRPC modules, dmdserve/v1/dmdserve_pb2{,_grpc}.py(i), from
proto/dmdserve/v1/dmdserve.proto. Run by setup.py (build_py) and by CMake (the test build).

The modules land at dmdserve/v1/ so that the generated `from dmdserve.v1 import dmdserve_pb2`
imports resolve inside this package unchanged.

Compiler, first found: --protoc/--grpc_python_plugin (or $PROTOC/$GRPC_PYTHON_PLUGIN), else
`protoc` and `grpc_python_plugin` on PATH (Debian 12: protobuf-compiler, protobuf-compiler-grpc),
else the grpcio-tools Python package (python -m grpc_tools.protoc).

    build_stubs.py --out DIR [--proto_dir DIR] [--protoc PATH] [--grpc_python_plugin PATH]

Standard library only: it runs before the package or its dependencies are installed.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

PROTO = "dmdserve/v1/dmdserve.proto"
HERE = Path(__file__).resolve().parent
INIT = '"""Generated from proto/dmdserve/v1/dmdserve.proto by build_stubs.py: do not edit."""\n'


def find_proto_dir(explicit: Optional[str] = None) -> Path:
    """The proto root holding dmdserve/v1/dmdserve.proto: `explicit`, $DMDSERVE_PROTO_DIR, the
    copy an sdist carries (./proto), or the repository's (../../proto)."""
    candidates = [explicit, os.environ.get("DMDSERVE_PROTO_DIR"), HERE / "proto",
                  HERE.parent.parent / "proto"]
    for candidate in candidates:
        if candidate and (Path(candidate) / PROTO).is_file():
            return Path(candidate).resolve()
    raise SystemExit(f"build_stubs.py: {PROTO} not found (looked in {HERE / 'proto'} and "
                     f"{HERE.parent.parent / 'proto'}; set DMDSERVE_PROTO_DIR)")


def compiler(protoc: Optional[str] = None, plugin: Optional[str] = None) -> List[str]:
    """The protoc command line prefix that can write --python_out and --grpc_python_out."""
    protoc = protoc or os.environ.get("PROTOC") or shutil.which("protoc")
    plugin = plugin or os.environ.get("GRPC_PYTHON_PLUGIN") or shutil.which("grpc_python_plugin")
    if protoc and plugin:
        return [protoc, f"--plugin=protoc-gen-grpc_python={plugin}"]
    if importlib.util.find_spec("grpc_tools") is None:  # grpcio-tools: protoc and the plugin
        raise SystemExit(
            "build_stubs.py: needs protoc and grpc_python_plugin (Debian: apt-get install "
            "protobuf-compiler protobuf-compiler-grpc) or the grpcio-tools package")
    return [sys.executable, "-m", "grpc_tools.protoc"]


def generate(out_dir: Path, proto_dir: Path, command: List[str]) -> List[Path]:
    """Writes the modules under out_dir/dmdserve/v1/ and returns their paths."""
    package = out_dir / "dmdserve" / "v1"
    package.mkdir(parents=True, exist_ok=True)
    subprocess.run([*command, f"--proto_path={proto_dir}", f"--python_out={out_dir}",
                    f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}",
                    str(proto_dir / PROTO)], check=True)
    (package / "__init__.py").write_text(INIT)
    return sorted(package.iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory that holds the dmdserve package")
    parser.add_argument("--proto_dir", help="proto root (default: found, see find_proto_dir)")
    parser.add_argument("--protoc", help="protoc binary")
    parser.add_argument("--grpc_python_plugin", help="grpc_python_plugin binary")
    args = parser.parse_args()
    generate(Path(args.out), find_proto_dir(args.proto_dir),
             compiler(args.protoc, args.grpc_python_plugin))


if __name__ == "__main__":
    main()
