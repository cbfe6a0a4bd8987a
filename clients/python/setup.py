"""Build steps of the dmdserve package beyond pyproject.toml: the protobuf/gRPC modules
(dmdserve/v1) are generated from proto/ when the package is built, never committed.

- build_py: runs build_stubs.py into the build directory (into the source tree for an
  editable install), so wheels and installs carry dmdserve/v1.
- sdist: carries proto/dmdserve/v1/dmdserve.proto, so the sdist builds outside the repository.
"""
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # setuptools.build_meta does not put this directory on sys.path
import build_stubs  # noqa: E402


class BuildPyWithStubs(build_py):
    """build_py plus the generated dmdserve/v1 modules."""

    def run(self) -> None:
        super().run()
        editable = getattr(self, "editable_mode", False)
        out = HERE if editable else Path(self.build_lib)
        if not self.dry_run:
            self._stubs = build_stubs.generate(out, build_stubs.find_proto_dir(),
                                               build_stubs.compiler())

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), *map(str, getattr(self, "_stubs", []))]


class SdistWithProtos(sdist):
    """sdist plus the proto the build generates from."""

    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        proto = build_stubs.find_proto_dir() / build_stubs.PROTO
        target = Path(base_dir) / "proto" / build_stubs.PROTO
        target.parent.mkdir(parents=True, exist_ok=True)
        self.copy_file(str(proto), str(target))


setup(cmdclass={"build_py": BuildPyWithStubs, "sdist": SdistWithProtos})
