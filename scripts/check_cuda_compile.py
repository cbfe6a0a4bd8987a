#!/usr/bin/python3
"""Compile check of dmdserve's CUDA paths on a machine without a CUDA libtorch (CTest
`cuda_compile_check`, label cuda_compile; docs/GPU.md).

The CPU build compiles every `#if DMDSERVE_WITH_CUDA` block away, so nothing would notice when one
stops compiling. This script takes the compile commands of the CPU build (compile_commands.json),
turns DMDSERVE_WITH_CUDA on, adds the CUDA toolkit's headers, and compiles each source that has
CUDA paths with -fsyntax-only against the same libtorch headers (Debian's CPU libtorch ships the
c10/cuda and ATen/cuda headers; only the generated cuda_cmake_macros.h is missing, and a stand-in
is provided). Sources only a CUDA build compiles (CUDA_ONLY_SOURCES) borrow the compile command of
a source of their target. The kernel is compiled with nvcc for sm_90. Nothing is linked or run.

What it cannot catch: API differences between this libtorch's headers and the one the GPU build
uses (torch 2.x on the device); the GPU build itself checks those.

Usage: check_cuda_compile.py --build BUILD_DIR [--nvcc /usr/local/cuda/bin/nvcc]
       [--cuda-include DIR]
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile

SOURCES = ["worker/pipeline.cc", "worker/device.cc", "worker/postprocess.cc", "worker/gpu_test.cc"]
# Sources that only a CUDA build compiles, so the CPU build has no compile command for them: each
# is compiled with the command of a source of the same target.
CUDA_ONLY_SOURCES = {"worker/pipeline_cuda_graphs.cc": "worker/pipeline.cc"}
KERNEL = "worker/postprocess_kernel.cu"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", required=True, help="a configured CPU build directory")
    parser.add_argument("--nvcc", default="/usr/local/cuda/bin/nvcc")
    parser.add_argument("--cuda-include", default=None,
                        help="the CUDA toolkit's include directory (the one with "
                             "cuda_runtime.h); default: ../include beside the real nvcc")
    args = parser.parse_args()
    source_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cuda_include = args.cuda_include or os.path.join(
        os.path.dirname(os.path.dirname(os.path.realpath(args.nvcc))), "include")
    if not os.path.isfile(os.path.join(cuda_include, "cuda_runtime.h")):
        print(f"no cuda_runtime.h in {cuda_include}: pass --cuda-include", file=sys.stderr)
        return 1
    with open(os.path.join(args.build, "compile_commands.json")) as f:
        commands = {os.path.relpath(e["file"], source_dir): e for e in json.load(f)}

    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        shim = os.path.join(tmp, "include")
        os.makedirs(os.path.join(shim, "c10", "cuda", "impl"))
        with open(os.path.join(shim, "c10", "cuda", "impl", "cuda_cmake_macros.h"), "w") as f:
            f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        for source in SOURCES + list(CUDA_ONLY_SOURCES):
            sibling = CUDA_ONLY_SOURCES.get(source, source)
            entry = commands.get(sibling)
            if entry is None:
                failures.append(f"{sibling}: not in compile_commands.json (build it first?)")
                continue
            words = shlex.split(entry["command"])
            command, skip = [], False
            for word in words:
                if skip:
                    skip = False
                elif word == "-o":
                    skip = True
                elif word == "-c":
                    pass
                elif word == "-DDMDSERVE_WITH_CUDA=0":
                    command.append("-DDMDSERVE_WITH_CUDA=1")
                elif word == entry["file"] and source != sibling:
                    command.append(os.path.join(source_dir, source))
                else:
                    command.append(word)
            if source != sibling and os.path.join(source_dir, source) not in command:
                failures.append(f"{source}: {sibling}'s compile command does not name its file")
                continue
            command += ["-isystem", cuda_include, "-isystem", shim, "-fsyntax-only"]
            print(f"compile (DMDSERVE_WITH_CUDA=1): {source}", flush=True)
            if subprocess.run(command, cwd=entry["directory"]).returncode != 0:
                failures.append(source)
        print(f"nvcc: {KERNEL}", flush=True)
        nvcc = [args.nvcc, "-std=c++17", "-arch=sm_90", f"-I{source_dir}", "-c",
                os.path.join(source_dir, KERNEL), "-o", os.path.join(tmp, "kernel.o")]
        if subprocess.run(nvcc).returncode != 0:
            failures.append(KERNEL)
    if failures:
        print("CUDA paths failed to compile: " + ", ".join(failures), file=sys.stderr)
        return 1
    print("CUDA paths compile")
    return 0


if __name__ == "__main__":
    sys.exit(main())
