"""Plots the training curves of the teacher and the DMD runs (needs python3-matplotlib).

  /usr/bin/python3 -m training.plot_curves \
      --teacher "2400 steps=training/checkpoints/teacher.json" \
      --teacher "continued, text encoder frozen=training/checkpoints/teacher_8400.json" \
      --dmd "DMD + regression, 2048 pairs=training/checkpoints/ablation/dmd_first_10603.json" \
      --dmd "continued on 16384 pairs=training/checkpoints/ablation/dmd_second_14603.json" \
      --dmd "continued on 8192 fresh pairs, EMA 0.999=training/checkpoints/ablation/dmd_third_29603.json" \
      --dmd "restarted from its average (seed 3)=training/checkpoints/ablation/dmd_restart_32603.json" \
      --dmd "restarted again (seed 4)=training/checkpoints/ablation/dmd_restart2_37603.json" \
      --dmd "re-distilled, 8400-step teacher (CFG 1.75 from 61203)=training/checkpoints/dmd.json" \
      --dmd "continued on 2048 pairs (control)=training/checkpoints/ablation/dmd_pairs_2048_control.json" \
      --dmd "DMD (TTUR only)=training/checkpoints/ablation/dmd_ttur.json" \
      --out docs/images/training-curves.png
"""

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load_labelled(item):
    """"LABEL=path.json" -> (LABEL, the parsed summary)."""
    if "=" not in item:
        raise SystemExit(f"expected LABEL=summary.json, got {item!r}")
    label, path = item.split("=", 1)
    with open(path) as f:
        return label, json.load(f)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--teacher", action="append", required=True,
                   help="LABEL=train_teacher summary (.json); a continuation (--init) is drawn "
                        "from its checkpoint's step (init_steps)")
    p.add_argument("--dmd", action="append", default=[], help="LABEL=train_dmd summary (.json)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    teachers = [load_labelled(item) for item in args.teacher]
    runs = [load_labelled(item) for item in args.dmd]

    fig, axes = plt.subplots(1, 4, figsize=(20, 6.5))
    for label, teacher in teachers:
        offset = teacher.get("init_steps", 0)
        steps, loss = zip(*teacher["loss_curve"])
        axes[0].plot([offset + s for s in steps], loss, label=label)
    axes[0].set(title="teacher: denoising loss (eps MSE)", xlabel="step", yscale="log")
    axes[0].legend(fontsize=8)
    for label, run in runs:
        # A run started from another's checkpoint (--init) continues its steps.
        offset = run.get("init_steps", 0)
        steps = [offset + c[0] for c in run["curve"]]
        axes[1].plot(steps, [c[1]["fake"] for c in run["curve"]], label=f"{label}: fake score")
        if any(c[1]["reg"] for c in run["curve"]):
            axes[1].plot(steps, [c[1]["reg"] for c in run["curve"]], label=f"{label}: regression")
        ev = run["evals"]
        heldout = [e for e in ev if "reg_heldout" in e]
        if heldout:
            axes[1].plot([offset + e["step"] for e in heldout],
                         [e["reg_heldout"] for e in heldout], linestyle="--",
                         label=f"{label}: regression, held-out pairs (EMA G)")
        ev_steps = [offset + e["step"] for e in ev]
        axes[2].plot(ev_steps, [e["fid"] for e in ev], marker="o", label=label)
        axes[3].plot(ev_steps, [e["class_accuracy"] for e in ev], marker="o", label=label)
    axes[1].set(title="DMD: fake-score and regression losses", xlabel="generator step",
                yscale="log")
    axes[2].set(title="DMD one-step FID (500 images, in-process)", xlabel="generator step",
                yscale="log")
    axes[3].set(title="DMD one-step class accuracy", xlabel="generator step", ylim=(0, 1))
    # Many runs share the loss panel: its legend goes below the plots.
    axes[1].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=1)
    for ax in axes[2:]:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].grid(alpha=0.3)
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)


if __name__ == "__main__":
    main()
