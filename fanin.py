"""
Gradient Fan-in Asymmetry (GFA): theory against measurement, layer importance, and the
paper's Figures 3-8.

    python fanin.py --theory config/vanilla_16l.py [--key=value ...]   # fan-in table of a config
    python fanin.py out/demo                                          # full analysis of a run
    python fanin.py out/small_vanilla_16l out/small_layerskip         # several runs, one Figure 3
    python fanin.py out/small_equalize --baseline out/small_vanilla_16l   # Figure 5 (intervention)

Theory (Appendix B.1), layer l = 0..N-1:
    plain stack          phi_l  = (N - l) + 1
    deep supervision     phi'_l = (N - l + 1)(N - l + 2) / 2           (triangular numbers)
    virtual depth        FanIn(L_p) = sum over virtual positions i (1-indexed) with V_i = L_p
                                      of (N_virt - i + 2)
Note on the paper (SPEC.md): its text says repeats 2,3,3,4 for layers 5-8, but its numbers
18,17,16,15,27,33,24,20 come out exactly with repeats [1,1,1,1,2,3,3,5] (N_virt = 17),
which is what config/*/virtual_depth.py uses.

Measurement, per run directory (written by train.py, or by resnet.py):
  share       Eq. 2, from grad_norms.npz (per physical layer; the dump already sums a repeated
              layer's gradient over its repeats)
  importance  dM_i = PPL(layer i passed through) - PPL(the model as configured), on a fixed held-out
              set (common.eval_batches); a run's own passthrough layers stay skipped throughout
              (their dM is 0). Cached in <run>/importance.json, recomputed when the eval
              settings or the checkpoint's iter_num change. ResNet runs bring their own
              importance.json (metric top1_drop) and have no ckpt.pt.
  statistics  Spearman rho (share vs theory, share vs importance) with a two-sided
              permutation p-value (spearman() below), and whether a linear (phi) or a
              quadratic (phi') fan-in decay fits the share better.
"""
import argparse
import itertools
import json
import math
import os

import numpy as np
import torch

from common import (UserError, atomic_write_json, autocast_for, cli, data_dir, evaluate, load_grad_dump, load_model,
                    load_tokens, read_checkpoint, read_config)

ROOT = os.path.dirname(os.path.abspath(__file__))

VIRTUAL_NOTE = ("note: the paper's text says repeats 2,3,3,4 for layers 5-8 (16 virtual positions), but its "
                "fan-in numbers 18,17,16,15,27,33,24,20 come out exactly with repeats [1,1,1,1,2,3,3,5] "
                "(17 virtual positions); the configs use the latter (SPEC.md).")


# ---- theory (Appendix B.1) ------------------------------------------------------------------
def fanin_plain(N):
    """phi_l = (N - l) + 1: the identity path plus the N - l downstream blocks (incl. the head)."""
    return [N - l + 1 for l in range(N)]


def fanin_deep_supervision(N):
    """phi'_l = (N - l + 1)(N - l + 2) / 2: the final head plus an auxiliary head after every block."""
    return [(N - l + 1) * (N - l + 2) // 2 for l in range(N)]


def fanin_general(repeats, deep_supervision):
    """Virtual depth: FanIn(L_p) = sum over the virtual positions i (1-indexed) of block p of
    (N_virt - i + 2); with deep supervision an extra (e - i + 1) from the auxiliary head after
    every physical block (at virtual position e >= i). Reduces to the two formulas above when
    there is no repetition (the tests check it and the paper's virtual-depth numbers)."""
    n_virt = sum(repeats)
    ends = list(itertools.accumulate(repeats))            # virtual position after each block
    out, i = [], 0
    for r in repeats:
        total = 0
        for k in range(r):
            pos = i + k + 1
            total += n_virt - pos + 2
            if deep_supervision:
                total += sum(e - pos + 1 for e in ends if e >= pos)
        out.append(total)
        i += r
    return out


def theory_for(mc):
    """(kind, per-layer fan-in, per-layer repeats) for a model-config dict (GPTConfig fields)."""
    N = mc["n_layer"]
    repeats = list(mc.get("repeats") or [1] * N)
    deep = bool(mc.get("deep_supervision", False))
    virtual = any(r != 1 for r in repeats)
    kind = ("virtual depth + deep supervision" if virtual and deep else "virtual depth" if virtual
            else "deep supervision (quadratic)" if deep else "plain (linear)")
    return kind, fanin_general(repeats, deep), repeats


def print_theory(mc):
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


# ---- Spearman correlation without scipy ----------------------------------------------------
def rankdata(a):
    """Ranks 1..n, ties get their average rank."""
    a = np.asarray(a, dtype=np.float64)
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a))
    s = a[order]
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


_PERMS = {}


def _all_permutations(n):
    """All n! permutations of range(n) as an int8 array (n <= 10: at most 36 MB), cached."""
    if n not in _PERMS:
        p = np.zeros((1, 0), dtype=np.int8)
        for k in range(n):   # insert value k at every position of every permutation of range(k)
            new = np.empty((len(p) * (k + 1), k + 1), dtype=np.int8)
            for pos in range(k + 1):
                new[pos::k + 1, :pos] = p[:, :pos]
                new[pos::k + 1, pos] = k
                new[pos::k + 1, pos + 1:] = p[:, pos:]
            p = new
        _PERMS[n] = p
    return _PERMS[n]


def spearman(x, y, exact_max_n=10, n_perm=200_000, seed=0):
    """Spearman's rho (Pearson correlation of average-tie ranks, as scipy.stats.spearmanr) and a
    two-sided permutation p-value P(|rho_perm| >= |rho|) under the null of exchangeable pairs.

    n <= exact_max_n: exact, enumerating all n! permutations (ties handled exactly).
    larger n: Monte Carlo over n_perm random permutations with a fixed seed (deterministic),
    p = (hits + 1) / (n_perm + 1) so it is never 0 (resolution ~5e-6 with the default).
    Returns (nan, nan) when x or y is constant or n < 3."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman needs two 1-d arrays of equal length, got {x.shape} and {y.shape}")
    n = len(x)
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    if n < 3 or denom == 0:
        return float("nan"), float("nan")
    rho = float((rx * ry).sum() / denom)
    tol = 1e-9 * (rx ** 2).sum() ** 0.5 * (ry ** 2).sum() ** 0.5
    target = abs(rho) * denom - tol
    if n <= exact_max_n:
        perms = _all_permutations(n)
        acc = np.zeros(len(perms))
        for j in range(n):
            acc += rx[j] * ry[perms[:, j]]
        return rho, float((np.abs(acc) >= target).mean())
    rng = np.random.default_rng(seed)
    hits, done = 0, 0
    while done < n_perm:
        m = min(50_000, n_perm - done)
        perms = np.argsort(rng.random((m, n)), axis=1)
        hits += int((np.abs(ry[perms] @ rx) >= target).sum())
        done += m
    return rho, (hits + 1) / (n_perm + 1)


# ---- fits of the share's shape -----------------------------------------------------------
def fit_decay(share, N, theory=None):
    """Which decay explains the share better: linear phi_l or quadratic phi'_l?
    For each: R^2 of the least-squares affine fit share ~ a + b * phi/sum(phi) (shape only),
    and the RMSE between the share and phi/sum(phi) (no free parameters). With theory (e.g. virtual
    depth's fan-in) the same numbers for it too, under 'theory'; the verdict stays linear vs quadratic."""
    share = np.asarray(share, dtype=np.float64)
    share = share / share.sum()
    out = {}
    cands = [("linear", fanin_plain(N)), ("quadratic", fanin_deep_supervision(N))]
    if theory is not None and list(theory) not in (cands[0][1], cands[1][1]):
        cands.append(("theory", list(theory)))
    for name, phi in cands:
        p = np.asarray(phi, dtype=np.float64)
        p = p / p.sum()
        A = np.stack([np.ones(N), p], axis=1)
        coef, *_ = np.linalg.lstsq(A, share, rcond=None)
        resid = share - A @ coef
        ss_tot = ((share - share.mean()) ** 2).sum()
        r2 = 1 - (resid ** 2).sum() / ss_tot if ss_tot > 0 else float("nan")
        out[name] = {"r2": float(r2), "slope": float(coef[1]), "rmse": float(np.sqrt(((share - p) ** 2).mean()))}
    decaying = [k for k in ("linear", "quadratic") if out[k]["slope"] > 0 and np.isfinite(out[k]["r2"])]
    best = max(decaying, key=lambda k: out[k]["r2"]) if decaying else None
    out["verdict"] = ("neither (the share does not decay with depth)" if best is None
                      else best if out[best]["r2"] >= 0.5
                      else f"neither fits well (best {best}, R^2 {out[best]['r2']:.2f} < 0.5)")
    return out


# ---- functional importance -------------------------------------------------------------------
def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


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
    rel = os.path.relpath(path, ROOT)
    return path if rel.startswith("..") else rel


def importance_for_run(run, ckpt, args):
    """Load or compute <run>/importance.json for an LM run; ckpt is its read_checkpoint()."""
    path = os.path.join(run, "importance.json")
    tc, mc = ckpt.get("train_config") or {}, ckpt["model_config"]
    device = args.device or default_device()
    on_gpu = torch.device(device).type == "cuda"
    data_path = args.data or os.path.join(data_dir(tc), "val.bin")
    settings = {"data": _data_key(data_path),
                "block_size": int(args.block_size or min(tc.get("block_size", mc["block_size"]), mc["block_size"])),
                "batch_size": int(args.batch_size or min(int(tc.get("batch_size", 16)), 16)),
                "eval_batches": int(args.eval_batches or (40 if on_gpu else 8)),
                "dtype": args.dtype, "iter_num": int(ckpt.get("iter_num", -1))}
    if os.path.isfile(path) and not args.recompute:
        with open(path) as f:
            cached = json.load(f)
        if cached.get("settings") == settings and len(cached.get("importance", [])) == mc["n_layer"]:
            print(f"{run}: importance from cache {path}")
            return cached
        print(f"{run}: {path} is stale (other eval settings or checkpoint), recomputing")
    if not os.path.isfile(data_path):
        raise UserError(f"held-out data {data_path} does not exist: prepare the dataset "
                        f"'{tc.get('dataset')}' or pass --data path/to/val.bin")
    model, _ = load_model(run, device)
    data = load_tokens(data_path, model.config.vocab_size)
    print(f"{run}: measuring importance on {device}: {settings['eval_batches']} batches x {settings['batch_size']} "
        f"x {settings['block_size']} tokens of {data_path}, {model.config.n_layer + 1} evaluations")
    base, ablated = compute_importance(model, data, settings["block_size"], settings["batch_size"],
                                       settings["eval_batches"], device, args.dtype)
    result = {"metric": "ppl_increase", "baseline": base, "importance": [a - base for a in ablated],
              "layer_names": [f"layer.{i}" for i in range(model.config.n_layer)], "ablated": ablated,
              "settings": settings, "device": device}
    atomic_write_json(result, path, indent=1)
    return result


# ---- one run's analysis ------------------------------------------------------------------------
def analyse(run, args):
    """Everything about one run directory as a dict (see the keys at the end)."""
    if not os.path.isdir(run):
        raise UserError(f"{run} is not a run directory (train one with `python train.py config/x.py`)")
    dump = load_grad_dump(run)
    names = dump["layer_names"]
    share = np.asarray(dump["share"], dtype=np.float64)
    has_ckpt = os.path.isfile(os.path.join(run, "ckpt.pt"))
    if has_ckpt:
        ckpt = read_checkpoint(run)   # one read for the configs; load_model only when importance is recomputed
        mc = ckpt["model_config"]
        imp = None if args.no_importance else importance_for_run(run, ckpt, args)
    else:   # no checkpoint (yet): resnet.py's runs, or an LM run before its first checkpoint
        cfg_path, imp_path = os.path.join(run, "model_config.json"), os.path.join(run, "importance.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                mc = json.load(f)
        elif os.path.isfile(imp_path):   # resnet.py's run: a plain stack of its blocks
            mc = {"n_layer": len(names)}
        else:
            raise UserError(f"{run} has grad_norms.npz but no ckpt.pt, model_config.json or importance.json")
        imp = None
        if os.path.isfile(imp_path) and not args.no_importance:
            with open(imp_path) as f:
                imp = json.load(f)
    N = mc["n_layer"]
    if len(share) != N:
        raise UserError(f"{run}: grad_norms.npz has {len(share)} layers but the model has {N}")
    kind, phi, repeats = theory_for(mc)
    rho_t, p_t = spearman(share, phi)
    out = {"run": run, "name": os.path.basename(os.path.normpath(run)), "kind": kind, "n_layer": N,
           "repeats": repeats, "theory": phi, "share": share.tolist(),
           "steps": int(len(dump["steps"])), "rho_theory": rho_t, "p_theory": p_t, "fit": fit_decay(share, N, phi)}
    if imp is not None:
        if len(imp["importance"]) != N:
            raise UserError(f"{run}/importance.json has {len(imp['importance'])} layers, the dump has {N}")
        rho, p = spearman(share, imp["importance"])
        out.update(metric=imp.get("metric", "ppl_increase"), baseline=imp["baseline"],
                   importance=list(imp["importance"]), rho=rho, p=p)
    return out


def fmt_p(p):
    return "nan" if not np.isfinite(p) else f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def print_report(r):
    metric = {"ppl_increase": "dPPL", "top1_drop": "dTop1"}.get(r.get("metric"), "dM")
    print(f"\n== {r['run']}: {r['kind']} fan-in, {r['n_layer']} layers, share over {r['steps']} logged steps")
    print(f"{'layer':>5} {'repeats':>7} {'fan-in':>7} {'fan-in %':>8} {'share %':>8} {metric:>10}")
    tot = sum(r["theory"])
    for l in range(r["n_layer"]):
        imp = f"{r['importance'][l]:>10.4f}" if "importance" in r else f"{'-':>10}"
        print(f"{l:>5} {r['repeats'][l]:>7} {r['theory'][l]:>7} {100 * r['theory'][l] / tot:>8.2f} "
              f"{100 * r['share'][l]:>8.2f} {imp}")
    if "importance" in r:
        base = "baseline ppl" if r["metric"] == "ppl_increase" else "baseline"
        print(f"{base} {r['baseline']:.4f}")
        print(f"Spearman share vs importance: rho = {r['rho']:.3f}, p = {fmt_p(r['p'])} (two-sided permutation)")
    print(f"Spearman share vs theoretical fan-in: rho = {r['rho_theory']:.3f}, p = {fmt_p(r['p_theory'])}")
    f = r["fit"]
    print(f"share decay fit: linear R^2 {f['linear']['r2']:.3f} (rmse {f['linear']['rmse']:.4f}), "
          f"quadratic R^2 {f['quadratic']['r2']:.3f} (rmse {f['quadratic']['rmse']:.4f}) -> {f['verdict']}")
    if "theory" in f:
        print(f"share vs this run's own fan-in ({r['kind']}): R^2 {f['theory']['r2']:.3f} "
              f"(rmse {f['theory']['rmse']:.4f}, slope {'+' if f['theory']['slope'] > 0 else '-'})")
    if any(x != 1 for x in r["repeats"]):
        print(VIRTUAL_NOTE)


# ---- figures -----------------------------------------------------------------------------------
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    fig.savefig(path, dpi=130, bbox_inches="tight")
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
    ax.set_ylabel("accumulated gradient share  /  fan-in / sum")
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
    ax.set_title(f"{r['name']}: Spearman ρ = {r['rho']:.2f}, p = {fmt_p(r['p'])}")
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
    """Per-layer share (red, dashed) and importance (blue, solid) on one axis, twin y."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    x = np.arange(r["n_layer"])
    l1 = ax.plot(x, r["share"], "o--", color="tab:red", label="gradient share $\\bar g_i$")
    ax.set_xlabel("layer (0 = first, as in the table and passthrough)")
    ax.set_ylabel("accumulated gradient share", color="tab:red")
    ax.tick_params(axis="y", colors="tab:red")
    ax2 = ax.twinx()
    l2 = ax2.plot(x, r["importance"], "s-", color="tab:blue", label="importance")
    ax2.set_ylabel(_imp_label(r) + (", log" if _wide(r["importance"]) else ""), color="tab:blue")
    if _wide(r["importance"]):
        ax2.set_yscale("log")
    ax2.tick_params(axis="y", colors="tab:blue")
    ax.set_xticks(x)
    ax.grid(alpha=0.3)
    ax.set_title(f"{r['name']}: share and importance per layer (ρ = {r['rho']:.2f}, p = {fmt_p(r['p'])})")
    ax.legend(l1 + l2, [h.get_label() for h in l1 + l2], fontsize=8, loc="upper center",
              bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    _save(fig, path)


# ---- CLI -------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(
        description="GFA: fan-in theory vs measured gradient share, layer importance, Figures 3-8.",
        epilog="--theory CONFIG.py [--key=value ...] prints a config's fan-in table (model keys as everywhere). "
               + VIRTUAL_NOTE)
    ap.add_argument("paths", nargs="*", help="run directories (or, with --theory, a config file)")
    ap.add_argument("--theory", action="store_true", help="print the theoretical fan-in table and exit")
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
    args, extra = ap.parse_known_args(argv)

    if args.theory:
        if len(args.paths) == 1 and os.path.isdir(args.paths[0]):
            mc = read_checkpoint(args.paths[0])["model_config"]
        else:
            mc = read_config(args.paths + extra, model_only=True)
        print_theory(mc)
        return
    if extra:
        raise UserError(f"unknown argument(s) {' '.join(extra)} (--key=value overrides go with --theory; "
                        f"see python fanin.py --help)")
    if not args.paths:
        raise UserError("give a run directory, e.g. `python fanin.py out/demo`, or --theory config/x.py")
    if args.dtype not in ("float32", "tf32", "bfloat16"):
        raise UserError(f"--dtype {args.dtype}: use float32, tf32 or bfloat16")
    if args.no_importance and args.baseline:
        raise UserError("--baseline compares importance: drop --no_importance")
    if args.fig_dir:
        os.makedirs(args.fig_dir, exist_ok=True)

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
    for r in runs:
        if "importance" in r:
            fig4(r, dest(r, "fig4_share_vs_importance.png"))
            fig678(r, dest(r, "fig678_layerwise.png"))
            if base:
                fig5(r, base, dest(r, f"fig5_vs_{base['name']}.png"))
    summary = {"runs": runs, "baseline": base}
    path = os.path.join(args.fig_dir or runs[0]["run"], "fanin_summary.json")
    atomic_write_json(summary, path, indent=1, default=float)
    print(f"wrote {path}")
    return summary


if __name__ == "__main__":
    cli(main)
