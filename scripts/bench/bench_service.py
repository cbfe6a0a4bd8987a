#!/usr/bin/python3
"""Measures raw pipeline throughput and the served throughput in one run, and their ratio.

1. build/worker/pipeline_benchmark: in-process Pipeline::Run images/s per batch size.
2. build/server/dmdserve on free loopback ports + `dmdctl bench` at each concurrency: images/s and
   p50/p90/p99 latency through gRPC with PNG encoding.
Prints a Markdown report (the numbers in docs/PERFORMANCE.md come from it).

Usage: scripts/bench/bench_service.py [--build build] [--bundle models/tiny-random]
           [--concurrency 1,2,4,8,16,32] [--duration_s 10] [--num_images 1]
           [--raw_flags "--device=cuda:0 --cuda_graphs=true"] [--json_out FILE]
           [-- server flags...]
--raw_flags go to pipeline_benchmark (give it the server's device, dtype and CUDA-graph settings,
so that the ratio compares like with like); --json_out also writes the numbers as JSON.
"""
import argparse
import json
import os
import shlex
import sys

from bench_common import (batch_totals, dmdctl_bench, machine_line, raw_at, raw_pipeline,
                          today, write_prompts)
from tools.dmdserve_process import DmdserveProcess


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", default="build")
    parser.add_argument("--bundle", default="models/tiny-random")
    parser.add_argument("--concurrency", default="1,2,4,8,16,32")
    parser.add_argument("--duration_s", type=float, default=10)
    parser.add_argument("--num_images", type=int, default=1)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--raw_flags", default="", help="extra pipeline_benchmark flags")
    parser.add_argument("--json_out", help="also write the results to this JSON file")
    parser.add_argument("server_flags", nargs="*")
    args = parser.parse_args()

    raw = raw_pipeline(args.build, args.bundle, args.repetitions, shlex.split(args.raw_flags))

    server = DmdserveProcess(os.path.join(args.build, "server", "dmdserve"), [args.bundle],
                             args.server_flags)
    try:
        server.wait_ready(300)
    except RuntimeError as e:
        server.stop()
        sys.exit(str(e))
    port, metrics_port = server.port, server.metrics_port

    prompts_file = write_prompts(os.path.join(args.build, "bench_prompts.txt"))

    rows = []
    batches_seen = batch_totals(metrics_port)
    try:
        for c in [int(x) for x in args.concurrency.split(",")]:
            report = dmdctl_bench(args.build, f"127.0.0.1:{port}", c, args.duration_s,
                                  args.num_images, prompts_file)
            before = batches_seen
            batches_seen = batch_totals(metrics_port)
            batches = batches_seen[0] - before[0]
            report["mean_batch"] = (batches_seen[1] - before[1]) / batches if batches else 0
            rows.append((c, report))
    finally:
        server.stop()

    best_raw_batch = max(raw, key=raw.get)
    print(machine_line())
    print(f"date: {today()}; bundle: {args.bundle}; "
          f"server flags: {' '.join(args.server_flags) or '(defaults)'}\n")
    print("| raw pipeline batch | images/s |\n|---|---|")
    for batch in sorted(raw):
        print(f"| {batch} | {raw[batch]:.0f} |")
    print("\n| concurrency | images/s | mean batch | raw at that batch | service / raw "
          "| p50 ms | p90 ms | p99 ms | statuses |\n|---|---|---|---|---|---|---|---|---|")
    for c, r in rows:
        lat = r["latency_seconds"] or {}
        same = raw_at(raw, r["mean_batch"])
        print(f"| {c} | {r['images_per_second']:.0f} | {r['mean_batch']:.2f} | {same:.0f} | "
              f"{r['images_per_second'] / same:.2f} | {lat.get('p50', 0) * 1e3:.1f} | "
              f"{lat.get('p90', 0) * 1e3:.1f} | {lat.get('p99', 0) * 1e3:.1f} | "
              f"{r['status_codes']} |")
    c_sat, sat_row = max(rows, key=lambda row: row[1]["images_per_second"])
    sat = sat_row["images_per_second"]
    one = rows[0][1]["images_per_second"]
    print(f"\nservice at saturation (concurrency {c_sat}): {sat:.0f} images/s in batches of "
          f"{sat_row['mean_batch']:.2f}; raw at that batch size: "
          f"{raw_at(raw, sat_row['mean_batch']):.0f} images/s; "
          f"ratio {sat / raw_at(raw, sat_row['mean_batch']):.2f}; raw best (batch "
          f"{best_raw_batch}): {raw[best_raw_batch]:.0f}")
    print(f"batching gain, best concurrency vs concurrency {rows[0][0]}: {sat / one:.2f}x")
    if args.json_out:
        for _, r in rows:
            r["raw_at_mean_batch"] = raw_at(raw, r["mean_batch"])
        with open(args.json_out, "w") as f:
            json.dump({"bundle": args.bundle, "server_flags": args.server_flags,
                       "raw_flags": args.raw_flags, "raw_images_per_second": raw,
                       "rows": [r for _, r in rows]}, f, indent=1)

if __name__ == "__main__":
    main()
