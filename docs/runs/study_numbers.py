"""The derived figures docs/RESULTS.md quotes for Figure 5, the share drift and Table 2's perplexity column,
from the committed study runs (no GPU, seconds):

    python docs/runs/study_numbers.py            # after fanin.py wrote docs/figs/study_drift/fanin_summary.json

Figure 5: per run, the held-out PPL of fanin.py's importance evaluation, the summed importance (PPL
increase when the layer is passed through) of the late layers, and their share of layers 1..N-1's sum
(layer 0 is left out: it is vital in every run and would swamp the sums). Share drift: per run, the
Spearman correlation of the share accumulated up to step t with the linear fan-in at steps 100, 200, 500
and 1000, and the first step at which it is below zero. Table 2's PPL column: the held-out PPL of each
config over its seeds (fanin.py's evaluation); CascadeFormer-A2 against Vanilla-15L (equal training
FLOPs), and both against Vanilla-16L (how much one layer more buys, the scale of the paper's claim), each
as the difference of the means with an exact permutation p-value and Welch's 95 % interval; and what
difference 2, 3, 5 or 10 seeds a side could resolve at Vanilla-16L's seed spread.
"""
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STUDY = os.path.join(ROOT, "docs", "runs", "study")
sys.path.insert(0, ROOT)
from gfa import rundir, theory  # noqa: E402

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
        at = lambda t: rho[max(i for i, s in enumerate(steps) if s <= t)]
        below = next((s for s, v in zip(steps, rho) if v < 0), None)
        yield r["name"], [at(t) for t in (100, 200, 500, 1000)], below, r["drift"]["settled"]


def table2_ppl():
    """{config: [held-out PPL of each seed]} for the configs of Table 2's PPL column, and Vanilla-8L."""
    ppl = {c: [] for c in ("vanilla_16l", "vanilla_15l", "cascade_a2", "vanilla_8l")}   # 8L: what depth buys
    for run in sorted(os.listdir(STUDY)):
        m = re.fullmatch(r"small_(.+)_s\d+", run)
        imp = rundir.read_importance(os.path.join(STUDY, run)) if m and m.group(1) in ppl else None
        if imp:
            ppl[m.group(1)].append(imp["baseline"])
    return ppl


def compare(a, b, pa, pb):
    """One line: mean(pa) - mean(pb) with the exact permutation p and Welch's 95 % interval (also in % of b)."""
    if len(pa) < 2 or len(pb) < 2:
        return f"{a} vs {b}: {len(pa)} and {len(pb)} seed(s) so far; the tests need two of each"
    diff, p = theory.permutation_test(pa, pb)
    _, low, high, df = theory.welch_interval(pa, pb)
    base = sum(pb) / len(pb)
    return (f"{a} - {b}: {diff:+.2f} PPL (exact permutation p = {p:.2f}); Welch 95 % interval {low:+.2f} to "
            f"{high:+.2f} PPL ({100 * low / base:+.1f} % to {100 * high / base:+.1f} % of {b}'s mean; df {df:.1f})")


def resolution(values, seeds=(2, 3, 5, 10)):
    """Welch's 95 % half-width for two configs of this spread (values: one config over its seeds), with n
    seeds a side (equal spreads: df = 2n - 2), in % of the mean: what difference n seeds can resolve."""
    mean, std = theory.mean_std(values)
    return {n: 100 * theory.t_quantile(0.975, 2 * n - 2) * std * (2 / n) ** 0.5 / mean for n in seeds}


def main():
    print("run | held-out PPL | late layers' summed dPPL | their share of layers 1..N-1")
    for run in sorted(os.listdir(STUDY)):
        imp = rundir.read_importance(os.path.join(STUDY, run))
        if imp:
            ppl, late, share = late_importance(imp)
            print(f"{run} | {ppl:.2f} | {late:.1f} | {100 * share:.0f} %")
    summary = os.path.join(ROOT, "docs", "figs", "study_drift", "fanin_summary.json")
    print("\nrun | Spearman(share to step t, fan-in) at t = 100 / 200 / 500 / 1000 | first step below 0 | settles")
    for name, rhos, below, settled in drift_rows(summary):
        print(f"{name} | {' / '.join(f'{v:.2f}' for v in rhos)} | {below} | {settled}")
    ppl = table2_ppl()
    print("\nconfig | seeds | held-out PPL (mean ± std)")
    for config, values in ppl.items():
        if values:
            spread = "%.2f ± %.2f" % theory.mean_std(values) if len(values) > 1 else f"{values[0]:.2f} (one seed)"
            print(f"{config} | {len(values)} | {spread}")
    for a, b in (("cascade_a2", "vanilla_15l"), ("cascade_a2", "vanilla_16l"), ("vanilla_15l", "vanilla_16l")):
        print(compare(a, b, ppl[a], ppl[b]))
    if len(ppl["vanilla_16l"]) > 1:
        half = resolution(ppl["vanilla_16l"])
        print("resolvable at Vanilla-16L's seed spread (Welch 95 % half-width, % of its mean), n seeds a side: "
              + ", ".join(f"n = {n}: ± {h:.1f} %" for n, h in half.items()))


if __name__ == "__main__":
    main()
