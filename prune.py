"""
CascadeFlow Pruning (CFP) against three baselines, scored by perplexity and HellaSwag: Table 1.

    python prune.py --k 4                                   # the run in out/vanilla_16l
    python prune.py --runs out/a out/b out/c --k 1,2,4,6,8  # seeds: mean +- std per cell
    python prune.py --runs out/a --k 4 --methods cfp --save_pruned out/a_cfp4   # a smaller run directory
    python prune.py --combine out/a/prune/results.json out/b/prune/results.json --out t1   # seeds pruned apart
    python prune.py --runs out/layerskip out/vanilla_16l --exits   # early exit: PPL, HellaSwag after every layer

Methods (paper Appendix A.4); each prints its full ranking, then prunes by passthrough
(the removed layers are skipped as identity, model.set_passthrough):
  cfp         the k layers with the lowest accumulated training-gradient share (Eq. 2, from
              <run>/grad_norms.npz, over the steps the checkpoint's weights have seen), at any positions.
  magnitude   A.4: "for projection matrices, values are first reduced along the input dimension
              to obtain per-output scores, then aggregated within the block". Read with an L1
              reduction that sentence changes nothing (sum |W| either way), so the default
              (--magnitude=row_l2) reduces each output row by its L2 norm: block score = sum over
              the block's matrices of ||W[o, :]||_2 over outputs o, plus sum |g| of its RMSNorm gains
              (already one value per output). --magnitude=sum is sum |W| over all its weights.
              Summed rather than averaged, so a narrower (tapered) layer counts as the smaller mass
              it is. Embeddings, LM head and final norm are excluded. The k lowest blocks go.
  taylor      on --calib_batches batches of TRAINING data (fixed windows): block score = sum
              over batches and over the block's weights of |W * dL/dW| (elementwise |.| per
              batch, one backward per batch, L = the final LM loss). k lowest go.
  similarity  Gromov et al.: angular distance arccos(cos(h_l, h_{l+k})) / pi between the input
              of layer l and the input of layer l+k (h_N = the last block's output), of the LAST
              token of each calibration sequence, as the authors define it (--similarity_tokens=all
              averages over every position instead: less noisy on a small calibration set). The
              contiguous block [l, l+k) with the smallest distance goes. Its per-layer ranking (for
              the cross-seed stability) is the k=1 distance.

Evaluation (gfa/evaluation.py): held-out perplexity over a fixed token set (same numbers every
call) and zero-shot multiple choice on HellaSwag (acc: summed log-prob of the ending; acc_norm:
log-prob per character). Outputs under --out: table1.md, table1_ppl.png, results.json.

Early exit (--exits): the same two scores for the final norm and head after every layer E, each
batch scored at all exits from one forward pass (the curve LayerSkip reports for deep-supervision
models; an exit after E is also the model with layers E..N-1 removed). Outputs: exits.md,
exits.png (PPL and acc_norm vs E, one line per run), exits.json.
"""
import json
import math
import os
import time
from functools import lru_cache
from itertools import combinations

import numpy as np
import torch

from gfa import rundir
from gfa.cli import ArgumentParser, UserError, cli
from gfa.data import DATA, get_batch, load_tokens, run_dataset_dir
from gfa.device import autocast_for, pick_device
from gfa.evaluation import choice_accuracy, ending_logprobs, evaluate, get_encoder, load_multiple_choice
from gfa.hf_llama import source_tokenizer
from gfa.theory import mean_std, spearman
from model import drop_layers

METHODS = ("cfp", "similarity", "taylor", "magnitude")   # the paper's column order
LABELS = {"cfp": "CFP (ours)", "similarity": "Similarity", "taylor": "Taylor", "magnitude": "Magnitude"}


# ---- block scores ------------------------------------------------------------------------------
def _abs_sum(tensors):
    """sum of |t| over all elements of all tensors, a float64 scalar on their device (no host sync)."""
    return sum(t.abs().sum(dtype=torch.float64) for t in tensors)


MAGNITUDE_READINGS = ("row_l2", "sum")


@torch.no_grad()
def magnitude_scores(model, reading="row_l2"):
    """Per block: 'row_l2' = sum over its matrices of the L2 norm of each output row, plus sum |g| of
    its norm gains; 'sum' = sum of |W| over all its weights. One host copy for all blocks."""
    def block_score(b):
        if reading == "sum":
            return _abs_sum(b.parameters())
        return sum(p.norm(dim=1, dtype=torch.float64).sum() if p.dim() >= 2 else p.abs().sum(dtype=torch.float64)
                   for p in b.parameters())
    return torch.stack([block_score(b) for b in model.blocks]).cpu().numpy()


def taylor_scores(model, batches, device, ctx):
    """Per block: sum over batches and weights of |W * dL/dW|. Gradients only for the blocks;
    the scores accumulate on the device in float64, one host copy at the end."""
    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    params = [list(b.parameters()) for b in model.blocks]
    flat = [p for ps in params for p in ps]
    acc = torch.zeros(len(params), device=device, dtype=torch.float64)
    try:
        model.eval()   # no deep-supervision aux losses: L is the final LM loss
        for p in model.parameters():
            p.requires_grad_(False)
        for p in flat:
            p.requires_grad_(True)
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with ctx:
                _, loss = model(x, y)
            grads = iter(torch.autograd.grad(loss, flat))
            for b, ps in enumerate(params):
                acc[b] += _abs_sum(p.detach() * next(grads) for p in ps)
    finally:   # an error mid-way must not leave the model frozen or in eval mode
        for p, f in flags.items():
            p.requires_grad_(f)
        model.train(was_training)
    return acc.cpu().numpy()


@torch.no_grad()
def angular_distances(model, batches, device, ctx, tokens="last"):
    """D[l, m] (l < m, m <= N): mean of arccos(cos(h_l, h_m)) / pi over the last token of every
    sequence (tokens='last', Gromov et al.) or over all tokens ('all'), where h_l is the input of
    block l (its first application if repeated) and h_N the input of the final norm."""
    N = model.config.n_layer
    hidden = {}   # i -> input of block i (i = N: of the final norm), one forward's worth

    def grab(i):
        def hook(module, args):
            hidden.setdefault(i, args[0].detach())   # first application only (virtual depth)
        return hook
    hooks = [b.register_forward_pre_hook(grab(i)) for i, b in enumerate(model.blocks)]
    hooks.append(model.norm_f.register_forward_pre_hook(grab(N)))
    was_training = model.training
    model.eval()
    D, count = torch.zeros(N + 1, N + 1, device=device, dtype=torch.float64), 0
    try:
        for x, _ in batches:
            hidden.clear()
            with ctx:
                model(x.to(device))
            # [tokens, N+1, C], unit rows; float64 so the cosines near 1 (where arccos is steep)
            # keep their digits and no TF32 matmul touches them
            h = torch.stack([hidden[i] for i in range(N + 1)], dim=2)   # [B, T, N+1, C]
            h = (h[:, -1] if tokens == "last" else h.flatten(0, 1)).double()
            h.div_(h.norm(dim=-1, keepdim=True).clamp_min(1e-12))   # in place: h is the big tensor here
            cos = torch.bmm(h, h.transpose(1, 2)).clamp(-1.0, 1.0)   # all pairs (l, m) of every token at once
            D += torch.arccos(cos).sum(0) / math.pi
            count += h.size(0)
    finally:
        for hk in hooks:
            hk.remove()
        model.train(was_training)
    return (D.triu(1) / count).cpu().numpy()   # l < m only, as before; the diagonal is 0


def cfp_share(run, n_layer, ckpt, steps=0):
    """Eq. 2 share per layer over the steps the checkpoint's weights have seen (gfa.rundir), or over
    its first `steps` steps only (any-time CFP: the ranking a run had reached by then)."""
    if not os.path.isfile(rundir.file(run, rundir.GRAD_DUMP)) and not ckpt.get("grad_dump"):
        raise UserError(f"run {run} has no gradient dump (grad_norms.npz): CFP needs one; train the run "
                        f"with train.py, or leave cfp out of --methods")
    if steps > ckpt["iter_num"]:
        raise UserError(f"--cfp_steps {steps}: the checkpoint of {run} has seen {ckpt['iter_num']} steps; give at "
                        f"most that (0 = all of them)")
    share = rundir.read_grad_dump(run, before_step=steps or ckpt["iter_num"], ckpt=ckpt)["share"]
    if len(share) != n_layer:
        raise UserError(f"gradient dump of {run} has {len(share)} layers but the model has {n_layer}")
    return share


# ---- pruning choices -----------------------------------------------------------------------------
def lowest(scores, k):
    return sorted(int(i) for i in np.argsort(scores, kind="stable")[:k])


def similarity_block(D, k):
    """(start l of the contiguous block [l, l+k) with the smallest D[l, l+k], all candidate distances)."""
    N = D.shape[0] - 1
    cand = np.array([D[l, l + k] for l in range(N - k + 1)])
    return int(np.argmin(cand)), cand


def print_ranking(name, scores, what):
    order = np.argsort(scores, kind="stable")
    print(f"{name} ranking, least important first ({what}):")
    print("  " + "  ".join(f"L{i}:{scores[i]:.4g}" for i in order))


# ---- run-level work ---------------------------------------------------------------------------
def parse_ks(text):
    parts = [v.strip() for v in str(text).split(",")]
    if not all(p.isdigit() for p in parts):
        raise UserError(f"--k {text!r}: give positive integers separated by commas, e.g. --k 1,2,4,6,8")
    return sorted(set(int(p) for p in parts))


def parse_methods(text):
    ms = [m.strip().lower() for m in str(text).split(",") if m.strip()]
    bad = [m for m in ms if m not in METHODS]
    if bad or not ms:
        raise UserError(f"--methods {text!r}: choose from {','.join(METHODS)}")
    return [m for m in METHODS if m in ms]


def rank_layers(model, methods, ks, share, calib, device, ctx, args):
    """Each method's per-layer scores (higher = more important; printed as a ranking) and its
    choice of layers to remove for every k: (scores {method: [N]}, choice {(method, k): layers})."""
    scores, choice = {}, {}
    for m in methods:
        if m == "similarity":
            D = angular_distances(model, calib, device, ctx, args.similarity_tokens)
            scores[m] = np.array([D[l, l + 1] for l in range(model.config.n_layer)])
            print_ranking("similarity", scores[m], f"angular distance d(h_l, h_l+1), {args.similarity_tokens} token(s)")
            for k in ks:
                l, cand = similarity_block(D, k)
                choice[(m, k)] = list(range(l, l + k))
                print(f"  similarity k={k}: blocks [l, l+{k}) by distance: "
                      + "  ".join(f"{i}:{cand[i]:.4f}" for i in np.argsort(cand, kind="stable")))
            continue
        if m == "cfp":
            scores[m], what = share, "accumulated gradient share"
        elif m == "magnitude":
            scores[m] = magnitude_scores(model, args.magnitude)
            what = "sum of |W|" if args.magnitude == "sum" else "sum of per-output-row L2 norms"
        else:
            scores[m], what = taylor_scores(model, calib, device, ctx), f"sum |W*dL/dW| over {len(calib)} calibration batches"
        print_ranking(m, scores[m], what)
        for k in ks:
            choice[(m, k)] = lowest(scores[m], k)
    return scores, choice


def data_folder(run, args, ckpt):
    """The dataset folder of a run: --data, else the one its training config names."""
    folder = run_dataset_dir(ckpt.get("train_config"), args.data)
    if folder is None:
        raise UserError(f"run {run} does not name its dataset: pass --data <dataset name or folder>")
    return folder


def load_run(run, args, device):
    """(model with every layer running, checkpoint, dataset folder, held-out tokens) of a run; a
    passthrough in its config is noted and cleared: pruning and early exit score every layer."""
    model, ckpt = rundir.load_gpt(run, device)
    if model.passthrough:
        print(f"note: {run} has passthrough layers {sorted(model.passthrough)} in its config; every layer is scored")
        model.set_passthrough([])
    ddir = data_folder(run, args, ckpt)
    return model, ckpt, ddir, load_tokens(os.path.join(ddir, "val.bin"), model.config.vocab_size)


def prune_run(run, args, ks, methods, hs_items, device, ctx):
    """Scores, choices and evaluations for one run: a dict for the table."""
    t0 = time.time()
    model, ckpt, ddir, val = load_run(run, args, device)
    cfg = model.config
    N, T = cfg.n_layer, cfg.block_size
    for k in ks:
        if not 1 <= k <= N - 1:
            raise UserError(f"k={k}: must be in [1, {N - 1}] for the {N}-layer model of {run}")
    print(f"== run {run}: {N} layers, {model.num_params() / 1e6:.1f}M params, held-out {ddir}/val.bin")

    share = cfp_share(run, N, ckpt, args.cfp_steps) if "cfp" in methods else None   # fail early, before any compute
    calib = None
    if "taylor" in methods or "similarity" in methods:
        train = load_tokens(os.path.join(ddir, "train.bin"), cfg.vocab_size)
        # fixed windows of the training data (seeded): the calibration set is the same every call
        calib = [get_batch(train, args.batch_size, T, step, args.calib_seed) for step in range(args.calib_batches)]

    scores, choice = rank_layers(model, methods, ks, share, calib, device, ctx, args)

    cache = {}   # frozenset(layers) -> metrics: methods that agree share one evaluation
    tokenizer = source_tokenizer(ckpt, args.tokenizer)
    # cached: each text is encoded once
    encode = lru_cache(maxsize=None)(get_encoder(cfg.vocab_size, tokenizer)) if hs_items is not None else None

    def score(layers):
        key = frozenset(layers)
        if key not in cache:
            model.set_passthrough(layers)
            loss = evaluate(model, val, T, args.batch_size, args.eval_batches, device, ctx)
            r = {"ppl": math.exp(loss), "loss": loss}
            if hs_items is not None:
                lp = ending_logprobs(model, hs_items, encode, device, ctx, args.hs_tokens)
                r["acc"], r["acc_norm"] = choice_accuracy(lp, hs_items)
            model.set_passthrough([])
            cache[key] = r
        return cache[key]

    res = {"run": run, "n_layer": N, "baseline": score([]), "cells": {}, "scores": {m: list(map(float, s))
           for m, s in scores.items()}}
    print(f"  baseline: {_fmt_metrics(res['baseline'])}")
    for m in methods:
        for k in ks:
            r = dict(score(choice[(m, k)]), layers=choice[(m, k)])
            res["cells"][f"{m}/{k}"] = r
            print(f"  {m:<10} k={k}: remove {r['layers']}  {_fmt_metrics(r)}")
    print(f"  ({time.time() - t0:.1f}s)")
    return res, model, ckpt, choice


def _fmt_metrics(r):
    s = f"ppl {r['ppl']:.3f}"
    if "acc" in r:
        s += f"  acc {r['acc']:.4f}  acc_norm {r['acc_norm']:.4f}"
    return s


# ---- Table 1 ----------------------------------------------------------------------------------------
def _cell(values, digits):
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def stability(results, methods):
    """Mean pairwise Spearman rho of each method's per-layer scores between runs (seeds)."""
    if len(results) < 2:
        return {}
    out = {}
    for m in methods:
        rhos = [spearman(a["scores"][m], b["scores"][m])[0] for a, b in combinations(results, 2)]
        out[m] = (float(np.mean(rhos)), [float(r) for r in rhos])
    return out


def table1(results, ks, methods, stab, hs_name):
    has_hs = "acc" in results[0]["baseline"]
    n = len(results)
    metrics = [("PPL ↓", "ppl", 3)] + ([("acc ↑", "acc", 4), ("acc_norm ↑", "acc_norm", 4)] if has_hs else [])
    head = ["k", "metric"] + [LABELS[m] for m in methods]
    lines = [f"Table 1: layer pruning of {results[0]['n_layer']}-layer model(s), {n} run(s)"
             + (" (mean ± sample std over runs)" if n > 1 else ""),
             f"PPL: held-out perplexity. HellaSwag ({hs_name}): acc = argmax of summed log-prob of the ending, "
             f"acc_norm = argmax of log-prob per character of the ending." if has_hs else
             "PPL: held-out perplexity. HellaSwag: skipped (no --hellaswag file).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, key, d in metrics:
        lines.append(f"| 0 (baseline) | {label} | " + " | ".join(_cell([r["baseline"][key] for r in results], d)
                                                             for _ in methods) + " |")
    for k in ks:
        for label, key, d in metrics:
            lines.append(f"| {k} | {label} | " + " | ".join(
                _cell([r["cells"][f"{m}/{k}"][key] for r in results], d) for m in methods) + " |")
    lines += ["", "Removed layers (per run):", "", "| k | " + " | ".join(LABELS[m] for m in methods) + " |",
              "|" + "---|" * (len(methods) + 1)]
    for k in ks:
        lines.append(f"| {k} | " + " | ".join(" / ".join(str(r["cells"][f"{m}/{k}"]["layers"]) for r in results)
                                               for m in methods) + " |")
    if stab:
        lines += ["", "Ranking stability across runs: mean pairwise Spearman rho of each method's per-layer scores "
                  "(similarity: the k=1 angular distance)", "", "| method | mean rho | pairs |", "|---|---|---|"]
        for m in methods:
            lines.append(f"| {LABELS[m]} | {stab[m][0]:.3f} | {', '.join(f'{r:.3f}' for r in stab[m][1])} |")
    return "\n".join(lines) + "\n"


def plot(results, ks, methods, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    has_hs = "acc" in results[0]["baseline"]
    fig, axes = plt.subplots(1, 2 if has_hs else 1, figsize=(11 if has_hs else 6, 4), squeeze=False)
    for m in methods:
        for ax, key in zip(axes[0], ["ppl", "acc_norm"]):
            ms = [mean_std([r["cells"][f"{m}/{k}"][key] for r in results]) for k in ks]
            ax.errorbar(ks, [a for a, _ in ms], yerr=[s for _, s in ms], marker="o", capsize=3, label=LABELS[m])
    for ax, key, name in zip(axes[0], ["ppl", "acc_norm"], ["held-out PPL (log)", "HellaSwag acc_norm"]):
        ax.axhline(mean_std([r["baseline"][key] for r in results])[0], color="gray", ls="--", label="baseline (k=0)")
        ax.set_xlabel("layers removed k")
        ax.set_ylabel(name)
        ax.set_xticks(ks)
    axes[0][0].set_yscale("log")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- early exit -----------------------------------------------------------------------------------
def exit_curve(run, args, hs_items, device, ctx):
    """Early exit: held-out PPL (and multiple-choice accuracy) of the final norm and head after every
    layer E = 1..N, each batch scored at every exit from one forward pass. Keeping the exits after
    E is the same as removing layers E..N-1, so the curve is also top-down pruning."""
    model, ckpt, ddir, val = load_run(run, args, device)
    cfg = model.config
    print(f"== run {run}: exits after each of {cfg.n_layer} layers, held-out {ddir}/val.bin")
    losses = evaluate(model, val, cfg.block_size, args.batch_size, args.eval_batches, device, ctx, exits=True)
    rows = [{"exit": i + 1, "loss": loss, "ppl": math.exp(loss)} for i, loss in losses.items()]
    if hs_items is not None:
        encode = lru_cache(maxsize=None)(get_encoder(cfg.vocab_size, source_tokenizer(ckpt, args.tokenizer)))
        for r, lp in zip(rows, ending_logprobs(model, hs_items, encode, device, ctx, args.hs_tokens, exits=True)):
            r["acc"], r["acc_norm"] = choice_accuracy(lp, hs_items)
    for r in rows:
        print(f"  exit after layer {r['exit']:>2}: {_fmt_metrics(r)}")
    return {"run": run, "n_layer": cfg.n_layer, "deep_supervision": cfg.deep_supervision, "exits": rows}


def write_exits(results, hs_path, out):
    """exits.md (a row per exit, a column per run and metric), exits.png (vs E) and exits.json."""
    has_hs = "acc" in results[0]["exits"][0]
    metrics = [("PPL", "ppl", 3)] + ([("acc", "acc", 4), ("acc_norm", "acc_norm", 4)] if has_hs else [])
    head = ["exit after layer E"] + [f"{r['run']} {label}" for r in results for label, _, _ in metrics]
    lines = ["Early exit: the final norm and LM head after layer E (held-out PPL"
             + (f"; HellaSwag {hs_path})" if has_hs else ")"), "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    by_exit = [{x["exit"]: x for x in r["exits"]} for r in results]   # models of fewer layers: blank cells
    for E in range(1, max(r["n_layer"] for r in results) + 1):
        cells = [f"{b[E][key]:.{d}f}" if E in b else "" for b in by_exit for _, key, d in metrics]
        lines.append(f"| {E} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    rundir.atomic_write_text(text, os.path.join(out, "exits.md"))
    rundir.atomic_write_json({"mc_file": hs_path, "runs": results}, os.path.join(out, "exits.json"), indent=1)
    plot_exits(results, os.path.join(out, "exits.png"))
    print(f"wrote {out}/exits.md, exits.png, exits.json")
    return results


def plot_exits(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = ["ppl"] + (["acc_norm"] if "acc_norm" in results[0]["exits"][0] else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for r in results:
            label = r["run"] + (" (deep supervision)" if r["deep_supervision"] else "")
            ax.plot([x["exit"] for x in r["exits"]], [x[key] for x in r["exits"]], marker="o", label=label)
        ax.set_xlabel("exit after layer E")
        ax.set_ylabel({"ppl": "held-out PPL (log)", "acc_norm": "HellaSwag acc_norm"}[key])
    axes[0][0].set_yscale("log")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_pruned(path, model, ckpt, layers, run, method, k):
    """The model with `layers` physically removed, as a run directory (gfa.rundir) that every
    script loads: model_config.json, ckpt.pt (with pruned_from) and grad_norms.npz (the dump's
    kept layers, renamed, over the steps the source checkpoint saw)."""
    small = drop_layers(model, layers)
    keep = model.config.kept_layers(layers)
    extra = {"pruned_from": {"run": run, "method": method, "k": k, "removed_layers": list(layers)}}
    dump = None
    if os.path.isfile(rundir.file(run, rundir.GRAD_DUMP)) or ckpt.get("grad_dump"):
        d = rundir.read_grad_dump(run, before_step=ckpt["iter_num"], ckpt=ckpt)
        cols = [d["names"].index(n) for n in ["embed"] + [f"layer.{l}" for l in keep] + ["head"] if n in d["names"]]
        new_names = ["embed"] + [f"layer.{i}" for i in range(len(keep))] + ["head"]
        dump = rundir.GradNormDump(new_names, rundir.file(path, rundir.GRAD_DUMP))
        dump.load_state_dict({"names": new_names, "steps": d["steps"], "norms": d["norms"][:, cols]})
        extra["grad_dump"] = dump.state_dict()
    rundir.save_gpt(path, small, ckpt.get("train_config") or {}, ckpt.get("iter_num", 0), **extra)
    if dump is not None:
        dump.flush()
    print(f"saved the {small.config.n_layer}-layer model ({method}, k={k}, removed {list(layers)}) to {path}")


def check_runs(runs, save_pruned, out, same_architecture=True):
    """Before any work: every run has a checkpoint, all share one architecture (seeds of one config:
    their numbers are averaged; not for --exits, which compares models), and --save_pruned writes a
    new run, not over one."""
    configs = []
    for run in runs:
        if not os.path.isfile(rundir.file(run, rundir.CKPT)):
            raise UserError(f"checkpoint {rundir.file(run, rundir.CKPT)} does not exist (train the run with train.py, "
                            f"or pass --runs <run dir>)")
        kind, mc = rundir.read_model_config(run)
        if kind != "gpt":
            raise UserError(f"{run} holds a {kind} model: prune.py prunes language models")
        rundir.read_checkpoint(run)   # readable (memory-mapped: the weights are not read here)
        configs.append({k: v for k, v in mc.items() if k != "passthrough"})   # pruning scores every layer
    for run, mc in zip(runs[1:], configs[1:] if same_architecture else []):
        diff = sorted(k for k in mc.keys() | configs[0].keys() if mc.get(k) != configs[0].get(k))
        if diff:
            what = ", ".join(f"{k} {configs[0].get(k)} vs {mc.get(k)}" for k in diff)
            raise UserError(f"{runs[0]} and {run} have different architectures ({what}): --runs takes seeds of one "
                            f"config")
    if save_pruned:
        if os.path.realpath(save_pruned) in {os.path.realpath(r) for r in runs}:
            raise UserError(f"--save_pruned {save_pruned} is the run being pruned: give a new folder")
        if rundir.has_checkpoint(save_pruned) or os.path.isfile(rundir.file(save_pruned, rundir.GRAD_DUMP)):
            raise UserError(f"--save_pruned {save_pruned} already holds a run: give a new folder")
    for folder in [f for f in (out, save_pruned) if f]:   # writable? known before hours of evaluation
        created, probe = not os.path.exists(folder), os.path.join(folder, f".write_test{os.getpid()}")
        try:
            os.makedirs(folder, exist_ok=True)
            open(probe, "w").close()
            os.remove(probe)
            if created:
                os.rmdir(folder)
        except OSError as e:
            raise rundir.cannot_write(folder, e) from None

def main(argv):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", default=["out/vanilla_16l"], help="run directories; several = seeds")
    p.add_argument("--k", default="1,2,4,6,8", help="layers to remove, one or several: 4 or 1,2,4,6,8")
    p.add_argument("--methods", default=",".join(METHODS), help="subset of " + ",".join(METHODS))
    p.add_argument("--hellaswag", default=None, help="HellaSwag-layout jsonl (default "
                   "data/hellaswag/hellaswag_val.jsonl if present; 'none' skips)")
    p.add_argument("--hs_items", type=int, default=0, help="score only the first N items (0 = all)")
    p.add_argument("--hs_tokens", type=int, default=16384, help="padded tokens per HellaSwag batch")
    p.add_argument("--tokenizer", default=None, help="HellaSwag: the HF model folder whose tokenizer.json encodes "
                   "the text (default: the folder an imported run came from, else by vocabulary: bytes or GPT-2)")
    p.add_argument("--data", default=None, help="dataset name or folder (default: the run's train_config dataset)")
    p.add_argument("--eval_batches", type=int, default=20, help="held-out batches for perplexity")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per batch (perplexity, calibration)")
    p.add_argument("--cfp_steps", type=int, default=0, help="any-time CFP: the share over the first N training "
                   "steps only (0 = every step the checkpoint saw)")
    p.add_argument("--calib_batches", type=int, default=8, help="training-data batches for Taylor/Similarity")
    p.add_argument("--calib_seed", type=int, default=1234, help="seed of the calibration windows")
    p.add_argument("--similarity_tokens", default="last", choices=("last", "all"),
                   help="similarity over the last token of each sequence (Gromov et al.) or over all tokens")
    p.add_argument("--magnitude", default="row_l2", choices=MAGNITUDE_READINGS,
                   help="magnitude score: per-output-row L2 norms summed (row_l2), or sum |W| (sum)")
    p.add_argument("--exits", action="store_true", help="early exit instead of pruning: PPL and HellaSwag of the "
                   "exit after every layer, one pass per batch; --runs may be different models (exits.md, exits.png)")
    p.add_argument("--combine", nargs="+", default=None, help="results.json files of earlier prune.py calls "
                   "(e.g. one per seed, run on different machines): one table over all their runs, no model loaded")
    p.add_argument("--device", default="", help="default cuda when available, else cpu")
    p.add_argument("--dtype", default="float32", help="float32 (the paper), tf32 or bfloat16")
    p.add_argument("--out", default=None, help="folder for table1.md, table1_ppl.png, results.json "
                   "(default <first run>/prune)")
    p.add_argument("--save_pruned", default=None, help="write the pruned model (one run, one k, one method) "
                   "with its layers physically removed, as a new run directory")
    args = p.parse_args(argv)

    if args.combine:
        return write_table(*combine(args.combine), args.out or "prune_combined")
    ks, methods = parse_ks(args.k), parse_methods(args.methods)
    for name in ("eval_batches", "batch_size", "calib_batches", "hs_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1")
    if args.calib_seed < 0 or args.hs_items < 0:
        raise UserError("--calib_seed and --hs_items must be >= 0")
    if args.cfp_steps < 0:
        raise UserError(f"--cfp_steps {args.cfp_steps}: must be >= 0 (0 = every step the checkpoint saw)")
    if args.save_pruned and (len(args.runs) > 1 or len(ks) > 1 or len(methods) > 1):
        raise UserError("--save_pruned writes one model: give one run, one --k and one --methods")
    if args.exits and args.save_pruned:
        raise UserError("--exits evaluates the exits of whole models: leave out --save_pruned")
    out = args.out or os.path.join(args.runs[0], "prune")
    check_runs(args.runs, args.save_pruned, out, same_architecture=not args.exits)
    hs_path = args.hellaswag
    if hs_path is None:
        hs_path = os.path.join(DATA, "hellaswag", "hellaswag_val.jsonl")   # the repo's data/, from any cwd
        if not os.path.isfile(hs_path):
            print(f"note: HellaSwag skipped: {hs_path} is absent (run data/hellaswag/prepare.py, or pass "
                  f"--hellaswag <jsonl in HellaSwag layout>)")
            hs_path = "none"
    hs_items = None if hs_path == "none" else load_multiple_choice(hs_path, args.hs_items)
    if hs_items:
        print(f"HellaSwag: {len(hs_items)} items from {hs_path}")
    device = pick_device(args.device)
    ctx = autocast_for(torch.device(device).type, args.dtype)

    if args.exits:
        return write_exits([exit_curve(run, args, hs_items, device, ctx) for run in args.runs], hs_path, out)
    results = []
    for run in args.runs:
        res, model, ckpt, choice = prune_run(run, args, ks, methods, hs_items, device, ctx)
        results.append(res)
        if args.save_pruned:
            save_pruned(args.save_pruned, model, ckpt, choice[(methods[0], ks[0])], run, methods[0], ks[0])
        del model
    settings = {"magnitude": args.magnitude, "similarity_tokens": args.similarity_tokens,
                "calib_batches": args.calib_batches, "batch_size": args.batch_size, "dtype": args.dtype,
                "cfp_steps": args.cfp_steps}
    return write_table(results, ks, methods, hs_path, settings, out)


def combine(paths):
    """The runs of several results.json files, checked to be one table: (results, ks, methods, mc file, settings)."""
    runs, first = [], None
    for path in paths:
        try:
            with open(path) as f:
                r = json.load(f)
            key = (r["ks"], r["methods"], r.get("mc_file", "none"), r.get("settings", {}))
            runs += r["runs"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"--combine {path}: not a results.json of prune.py ({type(e).__name__})") from None
        if first is not None and key != first[1]:
            raise UserError(f"--combine: {path} was made with other --k, --methods, multiple-choice file or "
                            f"settings than {first[0]}: only runs pruned the same way make one table")
        first = first or (path, key)
    ks, methods, mc_file, settings = first[1]
    if len({r["n_layer"] for r in runs}) > 1:
        raise UserError("--combine: the runs have different numbers of layers: --combine takes seeds of one config")
    return runs, ks, methods, mc_file, settings


def write_table(results, ks, methods, hs_path, settings, out):
    stab = stability(results, methods)
    text = table1(results, ks, methods, stab, hs_path)
    print()
    print(text)
    rundir.atomic_write_text(text, os.path.join(out, "table1.md"))
    rundir.atomic_write_json({"ks": ks, "methods": methods, "mc_file": hs_path, "settings": settings, "runs": results,
                              "stability": stab}, os.path.join(out, "results.json"), indent=1)
    plot(results, ks, methods, os.path.join(out, "table1_ppl.png"))
    print(f"wrote {out}/table1.md, table1_ppl.png, results.json")
    return results


if __name__ == "__main__":
    cli(main)
