#!/usr/bin/env python3
"""Turns the results of scripts/gpu/gpu_measure.sh into summary.md and plots.

Reads, from the results directory: device.txt; raw_index.tsv and the pipeline_benchmark JSON
files it lists (medians of the repetitions); service_<bundle>.json files written by
scripts/bench/bench_service.py --json_out. Writes to --out: summary.md (Markdown tables, the numbers
for docs/PERFORMANCE.md), and with matplotlib installed throughput.png (service images/s vs
concurrency) and latency.png (p50/p90/p99 vs concurrency).

Usage: gpu_report.py RESULTS_DIR --out OUT_DIR
"""
import argparse
import glob
import json
import os
import re


def raw_rows(results):
    """One dict per (configuration, batch size), from the medians of the repetitions."""
    rows = []
    index = os.path.join(results, "raw_index.tsv")
    if not os.path.exists(index):
        return rows
    with open(index) as f:
        for line in f:
            name, bundle, dtype, graphs, postprocess = line.rstrip("\n").split("\t")
            with open(os.path.join(results, name)) as g:
                benchmarks = json.load(g)["benchmarks"]
            for b in benchmarks:
                if b.get("aggregate_name", "median") != "median" or b.get("error_occurred"):
                    continue
                rows.append({
                    "bundle": bundle, "dtype": dtype, "graphs": graphs, "postprocess": postprocess,
                    "batch": int(re.search(r"batch:(\d+)", b["name"]).group(1)),
                    "ms": b["real_time"], "images_per_second": b["images_per_second"],
                    "text_encoder_ms": b["text_encoder_ms"], "generator_ms": b["generator_ms"],
                    "decoder_ms": b["decoder_ms"], "run_batch": int(b["run_batch"]),
                    "cuda_graph": bool(b["cuda_graph"]),
                })
    return rows


def service_reports(results):
    reports = {}
    for path in sorted(glob.glob(os.path.join(results, "service_*.json"))):
        with open(path) as f:
            report = json.load(f)
        reports[os.path.basename(report["bundle"].rstrip("/"))] = report
    return reports


def summary(results, raw, services):
    lines = ["# GPU measurements", ""]
    device = os.path.join(results, "device.txt")
    if os.path.exists(device):
        with open(device) as f:
            lines += ["```", f.read().rstrip(), "```", ""]
    lines += ["## Raw pipeline (pipeline_benchmark, medians)", "",
              "| bundle | dtype | CUDA graphs | post-processing | batch | ms/batch | images/s "
              "| text encoder ms | generator ms | decoder ms |", "|" + "---|" * 10]
    for r in raw:
        stages = ("| - | - | - |" if r["cuda_graph"] else
                  f"| {r['text_encoder_ms']:.2f} | {r['generator_ms']:.2f} | "
                  f"{r['decoder_ms']:.2f} |")
        graphs = "off" if r["graphs"] != "true" else (
            f"on (ran {r['run_batch']})" if r["cuda_graph"] else "on, not used")
        lines.append(f"| {r['bundle']} | {r['dtype']} | {graphs} | {r['postprocess']} | "
                     f"{r['batch']} | {r['ms']:.2f} | {r['images_per_second']:.0f} {stages}")
    for bundle, report in services.items():
        lines += ["", f"## Service: {bundle} (dmdctl bench, unary Generate, 1 image, PNG)", "",
                  f"server flags: `{' '.join(report['server_flags'])}`; raw pipeline flags: "
                  f"`{report['raw_flags']}`", "",
                  "| concurrency | images/s | mean batch | raw at that batch | service / raw "
                  "| p50 ms | p90 ms | p99 ms | statuses |", "|" + "---|" * 9]
        for r in report["rows"]:
            lat = r["latency_seconds"] or {}
            raw_at = r["raw_at_mean_batch"]
            lines.append(f"| {r['concurrency']} | {r['images_per_second']:.0f} | "
                         f"{r['mean_batch']:.2f} | {raw_at:.0f} | "
                         f"{r['images_per_second'] / raw_at if raw_at else 0:.2f} | "
                         f"{lat.get('p50', 0) * 1e3:.1f} | {lat.get('p90', 0) * 1e3:.1f} | "
                         f"{lat.get('p99', 0) * 1e3:.1f} | {r['status_codes']} |")
    return "\n".join(lines) + "\n"


def plot(services, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not available: no plots")
        return
    concurrencies = sorted({r["concurrency"] for report in services.values()
                            for r in report["rows"]})

    def concurrency_axis(ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
        ax.minorticks_off()
    fig, ax = plt.subplots(figsize=(6, 4))
    for bundle, report in services.items():
        rows = report["rows"]
        ax.plot([r["concurrency"] for r in rows], [r["images_per_second"] for r in rows],
                marker="o", label=bundle)
    concurrency_axis(ax)
    ax.set(xlabel="concurrent clients", ylabel="images/s",
           title="dmdserve throughput vs concurrency")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "throughput.png"), dpi=120)
    fig, ax = plt.subplots(figsize=(6, 4))
    for bundle, report in services.items():
        rows = report["rows"]
        for p, style in (("p50", "-"), ("p90", "--"), ("p99", ":")):
            ax.plot([r["concurrency"] for r in rows],
                    [(r["latency_seconds"] or {}).get(p, 0) * 1e3 for r in rows],
                    style, marker="o", label=f"{bundle} {p}")
    concurrency_axis(ax)
    ax.set(yscale="log", xlabel="concurrent clients", ylabel="latency (ms)",
           title="dmdserve latency percentiles vs concurrency")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "latency.png"), dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    raw = raw_rows(args.results)
    services = service_reports(args.results)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(summary(args.results, raw, services))
    plot(services, args.out)


if __name__ == "__main__":
    main()
