#!/usr/bin/python3
"""dmdserve side by side with a Python peer server, in one run on one machine (CPU).

Measures, and prints as one Markdown report (also --json_out FILE):
  1. machine facts and the exact command;
  2. the fp32 matmul peak of this machine (torch, an N x N matmul on every usable core);
  3. FLOPs per image of each bundle component (text encoder, generator x steps, decoder),
     counted by intercepting every convolution and matrix product of the TorchScript modules
     at batch 1;
  4. raw pipeline images/s per batch size (BUILD/worker/pipeline_benchmark, --raw_flags), with
     as many workers and intra-op threads as dmdserve derives, and dmdserve's malloc settings
     (pipeline_benchmark --malloc_tuning, --raw_malloc_tuning);
  5. served images/s and p50/p90/p99 latency at each --concurrency through `dmdctl bench` (one
     PNG image per request, distinct prompts), for each variant:
       dmdserve          BUILD/server/dmdserve with --server_flags (default flags)
       baseline          --baseline_bin DIR/dmdserve, an older binary (only when given)
       python-batched    scripts/bench/python_peer.py: dynamic batcher <= 16, 2 torch threads
       python-unbatched  python_peer.py: 4 request threads, 1 torch thread each, no batching
       python-batched-malloc  the batched peer with glibc malloc set as dmdserve sets it, to tell
                         how much of the gap is the allocator
     (--variants picks and orders them). Each round starts every variant afresh, in
     turn, so drift hits them alike; the tables give the median over --rounds, and every run is
     listed;
  6. derived figures against their targets (pass/miss).

Usage (hold the CPU lock; every timing needs a quiet machine):
  flock /tmp/cpu.lock scripts/bench/bench_side_by_side.py [--build build]
      [--bundle models/fashion-dmd] [--concurrency 1,16] [--duration_s 15] [--rounds 2]
      [--baseline_bin DIR] [--raw_flags "..."] [--server_flags "..."] [--json_out FILE]
"""
import argparse
import json
import os
import shlex
import statistics
import sys
import time

from bench_common import (DMDSERVE_MALLOC_TUNABLES, REPO, PeerProcess, batch_totals, cpu_model,
                          dmdctl_bench, git_commit, raw_at, raw_pipeline, usable_cores,
                          write_prompts)
from tools import reference_pipeline
from tools.dmdserve_process import DmdserveProcess

BATCHED = ["--max_batch_size=16", "--torch_threads=2", "--request_threads=32"]
# name: (python_peer.py flags, environment entries)
PEER_VARIANTS = {
    "python-batched": (BATCHED, {}),
    "python-unbatched": (["--max_batch_size=1", "--request_threads=4", "--torch_threads=1"], {}),
    # The batched peer with glibc malloc set as dmdserve sets it, to tell how much of the gap is
    # the allocator.
    "python-batched-malloc": (BATCHED, DMDSERVE_MALLOC_TUNABLES),
}
DEFAULT_VARIANTS = "dmdserve,baseline,python-batched,python-unbatched,python-batched-malloc"


class ServerVariant:
    """A dmdserve binary (dmdserve, baseline) as a benchmark variant."""

    def __init__(self, binary, bundle, flags):
        self.server = DmdserveProcess(binary, [bundle], flags)

    def wait_ready(self, timeout_s):
        self.server.wait_ready(timeout_s)

    @property
    def target(self):
        return self.server.target

    def batch_totals(self):
        return batch_totals(self.server.metrics_port)

    def stop(self):
        self.server.stop()


# --- measurements ----------------------------------------------------------------------------


def matmul_peak(threads, n, repeats=10):
    """Best GFLOP/s of an n x n fp32 matmul on `threads` torch threads."""
    import torch
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    torch.set_num_threads(previous)
    return 2 * n ** 3 / best / 1e9


def count_flops(fn):
    """FLOPs of the convolutions and matrix products fn() runs (TorchScript included): 2 per
    multiply-add; elementwise ops, norms and softmax are not counted (a few % at most)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    aten = torch.ops.aten

    class Counter(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            op = func.overloadpacket
            if op is aten.convolution:
                weight, transposed = args[1], args[6]
                per_output = weight.numel() // weight.shape[0]  # (C_in/groups or C_out/groups) k k
                Counter.total += 2 * per_output * (args[0].numel() if transposed else out.numel())
            elif op in (aten.mm, aten.bmm):
                Counter.total += 2 * out.numel() * args[0].shape[-1]
            elif op in (aten.addmm, aten.baddbmm):
                Counter.total += 2 * out.numel() * args[1].shape[-1]
            return out

    with torch.no_grad(), Counter():
        fn()
    return Counter.total


def flops_per_image(bundle):
    """{component: FLOPs per image} at the bundle's default size: text encoder once, generator
    x steps (x2 with classifier-free guidance), decoder once."""
    import torch
    loaded = reference_pipeline.load(bundle)
    manifest, modules = loaded["manifest"], loaded["modules"]
    ids = torch.tensor([reference_pipeline.empty_prompt_ids(bundle, manifest)])
    factor = manifest["latent"]["downsample_factor"]
    latent = torch.randn(1, manifest["latent"]["channels"], manifest["image"]["height"] // factor,
                         manifest["image"]["width"] // factor)
    timesteps = manifest["schedule"]["timesteps"]
    cfg = 2 if manifest.get("guidance_scale", 1.0) > 1.0 else 1
    dtypes = loaded["dtypes"]
    with torch.no_grad():
        emb = reference_pipeline.first_tensor(modules["text_encoder"](ids))
    te = count_flops(lambda: modules["text_encoder"](ids))
    gen = count_flops(lambda: modules["generator"](
        latent.to(dtypes["generator"]), torch.tensor([timesteps[0]]), emb.to(dtypes["generator"])))
    dec = count_flops(lambda: modules["decoder"](latent.to(dtypes["decoder"])))
    return {"text_encoder": te, "generator": gen * len(timesteps) * cfg, "decoder": dec,
            "generator_evaluations": len(timesteps) * cfg}


def serve_round(args, name, variant, prompts_file):
    """{concurrency: dmdctl bench report + mean_batch} of one fresh start of a variant."""
    try:
        variant.wait_ready(300)
        results = {}
        for c in args.concurrency:
            before = variant.batch_totals()
            report = dmdctl_bench(args.build, variant.target, c, args.duration_s,
                                  prompts_file=prompts_file)
            after = variant.batch_totals()
            batches = after[0] - before[0] if before and after else 0
            report["mean_batch"] = (after[1] - before[1]) / batches if batches else None
            # Seconds in the model per second of the run (summed over the threads running it).
            report["model_busy"] = ((after[2] - before[2]) / report["elapsed_seconds"]
                                    if batches else None)
            results[c] = report
            print(f"  {name} c={c}: {report['images_per_second']:.0f} images/s, "
                  f"p50 {p_ms(report, 'p50'):.1f} ms, failed {report['failed']}",
                  file=sys.stderr, flush=True)
        return results
    finally:
        variant.stop()


def make_variants(args, bundle):
    """[(name, () -> a started variant)] in the order each round runs them."""
    flags = shlex.split(args.server_flags)
    out = [("dmdserve", lambda: ServerVariant(
        os.path.join(args.build, "server", "dmdserve"), bundle, flags))]
    if args.baseline_bin:
        out.append(("baseline", lambda: ServerVariant(
            os.path.join(args.baseline_bin, "dmdserve"), bundle, flags)))
    for name, (peer_flags, env) in PEER_VARIANTS.items():
        out.append((name, lambda f=peer_flags, e=env: PeerProcess(args.build, bundle, f, e)))
    chosen = [v for v in out if v[0] in args.variants]
    return sorted(chosen, key=lambda v: args.variants.index(v[0]))


# --- report ----------------------------------------------------------------------------------


def p_ms(report, p):
    return (report.get("latency_seconds") or {}).get(p, float("nan")) * 1e3


def median_of(runs, c, key):
    values = [key(r[c]) for r in runs if key(r[c]) is not None]
    return statistics.median(values) if values else None


def summarize(runs, concurrency):
    """{variant: {c: medians}} over the rounds."""
    out = {}
    for name, rs in runs.items():
        out[name] = {c: {
            "images_per_second": median_of(rs, c, lambda r: r["images_per_second"]),
            "images_per_second_range": (min(r[c]["images_per_second"] for r in rs),
                                        max(r[c]["images_per_second"] for r in rs)),
            "p50_ms": median_of(rs, c, lambda r: p_ms(r, "p50")),
            "p90_ms": median_of(rs, c, lambda r: p_ms(r, "p90")),
            "p99_ms": median_of(rs, c, lambda r: p_ms(r, "p99")),
            "mean_batch": median_of(rs, c, lambda r: r["mean_batch"]),
            "model_busy": median_of(rs, c, lambda r: r["model_busy"]),
            "failed": sum(r[c]["failed"] for r in rs)} for c in concurrency}
    return out


def derived(med, raw, flops, peak, lo, hi):
    """[(figure, value, target text, pass?)]: None values (a variant not run) are left out."""
    def get(name, c, key):
        return med.get(name, {}).get(c, {}).get(key)
    rows = []

    def add(label, value, op, target):
        if value is not None:
            ok = value >= target if op == ">=" else value <= target
            rows.append((label, value, f"{op} {target}", ok))

    d_hi, d_lo = get("dmdserve", hi, "images_per_second"), get("dmdserve", lo, "images_per_second")
    p_hi = get("python-batched", hi, "images_per_second")
    add(f"dmdserve / python-batched images/s at c={hi}", d_hi / p_hi if d_hi and p_hi else None,
        ">=", 2.5)
    d50, p50 = get("dmdserve", lo, "p50_ms"), get("python-batched", lo, "p50_ms")
    add(f"dmdserve / python-batched p50 at c={lo}", d50 / p50 if d50 and p50 else None, "<=", 0.7)
    best_raw = max(raw.values()) if raw else None
    add(f"dmdserve c={hi} / best raw batch images/s",
        d_hi / best_raw if d_hi and best_raw else None, ">=", 0.95)
    mean_batch = get("dmdserve", hi, "mean_batch")
    if d_hi and mean_batch and raw:
        rows.append((f"dmdserve c={hi} / raw at the mean batch it formed ({mean_batch:.2f})",
                     d_hi / raw_at(raw, mean_batch), "", None))
    if d_hi and d_lo and raw and 1 in raw:
        add(f"batching gain (c={hi}/c={lo}) / raw gain (best raw / raw batch 1)",
            (d_hi / d_lo) / (best_raw / raw[1]), ">=", 0.8)
    b50, b_hi = get("baseline", lo, "p50_ms"), get("baseline", hi, "images_per_second")
    add(f"dmdserve / baseline p50 at c={lo}", d50 / b50 if d50 and b50 else None, "<=", 1.05)
    add(f"dmdserve / baseline images/s at c={hi}", d_hi / b_hi if d_hi and b_hi else None,
        ">=", 0.95)
    if d_hi:
        achieved = d_hi * flops["total"] / 1e9
        rows.append((f"achieved GFLOP/s at c={hi} (images/s x FLOPs/image)", achieved, "", None))
        add("achieved / matmul peak", achieved / peak, ">=", 0.5)
    return rows


def markdown(result):
    out = []
    f = result["facts"]
    out.append("# dmdserve side by side with a Python peer (CPU)\n")
    out.append(f"- command: `{f['command']}`")
    out.append(f"- date: {f['date']}; git commit: {f['git_commit']}")
    out.append(f"- cpu: {f['cpu_model']}; usable cores: {f['usable_cores']} "
               f"(of {f['cpu_count']}); bundle: {f['bundle']}")
    out.append(f"- load average (1 min) before the run: {f['loadavg_start']:.2f} (other work on "
               "the machine shows here, and in the ranges over rounds)")
    out.append(f"- rounds: {f['rounds']} of {f['duration_s']} s per concurrency, variants "
               "interleaved; medians below, every run at the end\n")
    out.append(f"fp32 matmul peak ({f['matmul_n']}x{f['matmul_n']}, {f['usable_cores']} "
               f"threads, best of 10): **{result['matmul_peak_gflops']:.1f} GFLOP/s** (the "
               f"higher of {' and '.join(f'{p:.1f}' for p in result['matmul_peaks_gflops'])}, "
               "measured before and after the rest)\n")
    fl = result["flops_per_image"]
    out.append("| component | MFLOP per image |\n|---|---|")
    out.append(f"| text encoder | {fl['text_encoder'] / 1e6:.1f} |")
    out.append(f"| generator x {fl['generator_evaluations']} | {fl['generator'] / 1e6:.1f} |")
    out.append(f"| decoder | {fl['decoder'] / 1e6:.1f} |")
    out.append(f"| **total** | **{fl['total'] / 1e6:.1f}** |\n")
    raw = result["raw_images_per_second"]
    out.append(f"raw pipeline (pipeline_benchmark {result['raw_flags']}; as many workers at once, "
               f"with as many intra-op threads, as dmdserve derives from the CPU budget; "
               f"images/s summed over them):\n")
    out.append("| batch | images/s | GFLOP/s |\n|---|---|---|")
    for b in sorted(raw):
        out.append(f"| {b} | {raw[b]:.0f} | {raw[b] * fl['total'] / 1e9:.1f} |")
    out.append("\nserved (median over rounds; PNG, one image per request, distinct prompts):\n")
    out.append("| variant | c | images/s | range over rounds | p50 ms | p90 ms | p99 ms "
               "| mean batch | model busy | failed |\n|---|---|---|---|---|---|---|---|---|---|")
    for name, by_c in result["served"].items():
        for c, m in by_c.items():
            batch, busy = (f"{m[k]:.2f}" if m[k] is not None else "-"
                           for k in ("mean_batch", "model_busy"))
            lo_ips, hi_ips = m["images_per_second_range"]
            out.append(f"| {name} | {c} | {m['images_per_second']:.0f} | "
                       f"{lo_ips:.0f}-{hi_ips:.0f} | {m['p50_ms']:.1f} | "
                       f"{m['p90_ms']:.1f} | {m['p99_ms']:.1f} | {batch} | {busy} | "
                       f"{m['failed']} |")
    out.append("\nmodel busy: seconds in model runs (batches) per second of the run, summed over "
               "the threads that run the model.")
    out.append("\n| figure | value | target | |\n|---|---|---|---|")
    for label, value, target, ok in result["derived"]:
        verdict = "" if ok is None else ("pass" if ok else "**miss**")
        out.append(f"| {label} | {value:.2f} | {target} | {verdict} |")
    out.append("\nevery run (images/s / p50 ms at each concurrency, in round order):\n")
    for name, rs in result["runs"].items():
        cells = ["; ".join(f"c={c}: {r[c]['images_per_second']:.0f} / {p_ms(r[c], 'p50'):.1f}"
                           for c in r) for r in rs]
        out.append(f"- {name}: " + " | ".join(cells))
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", default=os.path.join(REPO, "build"))
    parser.add_argument("--bundle", default=os.path.join(REPO, "models", "fashion-dmd"))
    parser.add_argument("--concurrency", default="1,16",
                        type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--duration_s", type=float, default=15)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline_bin", help="directory holding an older dmdserve binary")
    parser.add_argument("--raw_flags", default="", help="extra pipeline_benchmark flags")
    parser.add_argument("--raw_repetitions", type=int, default=3)
    parser.add_argument("--raw_malloc_tuning", default="true", choices=["true", "false"],
                        help="pipeline_benchmark --malloc_tuning: glibc malloc set as dmdserve "
                             "sets it (on by default), so raw and served compare alike")
    parser.add_argument("--server_flags", default="", help="dmdserve (and baseline) flags")
    parser.add_argument("--matmul_n", type=int, default=2048)
    parser.add_argument("--variants", type=lambda s: s.split(","), default=DEFAULT_VARIANTS,
                        help="variants to run, comma-separated, in this order; baseline runs "
                             "only with --baseline_bin")
    parser.add_argument("--json_out", help="also write the results to this JSON file")
    args = parser.parse_args()
    unknown = set(args.variants) - {"dmdserve", "baseline", *PEER_VARIANTS}
    if unknown:
        parser.error(f"--variants: unknown {', '.join(sorted(unknown))}")
    bundle = os.path.abspath(args.bundle)
    cores = usable_cores()

    facts = {"command": " ".join(shlex.quote(a) for a in sys.argv), "date":
             time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "git_commit": git_commit(),
             "cpu_model": cpu_model(), "usable_cores": cores, "cpu_count": os.cpu_count(),
             "bundle": os.path.relpath(bundle, REPO), "rounds": args.rounds,
             "duration_s": args.duration_s, "matmul_n": args.matmul_n,
             "loadavg_start": os.getloadavg()[0]}
    print("measuring the matmul peak, FLOPs and the raw pipeline...", file=sys.stderr, flush=True)
    peaks = [matmul_peak(cores, args.matmul_n)]
    flops = flops_per_image(bundle)
    flops["total"] = flops["text_encoder"] + flops["generator"] + flops["decoder"]
    raw_flags = [f"--malloc_tuning={args.raw_malloc_tuning}", *shlex.split(args.raw_flags)]
    raw = raw_pipeline(args.build, bundle, args.raw_repetitions, raw_flags)

    prompts_file = write_prompts(os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                              f"bench_prompts_{os.getpid()}.txt"))
    variants = make_variants(args, bundle)
    runs = {name: [] for name, _ in variants}
    for k in range(args.rounds):
        print(f"round {k + 1} of {args.rounds}", file=sys.stderr, flush=True)
        for name, start in variants:
            runs[name].append(serve_round(args, name, start(), prompts_file))
    os.remove(prompts_file)
    # Again at the end: a neighbour's load at either time shows as a gap between the two.
    peaks.append(matmul_peak(cores, args.matmul_n))
    peak = max(peaks)

    served = summarize(runs, args.concurrency)
    lo, hi = min(args.concurrency), max(args.concurrency)
    result = {"facts": facts, "matmul_peak_gflops": peak, "matmul_peaks_gflops": peaks,
              "flops_per_image": flops,
              "raw_flags": " ".join(raw_flags),
              "raw_images_per_second": raw, "served": served,
              "runs": runs}
    result["derived"] = derived(served, raw, flops, peak, lo, hi)
    print(markdown(result))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
