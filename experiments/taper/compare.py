"""The taper comparison's table and plot (docs/tapers.md): held-out perplexity of small runs over seeds
against the bf16 forward latency of the same profiles at the paper's size (bench.py's JSON).

    python experiments/taper/compare.py experiments/taper/runs/small_*_s* --bench out/bench/taper_bf16.json --out experiments/taper

A run named <scale>_<config>_s<seed> (experiments/study/run.sh names them small_...) is a seed of <config>; its
latency is bench.py's row for <config> (the basename of experiments/taper/1b/<config>.py, or vanilla_15l,
cascade_a2). Its perplexity is fanin.py's held-out evaluation (importance.json's baseline, what
experiments/study/aggregate.py and Table 2 use) when every run has one, else for every run the last 'val ppl'
of its log.txt (the CPU previews): one evaluation for the whole table, named in its header. The study's
A2 and Vanilla-15L seeds (experiments/study/runs/small_{cascade_a2,vanilla_15l}_s*) go beside the profiles as they
are. Each config's PPL is set against --ref's (Vanilla-15L: the profiles' FLOPs) with Welch's 95 % interval
and the exact permutation p. Where every run has its gradient dump and importance.json (the GPU runs), a
second table says how each config spreads the gradient and the importance over depth: Spearman of the
share with the linear fan-in and with the importance, layer 0's share and importance, and the last layer's
importance, means over seeds.
Writes taper_compare.md and .png, and taper_layers.png: each config's widths by layer and, for the GPU runs,
its gradient share and importance by layer.
"""
import argparse
import json
import os
import re
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from gfa import rundir  # noqa: E402
from gfa.cli import UserError, cli  # noqa: E402
from gfa.theory import mean_std, seed_difference, spearman_rho, theory_for  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


def final_ppl(run):
    if not os.path.isfile(rundir.file(run, rundir.LOG)):
        raise UserError(f"{run} has no log.txt: not a run directory (give train.py's --out_dir)")
    lines = [m for m in re.finditer(r"val ppl ([0-9.]+)", open(rundir.file(run, rundir.LOG)).read())]
    if not lines:
        raise UserError(f"{run}/log.txt has no 'val ppl' line (a run still training?)")
    return float(lines[-1].group(1))


def held_out_ppl(runs):
    """({run: PPL}, what evaluated it): fanin.py's (importance.json) if every run has it, else the logs'."""
    imp = {run: rundir.read_importance(run) for run in runs}
    if all(imp.values()):
        return {run: imp[run]["baseline"] for run in runs}, "fanin.py's evaluation"
    if any(imp.values()):
        print("note: some runs have no importance.json: every PPL is train.py's last evaluation instead")
    return {run: final_ppl(run) for run in runs}, "train.py's last evaluation"


def versus(a, b):
    """One config's PPL over seeds against the reference's: the difference of means with Welch's 95 % interval
    and the exact permutation p, or '-' below two seeds a side (what few seeds can and cannot tell apart)."""
    d = seed_difference(a, b)
    if d is None:
        return "-"
    interval = f"{d['low']:+.2f} to {d['high']:+.2f}; " if d["low"] is not None else ""
    return f"{d['diff']:+.2f} ({interval}p = {d['p']:.2f})"


def layer_data(members):
    """{config: [(share, importance, linear fan-in) by layer, one tuple per run]}, read once for the second table
    and the layer figure; None unless every run has its gradient dump and importance.json (the GPU runs)."""
    data = {}
    for name, runs in members.items():
        data[name] = []
        for run in runs:
            imp = rundir.read_importance(run)
            if not imp or not os.path.isfile(rundir.file(run, rundir.GRAD_DUMP)):
                return None
            fanin = theory_for(rundir.read_model_config(run)[1])[1]
            data[name].append((rundir.read_grad_dump(run)["share"], imp["importance"], fanin))
    return data


def seed_mean(rows):
    """The mean over seeds of equal-length rows, element by element."""
    return [sum(col) / len(col) for col in zip(*rows)]


def spread_table(data, order):
    """Markdown lines: per config, how its runs spread gradient and importance over the layers (means over
    seeds); none without layer data."""
    if data is None:
        return []
    stats = {name: seed_mean([(spearman_rho(share, fanin), spearman_rho(share, imp), 100 * share[0], imp[0], imp[-1])
                              for share, imp, fanin in runs]) for name, runs in data.items()}
    lines = ["", "How each config spreads the gradient and the importance over depth (means over its seeds; importance "
             "= PPL increase when the layer is passed through):", "",
             "| config | Spearman(share, linear fan-in) | Spearman(share, importance) | layer 0's share % | "
             "layer 0's importance | last layer's importance |", "|---|---|---|---|---|---|"]
    return lines + [f"| {n} | {st[0]:+.2f} | {st[1]:+.2f} | {st[2]:.1f} | {st[3]:,.0f} | {st[4]:.1f} |"
                    for n, st in ((n, stats[n]) for n in order)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories <scale>_<config>_s<seed>, e.g. small_cascade_a2_s1")
    ap.add_argument("--bench", help="bench.py --out JSON of the paper-size models (bf16)")
    ap.add_argument("--ref", default="vanilla_15l", help="the config whose PPL the others are compared with")
    ap.add_argument("--out", default="experiments/taper", help="folder for taper_compare.md, .png and taper_layers.png")
    args = ap.parse_args(argv)
    ppl, members, size, scales = defaultdict(list), defaultdict(list), {}, set()
    values, source = held_out_ppl(args.runs)
    for run in args.runs:
        m = re.fullmatch(r"([A-Za-z0-9]+)_(.+)_s\d+", os.path.basename(os.path.normpath(run)))
        if not m:
            raise UserError(f"{run}: not named <scale>_<config>_s<seed> (e.g. small_cascade_a2_s1)")
        scales.add(m.group(1))
        m = m.group(2)
        ppl[m].append(values[run])
        members[m].append(run)
        with torch.device("meta"):
            model = GPT(GPTConfig(**rundir.read_model_config(run)[1]))
        size[m] = (model.num_params(), model.flops_per_token())
    for name, runs in members.items():   # a config's runs are seeds of one experiment (gfa/rundir.py: identity)
        if len(runs) > 1:
            rundir.check_poolable(runs, option=name)
    scale = "/".join(sorted(scales))
    rows = json.load(open(args.bench))["rows"] if args.bench else []
    latency = {os.path.basename(r["config"]): r for r in rows if r.get("impl") == "ours" and "median_ms" in r}
    lines = [f"| config | params ({scale}) | fwd MFLOP/token ({scale}) | held-out PPL ({scale}, {source}, mean ± std) "
             f"| seeds | PPL - {args.ref} (Welch 95 %; permutation p) | "
             "bf16 latency ms (1.2B) | vs Vanilla-15L |", "|---|---|---|---|---|---|---|---|"]
    points, ref = [], ppl.get(args.ref, [])
    order = sorted(ppl, key=lambda n: mean_std(ppl[n])[0])
    for name in order:
        m, s = mean_std(ppl[name])
        b = latency.get(name, {})
        lat = f"{b['median_ms']:.2f}" if b else "-"
        rel = f"{b['latency_vs_ref_pct']:+.1f} %" if b.get("latency_vs_ref_pct") is not None else "-"
        ppl_cell = f"{m:.2f} ± {s:.2f}" if len(ppl[name]) > 1 else f"{m:.2f} (one seed)"
        lines.append(f"| {name} | {size[name][0] / 1e6:.2f}M | {size[name][1] / 1e6:.2f} | {ppl_cell} | "
                     f"{len(ppl[name])} | {'reference' if name == args.ref else versus(ppl[name], ref)} | "
                     f"{lat} | {rel} |")
        if b:
            points.append((name, b["median_ms"], m, s))
    data = layer_data(members)
    lines += spread_table(data, order)
    os.makedirs(args.out, exist_ok=True)
    open(os.path.join(args.out, "taper_compare.md"), "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))
    colors = {name: f"C{i % 10}" for i, name in enumerate(order)}   # one colour per config in both figures
    written = ["taper_compare.md", "taper_layers.png"]
    plot_layers(members, order, data, colors, args.out)
    if points:
        plot_tradeoff(points, colors, scale, args.out)
        written.append("taper_compare.png")
    print(f"wrote {', '.join(os.path.join(args.out, w) for w in written)}")


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_tradeoff(points, colors, scale, out):
    """taper_compare.png: each config's PPL (mean ± std over seeds) against its latency at the paper's size."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    near_x, near_y = 0.03 * (max(xs) - min(xs) or 1), 0.05 * (max(ys) - min(ys) or 1)
    for name, x, y, e in points:
        ax.errorbar([x], [y], yerr=[e], fmt="o", capsize=3, color=colors[name])
        # a label goes below its point when a close neighbour sits just above (A2 beside Vanilla-15L)
        crowded = any(0 < y2 - y < near_y and abs(x2 - x) < near_x for _, x2, y2, _ in points)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, -11 if crowded else 4), fontsize=8)
    ax.set_xlabel("bf16 forward latency at the paper's size, ms (bench.py)")
    ax.set_ylabel(f"held-out PPL at the {scale} scale (mean ± std)")
    ax.set_title("Width profiles at the training FLOPs of Vanilla-15L")
    ax.grid(alpha=0.3)
    fig.savefig(os.path.join(out, "taper_compare.png"), dpi=130, bbox_inches="tight")
    plt.close(fig)


def plot_layers(members, order, data, colors, out):
    """taper_layers.png: per config, its heads and FFN sizes by layer and, with layer data (the GPU runs), the
    gradient share and the importance by layer, means over seeds."""
    plt = pyplot()
    rows = 1 if data is None else 2
    fig, axes = plt.subplots(rows, 2, figsize=(11, 3.8 * rows), squeeze=False)
    for name in order:
        cfg = GPTConfig(**rundir.read_model_config(members[name][0])[1])
        panels = [cfg.layer_heads(), cfg.layer_ffn()]
        if data is not None:
            panels += [seed_mean([share for share, _, _ in data[name]]), seed_mean([imp for _, imp, _ in data[name]])]
        for ax, ys in zip(axes.flat, panels):
            ax.plot(range(len(ys)), ys, marker="o", ms=3, label=name, color=colors[name])
    titles = ["attention heads", "FFN size", "gradient share (Eq. 2, accumulated)",
              "importance: PPL increase when passed through"]
    for ax, title in zip(axes.flat, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    if data is not None:
        axes[1, 1].set_yscale("symlog", linthresh=1)   # layer 0's thousands beside the late layers' units
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("Each config's layers (means over seeds)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "taper_layers.png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    cli(main)
