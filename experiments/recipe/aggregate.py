"""The recipe study's numbers and figures (experiments/recipe/README.md), from the committed runs, in seconds:

    python experiments/recipe/aggregate.py       # prints the tables, draws the two figures into experiments/recipe/

Arms: every run small_vanilla_16l_<arm>_s<seed> under experiments/recipe/runs/, and the small study's own
Vanilla-16L seeds (experiments/study/runs/small_vanilla_16l_s<seed>) as the arm 'lr1e-3 (study)'. Per run:
rho(share, linear fan-in) of the accumulated Eq. 2 share with its permutation p (rule 1 of the page), the
importance of layers 8-15 as a part of layers 1-15's sum, rho(share, importance), held-out PPL (fanin.py's
float32 evaluation, and train.py's last bf16 evaluation). Per arm: whether it keeps or overturns the fan-in's
order (rule 1). Matched loss (rule 3): each study run's accumulated and windowed share at the step where its
held-out PPL (train.py's evaluations, log-PPL interpolated linearly in the step between them) equals the
lr2e-4 arm's mean final PPL. Figures: recipe_drift.png (rho with the fan-in of the accumulated and of the
windowed share against the step, the lr schedule under it) and recipe_matched.png (rho of the accumulated
share against held-out PPL at each evaluation).
The equalisation at 2e-4 (rule 7): each equalised arm against its baseline (EQUALISED), late-layer importance
per seed, the verdict, PPL, and the mean equalisation factor of layers 8-15 (from the dumped norms); an arm
whose runs all stopped non-finite is read from their console logs (runs/logs/<arm>_s<seed>.txt). The SGD
sweep (rule 6): held-out PPL of each peak lr under runs/sgd_sweep/ and the one picked;
`--sgd_args=picked` prints the SGD arms' train.py arguments at that lr (run.sh passes them), or says why
there is no pick yet.
"""
import argparse
import math
import os
import re
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.join(ROOT, "experiments", "recipe")
sys.path.insert(0, ROOT)
from gfa import rundir, theory  # noqa: E402
from gfa.cli import UserError, cli  # noqa: E402

STUDY_ARM = "lr1e-3 (study)"
PAPER_ARM = "lr2e-4"
EQUALISED = {"eq_lr2e-4": "lr2e-4", "lns_eq_lr2e-4": "lns_lr2e-4", "eq_mean_lr2e-4": "lr2e-4",
             "lns_eq_mean_lr2e-4": "lns_lr2e-4", "sgd_eq": "sgd", "lns_sgd_eq": "lns_sgd"}
NON_FINITE = re.compile(r"^error: non-finite loss or gradient at step (\d+)", re.M)   # train.py's stop
SWEEP_STEP = 500   # rule 6: the SGD sweep compares held-out loss at this step
SWEEP_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)   # rule 6's peak lrs, written down before the sweep ran
WINDOW = 100   # steps: the windowed ("instantaneous") share is Eq. 2 over the last WINDOW steps
LOG_LINE = re.compile(r"^step (\d+) \| (?:val loss [\d.]+ \| val ppl ([\d.]+)|loss [\d.]+ \| lr ([\d.e+-]+))")


def find_runs(recipe_runs, study_runs):
    """{arm: [run dirs in seed order]}: the recipe arms, then the study's Vanilla-16L as the 1e-3 arm."""
    arms = {}
    for folder, pattern in ((recipe_runs, r"small_vanilla_16l_(.+)_s(\d+)"), (study_runs, r"small_vanilla_16l_s(\d+)")):
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            m = re.fullmatch(pattern, name)
            if m:
                arm, seed = (m.group(1), m.group(2)) if m.lastindex == 2 else (STUDY_ARM, m.group(1))
                arms.setdefault(arm, []).append((int(seed), os.path.join(folder, name)))
    if PAPER_ARM not in arms:
        raise UserError(f"no run of the {PAPER_ARM} arm under {recipe_runs}: train it with experiments/recipe/run.sh")
    arms = {arm: [run for _, run in sorted(runs)] for arm, runs in arms.items()}
    for arm, runs in arms.items():   # an arm's runs are seeds of one experiment (gfa/rundir.py: identity)
        rundir.check_poolable(runs, option=f"the arm {arm}")
    return arms


def read_log(run):
    """(evaluation steps, held-out PPL at them, logged steps, lr at them) from train.py's log.txt."""
    ev, ppl, st, lr = [], [], [], []
    with open(rundir.file(run, rundir.LOG)) as f:
        for line in f:
            m = LOG_LINE.match(line)
            if m and m.group(2):
                ev.append(int(m.group(1)))
                ppl.append(float(m.group(2)))
            elif m and m.group(3):
                st.append(int(m.group(1)))
                lr.append(float(m.group(3)))
    return np.array(ev), np.array(ppl), np.array(st), np.array(lr)


def analyse(run):
    """One run's figures (see the module docstring)."""
    dump = rundir.read_grad_dump(run)
    _, fanin, _ = theory.theory_for(rundir.read_model_config(run)[1])
    share, imp = dump["share"], rundir.read_importance(run)
    cols = [i for i, n in enumerate(dump["names"]) if n.startswith("layer.")]
    norms = np.asarray(dump["norms"], dtype=np.float64)[:, cols]
    acc = np.cumsum(norms, axis=0)
    win = acc - np.vstack([np.zeros((WINDOW, len(cols))), acc[:-WINDOW]])
    steps = np.asarray(dump["steps"])
    rho, p = theory.spearman(share, fanin)
    d = imp["importance"]
    ev, ppl, st, lr = read_log(run)
    return {"run": run, "steps": steps, "fanin": fanin, "rho": rho, "p": p,
            "late": sum(d[len(d) // 2:]) / sum(d[1:]), **dict(zip(("rho_imp", "p_imp"), theory.spearman(share, d))),
            "ppl": imp["baseline"], "log_ppl": ppl[-1], "late_factor": late_factor(norms),
            "eval_steps": ev, "eval_ppl": ppl, "lr_steps": st, "lr": lr,
            "rho_acc": np.array([theory.spearman_rho(a, fanin) for a in acc]),
            "rho_win": np.array([theory.spearman_rho(w, fanin) if i >= WINDOW - 1 else np.nan
                                 for i, w in enumerate(win)])}


def arm_verdict(runs):
    """Rule 1 of the page: 'keeps' (rho > 0 with p < 0.05 in every seed), 'overturns' (rho < 0 in every seed), 'mixed'."""
    if all(r["rho"] > 0 and r["p"] < 0.05 for r in runs):
        return "keeps"
    return "overturns" if all(r["rho"] < 0 for r in runs) else "mixed"


def step_at_ppl(r, target):
    """The step at which the run's held-out PPL falls to target (log-PPL linear in the step between
    evaluations), or None if it never does."""
    ev, lp = r["eval_steps"], np.log(r["eval_ppl"])
    for i in range(1, len(ev)):
        if lp[i] <= np.log(target) <= lp[i - 1]:
            f = (lp[i - 1] - np.log(target)) / (lp[i - 1] - lp[i])
            return int(round(ev[i - 1] + f * (ev[i] - ev[i - 1])))
    return None


def first_below_zero(r):
    """The first step at which the windowed share's rho with the fan-in is negative, or 'never'."""
    below = np.flatnonzero(np.nan_to_num(r["rho_win"], nan=1.0) < 0)
    return int(r["steps"][below[0]]) if len(below) else "never"


def restore_verdict(equalised, baseline):
    """Rule 7 of the page, on late-layer importance (layers 8-15's part of 1-15's ΔPPL), one value per seed."""
    if all(x > max(baseline) for x in equalised):
        return "restores"
    if all(x < min(baseline) for x in equalised):
        return "lowers"
    return "does not restore" if all(x <= np.mean(baseline) for x in equalised) else "inconclusive"


def late_factor(norms):
    """Mean over steps of the equalisation factor (largest layer norm / the layer's own) of the late half of the
    layers (1 where a norm is 0, as GradStep has it); norms: [steps, layers]."""
    with np.errstate(divide="ignore"):
        factor = np.where(norms > 0, norms.max(axis=1, keepdims=True) / norms, 1.0)
    return float(factor[:, norms.shape[1] // 2:].mean())


def diverged_runs(logs):
    """{arm: [(seed, step)]}: the equalised arms' runs whose console log (<logs>/<arm>_s<seed>.txt) ends in
    train.py's non-finite stop at that step. They leave no run to analyse, so rule 7 reads their logs."""
    out = {}
    for name in sorted(os.listdir(logs)) if os.path.isdir(logs) else []:
        m = re.fullmatch(r"(.+)_s(\d+)\.txt", name)
        if m and m.group(1) in EQUALISED:
            with open(os.path.join(logs, name)) as f:
                hit = NON_FINITE.search(f.read())
            if hit:
                out.setdefault(m.group(1), []).append((int(m.group(2)), int(hit.group(1))))
    return out


def equalisation_table(results, diverged=None):
    """Rule 7's rows: each equalised arm with runs (or with diverged runs only), against its baseline."""
    diverged = diverged or {}
    rows = [(eq, base) for eq, base in EQUALISED.items() if (eq in results or eq in diverged) and base in results]
    if not rows:
        return []
    out = ["", "Equalisation at 2e-4 (rule 7): late-layer importance = layers 8-15's part of layers 1-15's ΔPPL, per seed; "
           "the factor: mean over steps of the largest layer gradient norm over the layer's own, layers 8-15", "",
           "| equalised arm | baseline | late importance, equalised | baseline | rule 7 | PPL equalised | PPL baseline | "
           "ΔPPL | late factor (equalised / baseline) |", "|---|---|---|---|---|---|---|---|---|"]
    for eq, base in rows:
        b = [r["late"] for r in results[base]]
        if eq not in results:   # every run stopped non-finite
            stops = ", ".join(f"seed {seed} at step {step}" for seed, step in diverged[eq])
            out.append(f"| {eq} | {base} | none: non-finite ({stops}) | {' / '.join(f'{100 * x:.0f}' for x in b)} % | "
                       f"no verdict (diverged) | - | {np.mean([r['ppl'] for r in results[base]]):.2f} | - | "
                       f"- / {np.mean([r['late_factor'] for r in results[base]]):.2f} |")
            continue
        e = [r["late"] for r in results[eq]]
        pe, pb = (float(np.mean([r["ppl"] for r in results[a]])) for a in (eq, base))
        flag = " (destabilised: > 5 %)" if pe > 1.05 * pb else ""
        fe, fb = (np.mean([r["late_factor"] for r in results[a]]) for a in (eq, base))
        out.append(f"| {eq} | {base} | {' / '.join(f'{100 * x:.0f}' for x in e)} % | "
                   f"{' / '.join(f'{100 * x:.0f}' for x in b)} % | {restore_verdict(e, b)} | {pe:.2f} | {pb:.2f} | "
                   f"{100 * (pe / pb - 1):+.1f} %{flag} | {fe:.2f} / {fb:.2f} |")
    return out


def sgd_settings(lr):
    """The SGD arms' lr-dependent settings at peak lr (rule 6): min lr lr / 100, torch's coupled weight decay
    2e-5 / lr (the per-step shrink AdamW's 0.1 gives at 2e-4), as train.py arguments."""
    return f"--learning_rate={lr:g} --min_lr={lr / 100:g} --weight_decay={2e-5 / lr:g}"


def positive_lr(text):
    try:
        lr = float(text)
    except ValueError:
        lr = -1.0
    if not (lr > 0 and math.isfinite(lr)):
        raise UserError(f"--sgd_args={text}: give a peak lr > 0 (e.g. 0.3) or 'picked'")
    return lr


def read_sweep(folder):
    """{peak lr: ({evaluation step: held-out PPL}, weight decay)} of the sweep's runs under folder."""
    runs = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        m = re.fullmatch(r"small_vanilla_16l_sgd_lr([\d.e+-]+)_s\d+", name)
        if m:
            run = os.path.join(folder, name)
            ev, ppl, _, _ = read_log(run)
            runs[float(m.group(1))] = (dict(zip(ev.tolist(), ppl.tolist())),
                                       rundir.read_identity(run)["recipe"]["weight_decay"])
    return runs


def sweep_best(runs):
    """(the lr with the lowest held-out PPL at SWEEP_STEP, rule 6's word for it)."""
    at = {lr: v.get(SWEEP_STEP, math.inf) for lr, (v, _) in runs.items()}
    best = min(at, key=at.get)
    return best, (sweep_pick(best, runs) if math.isfinite(at[best]) else f"no lr reached step {SWEEP_STEP}")


def picked_lr(folder):
    """The SGD arms' lr: the sweep's pick, or a UserError saying why there is none yet."""
    runs = read_sweep(folder)
    if not runs:
        raise UserError(f"no SGD sweep under {folder}: run experiments/recipe/sgd_sweep.sh first")
    best, word = sweep_best(runs)
    if word != "picked":
        raise UserError(f"the SGD sweep has picked no lr yet (best {best:g}: {word}): run the lrs it needs with "
                        f"experiments/recipe/sgd_sweep.sh")
    return best


def sweep_table(folder):
    """Rule 6's rows: held-out PPL of each SGD peak lr at its evaluations, and the pick (lowest at SWEEP_STEP)."""
    runs = read_sweep(folder)
    if not runs:
        return []
    best, pick = sweep_best(runs)
    steps = sorted({s for v, _ in runs.values() for s in v if s > 0})
    out = ["", f"SGD sweep (rule 6; Vanilla-16L seed 1, momentum 0.9, the first {SWEEP_STEP} steps of the 3000-step "
           f"schedule): held-out PPL", "", "| peak lr | weight decay | " + " | ".join(f"step {s}" for s in steps) + " | |",
           "|---|---|" + "---|" * len(steps) + "---|"]
    for lr in sorted(runs):
        ppl, wd = runs[lr]
        cells = " | ".join(f"{ppl[s]:.2f}" if s in ppl else "-" for s in steps)
        out.append(f"| {lr:g} | {wd:g} | {cells} | {pick if lr == best else ''} |")
    return out


def sweep_pick(best, runs):
    """Rule 6's word for the lowest PPL at SWEEP_STEP: 'picked' only once the whole grid has run and the best
    is not at its end (a larger or smaller lr that ran, even one that diverged, bounds it)."""
    missing = [lr for lr in SWEEP_GRID if lr not in runs]
    if missing:
        return "best so far (not run: " + ", ".join(f"{lr:g}" for lr in missing) + ")"
    if best in (min(runs), max(runs)):
        return "at the grid's end: extend it ~3x that way"
    return "picked"


def lr_at(r, step):
    """The lr train.py logged nearest to step."""
    return r["lr"][int(np.abs(r["lr_steps"] - step).argmin())]


def back_above_zero(r):
    """After the windowed share's rho first turns negative: the first step from which it stays >= 0 to the
    end, with the lr there ('-' if it never turns negative, 'never' if it does not come back)."""
    neg = np.flatnonzero(np.nan_to_num(r["rho_win"], nan=1.0) < 0)
    if not len(neg):
        return "-"
    if neg[-1] == len(r["steps"]) - 1:
        return "never"
    step = int(r["steps"][neg[-1] + 1])
    return f"{step} (lr {lr_at(r, step):.1e})"


def lowest_windowed(r):
    """The windowed share's lowest rho with the fan-in, with its step and the lr there."""
    i = int(np.nanargmin(r["rho_win"]))
    step = int(r["steps"][i])
    return f"{r['rho_win'][i]:+.2f} at {step} (lr {lr_at(r, step):.1e})"


def fmt(mean_sd, digits=2, n=2):
    """mean ± sample sd; one seed has no spread: its value alone."""
    m, s = mean_sd
    return f"{m:.{digits}f} ± {s:.{digits}f}" if n > 1 else f"{m:.{digits}f}"


def tables(results, sweep=(), diverged=None):
    """numbers.md's text: per-arm summary, per-run rows, the matched-loss rows, the equalisation, the SGD sweep."""
    out = ["Recipe study (experiments/recipe/README.md)", "",
           "| arm | seeds | rho(share, fan-in) | rule 1 | layers 8-15 of 1-15's ΔPPL | rho(share, ΔPPL) | held-out PPL |",
           "|---|---|---|---|---|---|---|"]
    for arm, runs in results.items():
        ms = lambda key: theory.mean_std([r[key] for r in runs])  # noqa: E731
        late = (100 * ms("late")[0], 100 * ms("late")[1])
        out.append(f"| {arm} | {len(runs)} | {fmt(ms('rho'), n=len(runs))} | {arm_verdict(runs)} | "
                   f"{fmt(late, 0, len(runs))} % | {fmt(ms('rho_imp'), n=len(runs))} | {fmt(ms('ppl'), n=len(runs))} |")
    out += ["", "Per run (p: permutation p of rho, 200,000 permutations; PPL: fanin.py's float32 evaluation / "
            "train.py's last bf16 one):", "",
            "| run | rho(share, fan-in) | p | layer 0 share | last layer share | 8-15 of ΔPPL | last layer ΔPPL | "
            f"rho(share, ΔPPL) (p) | PPL | first step the last {WINDOW} steps' share has rho < 0 | back >= 0 for good "
            f"from | its rho at the end | its lowest rho |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for runs in results.values():
        for r in runs:
            share = rundir.read_grad_dump(r["run"])["share"]
            last = rundir.read_importance(r["run"])["importance"][-1]
            out.append(f"| {os.path.basename(r['run'])} | {r['rho']:+.2f} | {theory.p_text(r['p'])} | {100 * share[0]:.1f} % | "
                       f"{100 * share[-1]:.1f} % | {100 * r['late']:.0f} % | {last:+.1f} | {r['rho_imp']:+.2f} ({theory.p_text(r['p_imp'])}) | "
                       f"{r['ppl']:.2f} / {r['log_ppl']:.2f} | {first_below_zero(r)} | {back_above_zero(r)} | "
                       f"{r['rho_win'][-1]:+.2f} | {lowest_windowed(r)} |")
    out += ["", "Provenance (the command that started each run):", ""]
    out += [f"* {os.path.basename(r['run'])}: {rundir.provenance_summary(r['run'])}" for runs in results.values() for r in runs]
    target = float(np.mean([r["log_ppl"] for r in results[PAPER_ARM]]))
    out += ["", f"Matched loss (rule 3): the {PAPER_ARM} arm ends at held-out PPL {target:.2f} (train.py's evaluation, "
            f"mean of its seeds). Where the other arms' runs reach that PPL:", "",
            f"| run | evaluations every | step at PPL {target:.2f} | rho(accumulated share, fan-in) there | "
            f"rho(share of the last {WINDOW} steps, fan-in) there |", "|---|---|---|---|---|"]
    for arm, runs in lr_arms(results).items():
        for r in runs if arm != PAPER_ARM else []:
            s = step_at_ppl(r, target)
            i = None if s is None else int(np.abs(r["steps"] - s).argmin())
            gap = int(np.diff(r["eval_steps"]).max())
            out.append(f"| {os.path.basename(r['run'])} | {gap} steps | {s if s is not None else 'never'} | "
                       + (f"{r['rho_acc'][i]:+.2f} | {r['rho_win'][i]:+.2f} |" if i is not None else "- | - |"))
    out += equalisation_table(results, diverged) + list(sweep)
    return "\n".join(out) + "\n"


def lr_arms(results):
    """The arms of the recipe question (the learning rate and warm-up): not the equalisation's own."""
    eq = (set(EQUALISED) | set(EQUALISED.values())) - {PAPER_ARM}
    return {arm: runs for arm, runs in results.items() if arm not in eq}


def figures(results, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    results = lr_arms(results)
    colors = dict(zip(results, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for arm, runs in results.items():
        for j, r in enumerate(runs):
            top.plot(r["steps"], r["rho_acc"], color=colors[arm], lw=1.4, label=arm if j == 0 else None)
            top.plot(r["steps"], r["rho_win"], color=colors[arm], lw=0.6, alpha=0.5)
        bottom.plot(runs[0]["lr_steps"], runs[0]["lr"], color=colors[arm], label=arm)
    top.axhline(0, color="k", lw=0.6)
    top.set_ylabel("Spearman rho with the linear fan-in")
    top.set_title(f"Share drift per arm: accumulated share (thick), share of the last {WINDOW} steps (thin)")
    top.legend(fontsize=8)
    bottom.set_ylabel("lr")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "recipe_drift.png"), dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, runs in results.items():
        for j, r in enumerate(runs):
            idx = [int(np.abs(r["steps"] - s).argmin()) for s in r["eval_steps"] if s > 0]
            ax.plot([r["eval_ppl"][k] for k, s in enumerate(r["eval_steps"]) if s > 0], r["rho_acc"][idx], "o-",
                    color=colors[arm], ms=3, label=arm if j == 0 else None)
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("held-out PPL (train.py's evaluations; training goes right)")
    ax.set_ylabel("rho(accumulated share, fan-in)")
    ax.set_title("The share's order against how far training has come")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "recipe_matched.png"), dpi=110)
    plt.close(fig)


def main(argv):
    from gfa.cli import ArgumentParser
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=os.path.join(HERE, "runs"), help="the recipe arms' run directories")
    p.add_argument("--study", default=os.path.join(ROOT, "experiments", "study", "runs"), help="the small study's runs")
    p.add_argument("--out", default=HERE, help="where the figures go")
    p.add_argument("--no_fig", action="store_true", help="the tables only")
    p.add_argument("--sgd_args", default="", metavar="LR|picked",
                   help="print only the SGD arms' lr-dependent train.py arguments at this peak lr, or at the one the "
                        "sweep under <runs>/sgd_sweep picked (rule 6)")
    args = p.parse_args(argv)
    if args.sgd_args:
        print(sgd_settings(picked_lr(os.path.join(args.runs, "sgd_sweep")) if args.sgd_args == "picked"
                           else positive_lr(args.sgd_args)))
        return
    results = {arm: [analyse(r) for r in runs] for arm, runs in find_runs(args.runs, args.study).items()}
    diverged = diverged_runs(os.path.join(args.runs, "logs"))
    print(tables(results, sweep_table(os.path.join(args.runs, "sgd_sweep")), diverged), end="")
    if not args.no_fig:
        os.makedirs(args.out, exist_ok=True)
        figures(results, args.out)


if __name__ == "__main__":
    cli(main)
