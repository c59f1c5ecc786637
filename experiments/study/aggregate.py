"""The derived figures docs/RESULTS.md quotes for Figure 5, the share drift and Table 2's perplexity column,
from the committed study runs (no GPU, seconds):

    python experiments/study/aggregate.py            # after fanin.py wrote experiments/study/figs/<DRIFT_FIGS>/fanin_summary.json
    python experiments/study/aggregate.py --fig experiments/study/figs/overview.png    # and the overview figure

Figure 5: per run, the held-out PPL of fanin.py's importance evaluation, the summed importance (PPL
increase when the layer is passed through) of the late layers, and their share of layers 1..N-1's sum
(layer 0 is left out: it is vital in every run and would swamp the sums). Share drift: per run, the
Spearman correlation of the share accumulated up to step t with the linear fan-in at steps 100, 200, 500
and 1000, and the first step at which it is below zero. Table 2's PPL column: the held-out PPL of each
config over its seeds (fanin.py's evaluation); CascadeFormer-A2 against Vanilla-15L (equal training
FLOPs), both against Vanilla-16L (how much one layer more buys, the scale of the paper's claim), and
Vanilla-16L under Mix-LN, LayerNorm scaling and the scaled init against Pre-LN, each as the difference of the means with
an exact permutation p-value and Welch's 95 % interval; and what difference 2, 3, 5 or 10 seeds a side
could resolve at Vanilla-16L's seed spread. The overview figure
(--fig): the 16-layer configs side by side, share and importance per layer (mean and range over the
seeds) against the linear and the quadratic fan-in.
"""
import argparse
import json
import os
import re
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STUDY = os.path.join(ROOT, "experiments", "study", "runs")
sys.path.insert(0, ROOT)
from gfa import rundir, theory  # noqa: E402
from gfa.cli import UserError, cli  # noqa: E402

# the overview figure's configs, (run-name stem, label): Vanilla-16L and the 16-layer runs that change one thing
OVERVIEW = (("vanilla_16l", "Pre-LN (Vanilla-16L)"), ("layerskip", "deep supervision (LayerSkip)"),
            ("vanilla_16l_mixln", "Mix-LN"), ("vanilla_16l_lns", "LayerNorm scaling"),
            ("equalize", "norms equalised"), ("vanilla_16l_scaledinit", "scaled init"))

# fanin.py's figure folders whose fanin_summary.json the share-drift rows come from: the Pre-LN runs and Vanilla-8L
# (experiments/study/figs/drift), then the 16-layer runs that change one thing, their seeds together
DRIFT_FIGS = ("drift", "mixln_seeds", "lns_seeds", "scaledinit_seeds")


# Table 2 of the paper: Vanilla-15L's perplexity is 0.85 % above Vanilla-16L's (one layer's worth)
PAPER_ONE_LAYER = 0.0085


def late_importance(imp):
    """Figure 5's late layers are the second half: 8-15 of 16, the repeated 4-7 of 8 (7-14 of 15)."""
    d = imp["importance"]
    late = sum(d[len(d) // 2:])
    return imp["baseline"], late, late / sum(d[1:])


def drift_rows(summary):
    with open(summary) as f:
        runs = json.load(f)["runs"]
    for r in runs:
        steps, rho = r["drift"]["steps"], r["drift"]["rho_theory"]
        at = [rho[max(i for i, s in enumerate(steps) if s <= t)] for t in (100, 200, 500, 1000)]
        below = next((s for s, v in zip(steps, rho) if v < 0), None)
        yield r["name"], at, below, r["drift"]["settled"]


def seed_runs(config, study=STUDY):
    """The run directories small_<config>_s<seed> of the study, in seed order."""
    runs = [(int(m.group(1)), os.path.join(study, name)) for name in os.listdir(study)
            if (m := re.fullmatch(rf"small_{re.escape(config)}_s(\d+)", name))]
    return [run for _, run in sorted(runs)]


def table2_ppl():
    """{config: [held-out PPL of each seed]} for the configs of Table 2's PPL column, Vanilla-8L (what depth
    buys), Vanilla-16L under the other norm placements (Mix-LN, LayerNorm scaling) and under the scaled init."""
    ppl = {}
    for config in ("vanilla_16l", "vanilla_15l", "cascade_a2", "vanilla_8l", "vanilla_16l_mixln", "vanilla_16l_lns",
                   "vanilla_16l_scaledinit"):
        runs = [run for run in seed_runs(config) if rundir.read_importance(run)]
        if len(runs) > 1:   # seeds of one experiment (gfa/rundir.py: identity), each once
            rundir.check_poolable(runs, option=config)
        ppl[config] = [rundir.read_importance(run)["baseline"] for run in runs]
    return ppl


def profiles(config, study=STUDY):
    """Per-layer gradient share (%) and importance (PPL increase) of every seed of a config with both:
    two arrays (seeds, layers)."""
    share, imp = [], []
    for run in seed_runs(config, study):
        importance = rundir.read_importance(run)
        if importance:
            share.append(100 * np.asarray(rundir.read_grad_dump(run)["share"]))
            imp.append(importance["importance"])
    return np.array(share), np.array(imp)


def overview_figure(path, configs=OVERVIEW, study=STUDY):
    """Share (left) and importance (right, log) per layer for the configs, mean with the seeds' range."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    n = None
    for config, label in configs:
        share, imp = profiles(config, study)
        if len(share) == 0:
            continue
        n, layers = share.shape[1], np.arange(share.shape[1])
        text = f"{label}, {len(share)} seed{'s' * (len(share) > 1)}"
        for ax, values in ((left, share), (right, np.maximum(imp, 1e-3))):   # the log axis: no PPL increase <= 0
            line, = ax.plot(layers, values.mean(0), marker="o", ms=3, label=text)
            ax.fill_between(layers, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
    if n is None:
        raise UserError(f"no run of {[c for c, _ in configs]} with importance under {study}: "
                        "run fanin.py on them first")
    for fan_in, style, label in ((theory.fanin_plain(n), "--", "linear fan-in"),
                                 (theory.fanin_deep_supervision(n), ":", "quadratic fan-in")):
        left.plot(np.arange(n), 100 * np.asarray(fan_in) / sum(fan_in), "k" + style, lw=1, label=label)
    left.set(xlabel="layer", ylabel="gradient share (Eq. 2), %", title="where the gradient goes")
    right.set(xlabel="layer", ylabel="PPL increase when skipped", yscale="log", title="what each layer is worth")
    left.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def compare(a, b, pa, pb):
    """One line: mean(pa) - mean(pb) with the exact permutation p and Welch's 95 % interval (also in % of b)."""
    d = theory.seed_difference(pa, pb)
    if d is None:
        return f"{a} vs {b}: {len(pa)} and {len(pb)} seed(s) so far; the tests need two of each"
    line = f"{a} - {b}: {d['diff']:+.2f} PPL (exact permutation p = {d['p']:.2f})"
    if d["low"] is None:
        return line + "; neither varies over its seeds, so there is no Welch interval"
    base = sum(pb) / len(pb)
    return (line + f"; Welch 95 % interval {d['low']:+.2f} to {d['high']:+.2f} PPL ({100 * d['low'] / base:+.1f} % "
            f"to {100 * d['high'] / base:+.1f} % of {b}'s mean; df {d['df']:.1f})")


def resolution(values, seeds=(2, 3, 5, 10)):
    """Welch's 95 % half-width for two configs of this spread (values: one config over its seeds), with n
    seeds a side (equal spreads: df = 2n - 2), in % of the mean: what difference n seeds can resolve."""
    mean, std = theory.mean_std(values)
    return {n: 100 * theory.t_quantile(0.975, 2 * n - 2) * std * (2 / n) ** 0.5 / mean for n in seeds}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fig", help="also write the overview figure to this path")
    args = ap.parse_args(argv)
    print("run | held-out PPL | late layers' summed dPPL | their share of layers 1..N-1")
    for run in sorted(os.listdir(STUDY)):
        imp = rundir.read_importance(os.path.join(STUDY, run))
        if imp:
            ppl, late, share = late_importance(imp)
            print(f"{run} | {ppl:.2f} | {late:.1f} | {100 * share:.0f} %")
    print("\nrun | Spearman(share to step t, fan-in) at t = 100 / 200 / 500 / 1000 | first step below 0 | settles")
    for folder in DRIFT_FIGS:
        for name, rhos, below, settled in drift_rows(os.path.join(ROOT, "experiments", "study", "figs", folder, "fanin_summary.json")):
            print(f"{name} | {' / '.join(f'{v:.2f}' for v in rhos)} | {below} | {settled}")
    ppl = table2_ppl()
    print("\nconfig | seeds | held-out PPL (mean ± std)")
    for config, values in ppl.items():
        if values:
            spread = "%.2f ± %.2f" % theory.mean_std(values) if len(values) > 1 else f"{values[0]:.2f} (one seed)"
            print(f"{config} | {len(values)} | {spread}")
    for a, b in (("cascade_a2", "vanilla_15l"), ("cascade_a2", "vanilla_16l"), ("vanilla_15l", "vanilla_16l"),
                 ("vanilla_16l_mixln", "vanilla_16l"), ("vanilla_16l_lns", "vanilla_16l"),
                 ("vanilla_16l_scaledinit", "vanilla_16l")):
        print(compare(a, b, ppl[a], ppl[b]))
    if len(ppl["vanilla_16l"]) > 1:
        half = resolution(ppl["vanilla_16l"])
        print("resolvable at Vanilla-16L's seed spread (Welch 95 % half-width, % of its mean), n seeds a side: "
              + ", ".join(f"n = {n}: ± {h:.1f} %" for n, h in half.items()))
        mean, std = theory.mean_std(ppl["vanilla_16l"])
        n = theory.seeds_for_power(std / mean, PAPER_ONE_LAYER)
        print(f"seeds a side for 80 % power (two-sided, 5 %) against the paper's one-layer difference "
              f"(+{100 * PAPER_ONE_LAYER:.2f} % PPL) at Vanilla-16L's spread ({100 * std / mean:.2f} %): {n}")
    print("\nprovenance (the command that started each run):")
    for run in sorted(os.listdir(STUDY)):
        if os.path.isfile(rundir.file(os.path.join(STUDY, run), rundir.MODEL_CONFIG)):
            print(f"{run}: {rundir.provenance_summary(os.path.join(STUDY, run))}")
    if args.fig:
        overview_figure(args.fig)


if __name__ == "__main__":
    cli(main)
