"""
Gradient Fan-in Asymmetry (GFA): theory against measurement, layer importance, and the
paper's Figures 3-8.

    python fanin.py --theory config/vanilla_16l.py [--key=value ...]   # a config's layers and fan-in
    python fanin.py --theory config/small.py config/cascade_a2.py      # ... at the small scale
    python fanin.py out/demo                                          # full analysis of a run
    python fanin.py out/small_vanilla_16l out/small_layerskip         # several runs, one Figure 3
    python fanin.py out/small_equalize --baseline out/small_vanilla_16l   # Figure 5 (intervention)
    python fanin.py out/v16_s1 out/v16_s2 out/v16_s3 --seeds          # seeds of one config: mean +- std
                                                  # (checked: rundir.check_poolable; --allow_mixed)

Theory: gfa/theory.py (Appendix B.1; the virtual-depth repeats are [1,1,1,1,2,3,3,5], see
docs/paper_notes.md). Measurement, per run directory (train.py's, or resnet.py's):
  share       Eq. 2, from grad_norms.npz over the steps the checkpoint's weights have seen (per
              physical layer; the dump already sums a repeated layer's gradient over its repeats)
  importance  dM_i = PPL(layer i passed through) - PPL(the model as configured), on a fixed held-out
              set (gfa.data.eval_batches); a run's own passthrough layers stay skipped throughout
              (their dM is 0). Cached in <run>/importance.json, recomputed when the eval
              settings or the checkpoint's weights change (a hash of them is part of the cache's
              key). ResNet runs bring their own
              importance.json (metric top1_drop).
  statistics  Spearman rho (share vs theory, share vs importance) with a two-sided
              permutation p-value, and whether a linear (phi) or a quadratic (phi') fan-in
              decay fits the share better.
  sub-blocks  runs that record attention and MLP apart (train.py's dump): the share of each kind
              of sub-block per layer (Eq. 2 over that kind alone), their Spearman rho with each
              other and with importance, fig_subblocks.png.
  drift       how early the share's layer ranking settles: Spearman rho of the share accumulated up
              to step t with the final one, over t (fig_share_drift.png, with its rho with the fan-in
              beside it), and the step from which it stays >= 0.9.
"""
import itertools
import math
import os
from dataclasses import asdict

import numpy as np
import torch

from gfa import rundir
from gfa.cli import ArgumentParser, UserError, cli, gpt_config
from gfa.data import REPO, dataset_dir, load_tokens
from gfa.device import DTYPES, autocast_for, pick_device
from gfa.evaluation import evaluate
from gfa.theory import (SETTLED_RHO, VIRTUAL_NOTE, fanin_deep_supervision, fanin_plain, fit_decay, mean_std, p_text,
                        share_drift, spearman, theory_for)
from model import GPT, GPTConfig, describe

# the share the figures plot (Eq. 2): the L2 norm of a layer's gradient, summed over steps, over all layers' sum
SHARE_LABEL = "gradient share: Σ_t ‖∇ layer‖₂ / Σ over layers"


def print_theory(mc):
    """A config's architecture (model.describe: widths, repeats, params, FLOPs) and its fan-in table."""
    with torch.device("meta"):   # shapes only: a 1.2B model is described instantly
        print(describe(GPT(GPTConfig(**mc))))
    print()
    kind, phi, repeats = theory_for(mc)
    N = mc["n_layer"]
    plain, deep = fanin_plain(N), fanin_deep_supervision(N)
    starts = [0] + list(itertools.accumulate(repeats))[:-1]
    total = sum(phi)
    print(f"gradient fan-in, {kind}: N = {N} physical layers, {sum(repeats)} virtual positions")
    print(f"{'layer':>5} {'repeats':>7} {'positions':>9} {'plain phi':>9} {'deep phi' + chr(39):>9} {'this run':>8} {'normalised':>10}")
    for l in range(N):
        pos = f"{starts[l] + 1}-{starts[l] + repeats[l]}" if repeats[l] > 1 else f"{starts[l] + 1}"
        print(f"{l:>5} {repeats[l]:>7} {pos:>9} {plain[l]:>9} {deep[l]:>9} "
              f"{phi[l]:>8} {phi[l] / total:>10.3f}")
    print("(layer 0-indexed; plain phi and deep phi' are the formulas without repetition; "
          "normalised = this run's fan-in / its sum)")
    if any(r != 1 for r in repeats):
        print(VIRTUAL_NOTE)


# ---- functional importance -------------------------------------------------------------------
def compute_importance(model, data, block_size, batch_size, n_batches, device, dtype="float32", log=print):
    """Perplexity of the model as configured and, per layer i, with i passed through as well.
    Layers the run already passes through (its config's passthrough) are not evaluated again:
    skipping them changes nothing, so their ablated ppl is the baseline (importance 0)."""
    ctx = autocast_for(torch.device(device).type, dtype)
    ppl = lambda: math.exp(evaluate(model, data, block_size, batch_size, n_batches, device, ctx))
    keep = frozenset(model.passthrough)
    base = ppl()
    log(f"importance: baseline ppl {base:.4f}" + (f" (layers {sorted(keep)} passed through as configured)"
                                                   if keep else ""))
    ablated = []
    try:
        for i in range(model.config.n_layer):
            if i in keep:
                ablated.append(base)
                log(f"importance: layer {i:>2} is passed through in the run's config: importance 0")
                continue
            model.set_passthrough(keep | {i})   # add to the run's own passthrough, do not replace it
            ablated.append(ppl())
            log(f"importance: layer {i:>2} passed through: ppl {ablated[-1]:.4f} ({ablated[-1] - base:+.4f})")
    finally:
        model.set_passthrough(keep)
    return base, ablated


def _data_key(path):
    """The held-out file as the cache records it: relative to this repository when inside it, so
    the cache stays valid from any working directory and on another machine."""
    path = os.path.abspath(path)
    rel = os.path.relpath(path, REPO)
    return path if rel.startswith("..") else rel


def importance_for_run(run, ckpt, mc, args):
    """Load or compute <run>/importance.json for an LM run; ckpt is its read_checkpoint(), mc its model config."""
    tc = ckpt.get("train_config") or {}
    device = pick_device(args.device or "")
    on_gpu = torch.device(device).type == "cuda"
    data_path = args.data or os.path.join(dataset_dir(tc.get("dataset"), tc.get("data_dir")), "val.bin")
    if args.block_size and not 1 <= args.block_size <= mc["block_size"]:
        raise UserError(f"--block_size {args.block_size}: must be in [1, {mc['block_size']}], the model's block_size")
    settings = {"data": _data_key(data_path), "block_size": int(args.block_size or mc["block_size"]),
                "batch_size": int(args.batch_size or min(int(tc.get("batch_size", 16)), 16)),
                "eval_batches": int(args.eval_batches or (40 if on_gpu else 8)),
                "dtype": args.dtype, "iter_num": int(ckpt.get("iter_num", -1)),
                "weights": rundir.checkpoint_id(ckpt)}   # the cache belongs to these weights, not to the folder
    cached = rundir.read_importance(run)
    if cached is not None and not args.recompute:
        if cached.get("settings") == settings and len(cached.get("importance", [])) == mc["n_layer"]:
            print(f"{run}: importance from cache {rundir.file(run, rundir.IMPORTANCE)}")
            return cached
        print(f"{run}: {rundir.file(run, rundir.IMPORTANCE)} is stale (other eval settings or other weights), "
              f"recomputing")
    if not os.path.isfile(data_path):
        raise UserError(f"held-out data {data_path} does not exist: prepare the dataset "
                        f"'{tc.get('dataset')}' or pass --data path/to/val.bin")
    model, _ = rundir.load_gpt(run, device)
    data = load_tokens(data_path, model.config.vocab_size)
    print(f"{run}: measuring importance on {device}: {settings['eval_batches']} batches x {settings['batch_size']} "
          f"x {settings['block_size']} tokens of {data_path}, {model.config.n_layer + 1} evaluations")
    base, ablated = compute_importance(model, data, settings["block_size"], settings["batch_size"],
                                       settings["eval_batches"], device, args.dtype)
    result = {"metric": "ppl_increase", "baseline": base, "importance": [a - base for a in ablated],
              "layer_names": [f"layer.{i}" for i in range(model.config.n_layer)], "ablated": ablated,
              "settings": settings, "device": device}
    try:
        rundir.write_importance(run, result)
    except UserError as e:   # the numbers are measured: report them, even when they cannot be cached
        print(f"note: importance not cached ({e})")
    return result


# ---- one run's analysis ------------------------------------------------------------------------
def analyse(run, args):
    """Everything about one run directory as a dict (see the keys at the end)."""
    if not os.path.isdir(run):
        raise UserError(f"{run} is not a run directory (train one with `python train.py config/x.py`)")
    kind, mc = rundir.read_model_config(run)
    ckpt = rundir.read_checkpoint(run, kind) if rundir.has_checkpoint(run) else None
    # the share over the steps the checkpoint's weights have seen (all logged steps before the first one)
    dump = rundir.read_grad_dump(run, before_step=ckpt["iter_num"] if ckpt else None, ckpt=ckpt)
    share = np.asarray(dump["share"], dtype=np.float64)
    if kind == "resnet":   # a plain stack of its blocks; resnet.py measured the importance
        mc = {"n_layer": len(dump["layer_names"])}
        imp = None if args.no_importance else rundir.read_importance(run)
        if imp and ckpt is not None and imp.get("weights", rundir.checkpoint_id(ckpt)) != rundir.checkpoint_id(ckpt):
            print(f"note: {run}/importance.json measured other weights than its checkpoint's: ignored (measure "
                  f"again with python resnet.py --out_dir={run} --analyse=True)")
            imp = None
        elif imp is None and ckpt is not None and not args.no_importance:   # stopped early, or --importance=False
            print(f"note: {run} has no importance.json: share vs theory only (measure its checkpoint's with "
                  f"python resnet.py --out_dir={run} --analyse=True)")
    elif args.no_importance:
        imp = None
    elif ckpt is not None:   # an LM run: measured here, or from its cache
        imp = importance_for_run(run, ckpt, mc, args)
    else:   # an LM run without its checkpoint (a run still training, or a committed dump): a cached
        imp = rundir.read_importance(run)   # importance.json if there is one, else share vs theory only
        if imp is not None:
            print(f"{run}: importance from {rundir.file(run, rundir.IMPORTANCE)} (no checkpoint to check it against)")
    N = mc["n_layer"]
    if len(share) != N:
        raise UserError(f"{run}: grad_norms.npz has {len(share)} layers but the model has {N}")
    kind, phi, repeats = theory_for(mc)
    rho_t, p_t = spearman(share, phi)
    out = {"run": run, "name": os.path.basename(os.path.normpath(run)), "kind": kind, "n_layer": N,
           "repeats": repeats, "theory": phi, "share": share.tolist(), "steps": int(len(dump["steps"])),
           "step_range": list(dump["step_range"]), "rho_theory": rho_t, "p_theory": p_t,
           "fit": fit_decay(share, N, phi), "drift": share_drift(dump["norms"], dump["names"], dump["steps"], phi)}
    if "sub_share" in dump:   # attention and MLP recorded apart: their own shares, and do they agree?
        out["sub_share"] = {k: v.tolist() for k, v in dump["sub_share"].items()}
        out["rho_attn_mlp"] = spearman(out["sub_share"]["attn"], out["sub_share"]["mlp"])
    if imp is not None:
        if len(imp["importance"]) != N:
            raise UserError(f"{run}/importance.json has {len(imp['importance'])} layers, the dump has {N}")
        rho, p = spearman(share, imp["importance"])
        out.update(metric=imp.get("metric", "ppl_increase"), baseline=imp["baseline"],
                   importance=list(imp["importance"]), rho=rho, p=p)
        if "sub_share" in out:
            out["rho_sub"] = {k: spearman(v, imp["importance"]) for k, v in out["sub_share"].items()}
    return out


def print_report(r):
    metric = {"ppl_increase": "dPPL", "top1_drop": "dTop1"}.get(r.get("metric"), "dM")
    sub = r.get("sub_share")
    print(f"\n== {r['run']}: {r['kind']} fan-in, {r['n_layer']} layers, share over {r['steps']} logged steps "
          f"({r['step_range'][0]}-{r['step_range'][1]})")
    print(f"{'layer':>5} {'repeats':>7} {'fan-in':>7} {'fan-in %':>8} {'share %':>8} {metric:>10}"
          + (f" {'attn %':>7} {'mlp %':>7}" if sub else ""))
    tot = sum(r["theory"])
    for l in range(r["n_layer"]):
        imp = f"{r['importance'][l]:>10.4f}" if "importance" in r else f"{'-':>10}"
        print(f"{l:>5} {r['repeats'][l]:>7} {r['theory'][l]:>7} {100 * r['theory'][l] / tot:>8.2f} "
              f"{100 * r['share'][l]:>8.2f} {imp}"
              + (f" {100 * sub['attn'][l]:>7.2f} {100 * sub['mlp'][l]:>7.2f}" if sub else ""))
    if sub:
        print("(attn % / mlp %: Eq. 2 over the attention sub-blocks alone / the MLP sub-blocks alone)")
    if "importance" in r:
        base = "baseline ppl" if r["metric"] == "ppl_increase" else "baseline"
        print(f"{base} {r['baseline']:.4f}")
        print(f"Spearman share vs importance: rho = {r['rho']:.3f}, {p_text(r['p'])} (two-sided permutation)")
        for k, (rho, p) in r.get("rho_sub", {}).items():
            print(f"Spearman {k} share vs importance: rho = {rho:.3f}, {p_text(p)}")
    if sub:
        print(f"Spearman attn share vs mlp share: rho = {r['rho_attn_mlp'][0]:.3f}, {p_text(r['rho_attn_mlp'][1])}")
    print(f"Spearman share vs theoretical fan-in: rho = {r['rho_theory']:.3f}, {p_text(r['p_theory'])}")
    d = r["drift"]
    print("share drift: the layer ranking " + (f"settles at step {d['settled']} of {r['step_range'][1]}"
                                               if d["settled"] is not None else "does not settle")
          + f" (Spearman with the final share >= {SETTLED_RHO} from then on); at 10 / 25 / 50 % of the steps: "
          + " / ".join(f"{_drift_at(d, f):.2f}" for f in (0.1, 0.25, 0.5))
          + "; with the fan-in: " + " / ".join(f"{_drift_at(d, f, 'rho_theory'):.2f}" for f in (0.1, 0.25, 0.5)))
    f = r["fit"]
    print(f"share decay fit: linear R^2 {f['linear']['r2']:.3f} (rmse {f['linear']['rmse']:.4f}), "
          f"quadratic R^2 {f['quadratic']['r2']:.3f} (rmse {f['quadratic']['rmse']:.4f}) -> {f['verdict']}")
    if "theory" in f:
        print(f"share vs this run's own fan-in ({r['kind']}): R^2 {f['theory']['r2']:.3f} "
              f"(rmse {f['theory']['rmse']:.4f}, slope {'+' if f['theory']['slope'] > 0 else '-'})")
    if any(x != 1 for x in r["repeats"]):
        print(VIRTUAL_NOTE)


def _drift_at(drift, fraction, key="rho"):
    """rho of the share accumulated over the first `fraction` of the recorded steps (the nearest point)
    with the final share (key 'rho') or with the fan-in ('rho_theory')."""
    steps = np.asarray(drift["steps"])
    target = steps[0] + fraction * (steps[-1] - steps[0])
    return drift[key][int(np.abs(steps - target).argmin())]


# ---- figures -----------------------------------------------------------------------------------
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=130, bbox_inches="tight")
    except OSError as e:
        raise rundir.cannot_write(path, e) from None
    finally:
        _plt().close(fig)
    print(f"wrote {path}")


def _imp_label(r):
    return {"ppl_increase": "importance ΔPPL (layer passed through)",
            "top1_drop": "importance Δtop-1 (block removed)"}.get(r.get("metric"), "importance ΔM")


def fig3(runs, path):
    """Measured share per layer against the normalised theoretical fan-in, several runs."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, r in enumerate(runs):
        x = np.arange(r["n_layer"])
        phi = np.asarray(r["theory"], dtype=np.float64)
        c = colors[k % len(colors)]
        ax.plot(x, r["share"], "o-", color=c, label=f"{r['name']}: measured share")
        # the paper's styles: linear theory black dashed, quadratic gray dotted (run colour when several)
        style = ":" if "deep" in r["kind"] else "-." if "virtual" in r["kind"] else "--"
        tc = c if len(runs) > 1 else "gray" if "deep" in r["kind"] else "black"
        ax.plot(x, phi / phi.sum(), style, color=tc, alpha=0.9, lw=1.8,
                label=f"{r['name']}: theory, {r['kind']} (Spearman ρ={r['rho_theory']:.2f})")
    ax.set_xlabel("layer (0 = first, as in the table and passthrough)")
    ax.set_ylabel(SHARE_LABEL + "  /  fan-in / sum")
    ax.set_title("Measured gradient share vs theoretical fan-in (Fig. 3)")
    ax.set_xticks(np.arange(max(r["n_layer"] for r in runs)))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2 if len(runs) > 1 else 1,
              frameon=False)
    _save(fig, path)


def _wide(vals):
    """Log axis when importance spans more than 50x and is all positive (one layer dominating)."""
    v = np.asarray(vals, dtype=np.float64)
    return bool((v > 0).all() and v.max() / v.min() > 50)


def fig4(r, path):
    """Share vs importance scatter, Spearman rho and p in the title."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    ax.scatter(r["share"], r["importance"], color="tab:blue", zorder=3)
    order = np.argsort(r["share"])   # alternate label sides along x so neighbours do not collide
    for k, l in enumerate(order):
        ax.annotate(str(l), (r["share"][l], r["importance"][l]), textcoords="offset points",
                    xytext=(-5, 2) if k % 2 == 0 else (5, 2), ha="right" if k % 2 == 0 else "left", fontsize=8)
    if _wide(r["importance"]):
        ax.set_yscale("log")
    ax.set_xlabel("accumulated gradient share $\\bar g_i$")
    ax.set_ylabel(_imp_label(r) + (", log" if _wide(r["importance"]) else ""))
    ax.set_title(f"{r['name']}: Spearman ρ = {r['rho']:.2f}, {p_text(r['p'])}")
    ax.grid(alpha=0.3)
    _save(fig, path)


def _log_floor(vals):
    """Importance can be <= 0 (ablation did not hurt); a log axis shows those at a floor."""
    v = np.asarray(vals, dtype=np.float64)
    pos = v[v > 0]
    floor = pos.min() / 3 if len(pos) else 1e-3
    return np.maximum(v, floor), floor


def fig5(r, base, path):
    """Per-layer importance of an intervention run against its baseline (log y); the gradient
    shares in a small panel beside it (the paper's inset, moved out so it never hides data)."""
    plt = _plt()
    fig, (ax, ins) = plt.subplots(1, 2, figsize=(8.6, 4.2), gridspec_kw={"width_ratios": [3, 1.15]})
    floor = min(_log_floor(r["importance"])[1], _log_floor(base["importance"])[1])
    n = max(r["n_layer"], base["n_layer"])
    for rr, c, m in ((base, "tab:gray", "s--"), (r, "tab:red", "o-")):
        ax.plot(np.arange(rr["n_layer"]), np.maximum(rr["importance"], floor), m, color=c,
                label=f"{rr['name']} ({rr['kind']})")
    ax.set_yscale("log")
    ax.set_xlabel("layer (0 = first)")
    ax.set_ylabel(_imp_label(r) + ", log scale")
    ax.set_title(f"{r['name']} vs baseline {base['name']}: importance (Fig. 5)", fontsize=10)
    ax.set_xticks(np.arange(n))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    if any(v <= 0 for v in list(r["importance"]) + list(base["importance"])):
        ax.text(0.99, 0.01, f"values <= 0 drawn at {floor:.2g}", transform=ax.transAxes, ha="right",
                va="bottom", fontsize=7, color="dimgray")
    w = 0.4
    for rr, c, dx in ((base, "tab:gray", -w / 2), (r, "tab:red", w / 2)):
        ins.bar(np.arange(rr["n_layer"]) + dx, rr["share"], width=w, color=c)
    ins.set_title("gradient share", fontsize=9)
    ins.set_xlabel("layer", fontsize=8)
    ins.tick_params(labelsize=7)
    ins.set_xticks(np.arange(0, n, 2 if n > 10 else 1))
    ins.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    _save(fig, path)


def fig678(r, path):
    """Per layer, one axis per quantity on a shared layer axis: above, the measured share (red) beside the
    normalised theoretical fan-in (black, dashed), both fractions of 1 on one linear axis; below, the
    importance (blue) on its own axis (log when it spans > 50x). Two y-axes on one panel made them look closer
    than they are."""
    plt = _plt()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.5, 6.4), sharex=True, gridspec_kw={"hspace": 0.32})
    x = np.arange(r["n_layer"])
    phi = np.asarray(r["theory"], dtype=np.float64)
    top.plot(x, r["share"], "o-", color="tab:red", label="measured gradient share $\\bar g_i$")
    top.plot(x, phi / phi.sum(), "x--", color="black", label=f"theoretical fan-in / sum, {r['kind']}")
    top.set_ylabel("share of the total\n(each line sums to 1)")
    top.set_ylim(bottom=0)
    top.set_title(f"share vs theoretical fan-in: Spearman ρ = {r['rho_theory']:.2f}, {p_text(r['p_theory'])}", fontsize=10)
    top.legend(fontsize=8, frameon=False)
    wide = _wide(r["importance"])
    bottom.plot(x, r["importance"], "s-", color="tab:blue", label="importance")
    if wide:
        bottom.set_yscale("log")
    bottom.set_ylabel(_imp_label(r).replace(" (", "\n(") + (", log" if wide else ""))
    bottom.set_title(f"importance: Spearman ρ with the share = {r['rho']:.2f}, {p_text(r['p'])}",
                     fontsize=10)
    bottom.set_xlabel("layer (0 = first, as in the table and passthrough)")
    bottom.set_xticks(x)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.suptitle(f"{r['name']}: gradient share and importance per layer", fontsize=11)
    _save(fig, path)


def fig_subblocks(r, path):
    """Share per layer of the attention and the MLP sub-blocks (each Eq. 2 over its own kind), beside the
    layer share and the normalised fan-in."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    x = np.arange(r["n_layer"])
    phi = np.asarray(r["theory"], dtype=np.float64)
    ax.plot(x, r["sub_share"]["attn"], "o-", color="tab:blue", label="attention sub-blocks")
    ax.plot(x, r["sub_share"]["mlp"], "s-", color="tab:orange", label="MLP sub-blocks")
    ax.plot(x, r["share"], "^:", color="tab:gray", label="whole layers (Eq. 2)")
    ax.plot(x, phi / phi.sum(), "--", color="black", label=f"theory, {r['kind']}")
    ax.set_xlabel("layer")
    ax.set_ylabel(SHARE_LABEL)
    ax.set_title(f"{r['name']}: share per sub-block (Spearman attn vs MLP ρ = {r['rho_attn_mlp'][0]:.2f})")
    ax.set_xticks(x)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def fig_drift(runs, path):
    """Share drift: Spearman rho of the share accumulated up to step t with the final share, over t."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        line, = ax.plot(r["drift"]["steps"], r["drift"]["rho"], "-", label=f"{r['name']}: with the final share")
        ax.plot(r["drift"]["steps"], r["drift"]["rho_theory"], "--", color=line.get_color(), lw=1.2,
                label=f"{r['name']}: with the fan-in ({r['kind']})")
        if r["drift"]["settled"] is not None:
            ax.axvline(r["drift"]["settled"], color=line.get_color(), ls=":", lw=1)
    ax.axhline(SETTLED_RHO, color="gray", ls="-", lw=0.8, label=f"ρ = {SETTLED_RHO} (dotted: where it stays above)")
    ax.set_xlabel("training step t")
    ax.set_ylabel("Spearman ρ of the share accumulated up to t")
    ax.set_title("Share drift: how early the layer ranking settles")
    ax.set_ylim(-1.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2 if len(runs) > 1 else 1,
              frameon=False)
    _save(fig, path)


# ---- seeds ------------------------------------------------------------------------------------------
def seed_summary(runs, mixed=None):
    """Runs that are seeds of one config: every statistic and the per-layer share and importance as
    mean +- sample std over them, printed and returned."""
    if len({(r["n_layer"], r["kind"], tuple(r["theory"])) for r in runs}) > 1:
        raise UserError("--seeds: the runs have different architectures; give seeds of one config")
    has_imp = all("importance" in r for r in runs)
    stats = {"rho_theory": [r["rho_theory"] for r in runs], "p_theory": [r["p_theory"] for r in runs],
             "r2_linear": [r["fit"]["linear"]["r2"] for r in runs],
             "r2_quadratic": [r["fit"]["quadratic"]["r2"] for r in runs]}
    if has_imp:
        stats |= {"rho_importance": [r["rho"] for r in runs], "p_importance": [r["p"] for r in runs],
                  "baseline": [r["baseline"] for r in runs]}
    share = np.array([r["share"] for r in runs], dtype=np.float64)
    out = {"runs": [r["name"] for r in runs], "stats": {k: (*mean_std(v), v) for k, v in stats.items()},
           "share": [mean_std(share[:, l]) for l in range(share.shape[1])]}
    if has_imp:
        imp = np.array([r["importance"] for r in runs], dtype=np.float64)
        out["importance"] = [mean_std(imp[:, l]) for l in range(imp.shape[1])]
    print(f"\n== {len(runs)} seeds ({', '.join(out['runs'])}): mean ± sample std")
    if mixed:
        print(f"MIXED POOL (--allow_mixed; not seeds of one experiment): {mixed}")
    for k, (m, sd, v) in out["stats"].items():
        print(f"{k:>15}: {m:.4g} ± {sd:.2g}   (" + ", ".join(f"{x:.3g}" for x in v) + ")")
    tot = sum(runs[0]["theory"])
    print(f"{'layer':>5} {'fan-in %':>8} {'share %':>15}" + (f" {'importance':>20}" if has_imp else ""))
    for l, (m, sd) in enumerate(out["share"]):
        line = f"{l:>5} {100 * runs[0]['theory'][l] / tot:>8.2f} {100 * m:>7.2f} ± {100 * sd:<5.2f}"
        if has_imp:
            line += f" {out['importance'][l][0]:>11.4g} ± {out['importance'][l][1]:<8.3g}"
        print(line)
    return out


def fig3_seeds(runs, summary, path):
    """Figure 3 over seeds: the share's mean +- std per layer against the normalised fan-in."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    x = np.arange(runs[0]["n_layer"])
    phi = np.asarray(runs[0]["theory"], dtype=np.float64)
    m, sd = (np.array(v) for v in zip(*summary["share"]))
    rho = summary["stats"]["rho_theory"]
    ax.errorbar(x, m, yerr=sd, fmt="o-", capsize=3, label=f"measured share, mean ± std of {len(runs)} seeds")
    ax.plot(x, phi / phi.sum(), ":" if "deep" in runs[0]["kind"] else "--", color="black",
            label=f"theory, {runs[0]['kind']} (Spearman ρ = {rho[0]:.2f} ± {rho[1]:.2f})")
    ax.set_xlabel("layer")
    ax.set_ylabel(SHARE_LABEL + "  /  fan-in / sum")
    ax.set_title("Measured gradient share vs theoretical fan-in (Fig. 3), seeds"
                 + (" (MIXED POOL)" if summary.get("mixed") else ""))
    ax.set_xticks(x)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


# ---- CLI -------------------------------------------------------------------------------------------
def main(argv):
    ap = ArgumentParser(
        description="GFA: fan-in theory vs measured gradient share, layer importance, Figures 3-8.",
        epilog="--theory CONFIG.py [--key=value ...] prints a config's layers and fan-in (model keys as everywhere). "
               + VIRTUAL_NOTE)
    ap.add_argument("paths", nargs="*", help="run directories (or, with --theory, a config file)")
    ap.add_argument("--theory", action="store_true", help="print the architecture and the theoretical fan-in, and exit")
    ap.add_argument("--baseline", help="baseline run directory for Figure 5 (e.g. vanilla for equalize)")
    ap.add_argument("--fig_dir", help="write figures and fanin_summary.json here (default: the run directory)")
    ap.add_argument("--data", help="held-out tokens (default data/<dataset>/val.bin of the run)")
    ap.add_argument("--eval_batches", type=int, help="batches per evaluation (default 8 on CPU, 40 on GPU)")
    ap.add_argument("--batch_size", type=int, help="sequences per batch (default min(train batch_size, 16))")
    ap.add_argument("--block_size", type=int, help="tokens per sequence (default the run's block_size)")
    ap.add_argument("--device", help="default cuda when available, else cpu")
    ap.add_argument("--dtype", default="float32", help="float32 (default, as the paper's eval), tf32 or bfloat16")
    ap.add_argument("--recompute", action="store_true", help="ignore a cached importance.json")
    ap.add_argument("--no_importance", action="store_true", help="share vs theory only (no evaluation)")
    ap.add_argument("--seeds", action="store_true", help="the runs are seeds of one config: also print every "
                    "statistic as mean ± std over them, and plot the share's mean ± std (fig3_seeds.png)")
    ap.add_argument("--allow_mixed", action="store_true", help="--seeds: pool runs that are not seeds of one "
                    "experiment (another architecture, recipe or data; gfa/rundir.py: check_poolable), labelled mixed")
    args, extra = ap.parse_known_args(argv)

    if args.theory:
        if len(args.paths) == 1 and os.path.isdir(args.paths[0]):
            kind, mc = rundir.read_model_config(args.paths[0])
            if kind != "gpt":
                raise UserError(f"{args.paths[0]} is a {kind} run: --theory describes language models")
        else:
            mc = asdict(gpt_config(args.paths + extra))
        print_theory(mc)
        return
    if extra:
        raise UserError(f"unknown argument(s) {' '.join(extra)} (--key=value overrides go with --theory; "
                        f"see python fanin.py --help)")
    if not args.paths:
        raise UserError("give a run directory, e.g. `python fanin.py out/demo`, or --theory config/x.py")
    for name in ("eval_batches", "batch_size", "block_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)}: must be >= 1")
    if args.dtype not in DTYPES:
        raise UserError(f"--dtype {args.dtype}: use float32, tf32 or bfloat16")
    if args.no_importance and args.baseline:
        raise UserError("--baseline compares importance: drop --no_importance")
    if args.fig_dir and os.path.exists(args.fig_dir) and not os.path.isdir(args.fig_dir):
        raise UserError(f"--fig_dir {args.fig_dir} is a file: give a folder")

    # seeds of one experiment? (before any work; --allow_mixed pools others, labelled so)
    mixed = rundir.check_poolable(args.paths, args.allow_mixed, option="--seeds") if args.seeds else None
    base = analyse(args.baseline, args) if args.baseline else None   # first: a bad baseline fails before any work
    if base and "importance" not in base:
        raise UserError(f"baseline {args.baseline} has no importance: give a run with ckpt.pt or importance.json")
    runs = [analyse(p, args) for p in args.paths]
    for r in runs + ([base] if base else []):
        print_report(r)

    def dest(r, name):
        if args.fig_dir:
            return os.path.join(args.fig_dir, f"{r['name']}_{name}" if len(runs) > 1 or base else name)
        return os.path.join(r["run"], name)

    print()
    fig3(runs + ([base] if base else []), os.path.join(args.fig_dir or runs[0]["run"], "fig3_share_vs_fanin.png"))
    fig_drift(runs + ([base] if base else []), os.path.join(args.fig_dir or runs[0]["run"], "fig_share_drift.png"))
    for r in runs:
        if "sub_share" in r:
            fig_subblocks(r, dest(r, "fig_subblocks.png"))
        if "importance" in r:
            fig4(r, dest(r, "fig4_share_vs_importance.png"))
            fig678(r, dest(r, "fig678_layerwise.png"))
            if base:
                fig5(r, base, dest(r, f"fig5_vs_{base['name']}.png"))
    summary = {"runs": runs, "baseline": base}
    if args.seeds:
        summary["seeds"] = seed_summary(runs, mixed) | {"mixed": mixed}
        fig3_seeds(runs, summary["seeds"], os.path.join(args.fig_dir or runs[0]["run"], "fig3_seeds.png"))
    path = os.path.join(args.fig_dir or runs[0]["run"], "fanin_summary.json")
    rundir.atomic_write_json(summary, path, indent=1, default=float)
    print(f"wrote {path}")
    return summary


if __name__ == "__main__":
    cli(main)
