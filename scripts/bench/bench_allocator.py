#!/usr/bin/python3
"""Served throughput and latency under each memory-allocator setting, interleaved in one run.

Variants (the same build/server/dmdserve binary each time):
  glibc      --malloc_tuning=false: glibc malloc's defaults
  tuned      the default: glibc malloc with the thresholds of worker/malloc_tuning.h
  jemalloc   --malloc_tuning=false with Debian's libjemalloc.so.2 preloaded (skipped when absent)
For each round and variant: a fresh server on the bundle, `dmdctl bench` at each concurrency (one
image per request, PNG). Rounds alternate the variants so that drift hits them alike; the report
gives each variant's median over the rounds, and every run.

Usage: scripts/bench/bench_allocator.py [--build build] [--bundle models/fashion-dmd]
           [--concurrency 1,16] [--duration_s 10] [--rounds 3]
"""
import argparse
import os
import statistics

from bench_common import REPO, dmdctl_bench, machine_line, today
from tools.dmdserve_process import DmdserveProcess

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


def variants():
    out = [("glibc", ["--malloc_tuning=false"], {}), ("tuned", [], {})]
    if os.path.exists(JEMALLOC):
        out.append(("jemalloc", ["--malloc_tuning=false"], {"LD_PRELOAD": JEMALLOC}))
    return out


def bench(args, flags, env):
    server = DmdserveProcess(os.path.join(args.build, "server", "dmdserve"),
                             [os.path.join(REPO, args.bundle)], flags, env=env)
    try:
        server.wait_ready(300)
        results = {}
        for c in args.concurrency:
            report = dmdctl_bench(args.build, server.target, c, args.duration_s, check=True)
            results[c] = (report["images_per_second"], report["latency_seconds"]["p50"] * 1e3,
                          report["failed"])
        return results
    finally:
        server.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", default=os.path.join(REPO, "build"))
    parser.add_argument("--bundle", default="models/fashion-dmd")
    parser.add_argument("--concurrency", default="1,16",
                        type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--duration_s", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    runs = {name: [] for name, _, _ in variants()}
    for _ in range(args.rounds):
        for name, flags, env in variants():
            runs[name].append(bench(args, flags, env))

    print(machine_line())
    print(f"date: {today()}; bundle: {args.bundle}; {args.rounds} rounds of "
          f"{args.duration_s} s per concurrency, variants interleaved\n")
    header = " | ".join(f"c={c} images/s | c={c} p50 ms" for c in args.concurrency)
    print(f"| allocator | {header} | failed |")
    print("|---" * (1 + 2 * len(args.concurrency) + 1) + "|")
    for name, results in runs.items():
        cells = []
        for c in args.concurrency:
            cells.append(f"{statistics.median(r[c][0] for r in results):.0f}")
            cells.append(f"{statistics.median(r[c][1] for r in results):.1f}")
        failed = sum(r[c][2] for r in results for c in args.concurrency)
        print(f"| {name} | {' | '.join(cells)} | {failed} |")
    print("\nevery run (images/s at each concurrency):")
    for name, results in runs.items():
        print(f"  {name}: " + "; ".join(
            ", ".join(f"{r[c][0]:.0f}" for c in args.concurrency) for r in results))


if __name__ == "__main__":
    main()
