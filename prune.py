"""
CascadeFlow Pruning (CFP) against the baselines, scored by perplexity and zero-shot accuracy: Table 1,
with optional healing and the speed of the physically pruned models.

    python prune.py --k 4                                   # the run in out/vanilla_16l
    python prune.py --runs out/a out/b out/c --k 1,2,4,6,8  # seeds: mean +- std per cell
    python prune.py --runs out/a --k 4 --methods cfp --save_pruned out/a_cfp4   # a smaller run directory
    python prune.py --combine out/a/prune/results.json out/b/prune/results.json --out t1   # seeds pruned apart
    python prune.py --runs out/layerskip out/vanilla_16l --exits   # early exit: PPL, HellaSwag after every layer
    python prune.py --combine out/a/exits/exits.json out/b/exits/exits.json --out ee   # curves measured apart
    python prune.py --runs out/a out/b out/c --k 2,4,8 --methods cfp,similarity,taylor,magnitude,block_influence,sleb \
        --tasks piqa,winogrande,hellaswag,arc_easy,arc_challenge --heal_tokens 2e7 --speed   # the whole study
    python prune.py --runs out/a --k 4,8 --methods reverse,replaceme,early_grad,cfp_calib,cfp \
        --heal_tokens 2e6 --heal_mode full,partial,lora   # the 2025-2026 baselines, three healings

Several --runs, and --combine, pool seeds of one experiment only (gfa/rundir.py's check_poolable: the same
architecture, recipe and data, other seeds, no run twice); --allow_mixed pools others, and the table and
results.json say so. results.json carries each run's identity for a later --combine.

Methods: the registry in gfa/pruning.py (`python prune.py --help` lists each with what it needs); each
prints its full ranking, then prunes by passthrough (the removed layers are skipped as identity,
model.set_passthrough). The paper's four (Appendix A.4: cfp, similarity, taylor, magnitude) are the default.

Evaluation (gfa/evaluation.py): held-out perplexity over a fixed token set (same numbers every
call) and zero-shot multiple choice with the in-house scorer on a HellaSwag-layout file (acc:
summed log-prob of the ending; acc_norm: log-prob per character); --tasks adds lm-eval's tasks
through gfa/lm_eval_adapter.py (lm-eval installed; built-in tasks or local YAMLs via --include_path).
--heal_tokens N continues training every pruned model for N tokens (train.py --init_from, a fresh
optimizer: its settings below) and measures it again, once per --heal_mode: full (every weight), partial
(the LM head and the last --heal_last_layers layers; train.py --tune=partial) or lora (adapters merged
back; --tune=lora); --speed times the physically pruned models with bench.py (forward latency and
throughput, decode ms/token). Both run the scripts as a user would (the commands are printed); their
models go under --out, and only their logs stay unless --keep_models. Outputs under --out: table1.md
(ending with Table 1 in the field's form: % of the dense model's accuracy and perplexity kept at 25 % and
50 % of the layers removed), table1_ppl.png, table1_kept.png, results.json.

Early exit (--exits): the same two scores for the final norm and head after every layer E, each
batch scored at all exits from one forward pass (the curve LayerSkip reports for deep-supervision
models; an exit after E is also the model with layers E..N-1 removed). Outputs: exits.md,
exits.png (PPL and acc_norm vs E, one line per run), exits.json.
"""
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict
from itertools import combinations

import numpy as np
import torch

from gfa import rundir
from gfa.cli import ArgumentParser, UserError, cli, int_list
from gfa.data import DATA, get_batch, load_tokens, run_dataset_dir
from gfa.device import autocast_for, pick_device
from gfa.evaluation import Tokenizer, choice_accuracy, encode_items, ending_logprobs, evaluate, load_multiple_choice
from gfa.hf_llama import source_tokenizer
from gfa.pruning import MAGNITUDE_READINGS, METHODS as REGISTRY, PruneInput, edited
from gfa.theory import mean_std, spearman
from model import drop_layers

PAPER_METHODS = tuple(m for m in REGISTRY if REGISTRY[m].default)   # the default, in the paper's column order
SCRIPTS = os.path.dirname(os.path.abspath(__file__))   # train.py and bench.py, run for healing and timing


def print_ranking(name, scores, what):
    order = np.argsort(scores, kind="stable")
    print(f"{name} ranking, least important first ({what}):")
    print("  " + "  ".join(f"L{i}:{scores[i]:.4g}" for i in order))


# ---- run-level work ---------------------------------------------------------------------------
def parse_ks(text):
    ks = int_list(text, "--k", "1,2,4,6,8", minimum=0)   # 0 gets the range error, which names the valid ks
    if not ks:
        raise UserError(f"--k {text!r}: give the numbers of layers to remove, e.g. --k 1,2,4,6,8")
    return sorted(set(ks))


def parse_methods(text):
    ms = [m.strip().lower() for m in str(text).split(",") if m.strip()]
    bad = [m for m in ms if m not in REGISTRY]
    if bad or not ms:
        raise UserError(f"--methods {text!r}: choose from {','.join(REGISTRY)}")
    return [m for m in REGISTRY if m in ms]   # the registry's (the table's) column order


def rank_layers(model, methods, ks, inp):
    """Each method's Ranking (gfa/pruning.py's registry), its full ranking printed: {method: Ranking}."""
    rankings = {}
    for m in methods:
        r = rankings[m] = REGISTRY[m].rank(model, ks, inp)
        print_ranking(m, r.scores, r.what)
        for line in r.notes:
            print(line)
    return rankings


def method_label(m):
    """A method's column in the table (a results.json may name one this version no longer registers)."""
    return REGISTRY[m].label if m in REGISTRY else m


def methods_help():
    """--help's list of the methods: the registry's descriptions and needs."""
    lines = ["methods (--methods; gfa/pruning.py's registry; * = the default set):"]
    for m in REGISTRY.values():
        needs = [w for w, f in (("calibration batches", m.calibration), ("gradients", m.gradients),
                                ("the run's gradient dump", m.training_dump)) if f]
        text = f"{m.name}{' *' if m.default else ''}: {m.description}" + (f" Needs {', '.join(needs)}." if needs else "")
        lines.append(textwrap.fill(text, 110, initial_indent="  ", subsequent_indent="      "))
    return "\n".join(lines)


def measurer(val, T, mc, tasks, tok, args, device, ctx):
    """measure(model) -> {ppl, loss[, acc, acc_norm][, tasks, zero_shot_mean]} of the model as it is
    (its passthrough included). mc: (items, their encoded pairs) or None; tasks: lm-eval's or None;
    tok: the run's tokenizer (run_tokenizer)."""
    def measure(model):
        loss = evaluate(model, val, T, args.batch_size, args.eval_batches, device, ctx)
        r = {"ppl": math.exp(loss), "loss": loss}
        if mc is not None:
            r["acc"], r["acc_norm"] = choice_accuracy(ending_logprobs(model, mc[1], device, ctx, args.hs_tokens), mc[0])
        if tasks is not None:
            from gfa.lm_eval_adapter import evaluate_tasks
            r["tasks"] = evaluate_tasks(model, tasks, device, args.dtype, args.task_limit, args.hs_tokens, tok=tok)
            r["zero_shot_mean"] = float(np.mean([headline(m) for m in r["tasks"].values()]))
        return r
    return measure


def headline(task_metrics):
    """A task's number in the table: acc_norm where lm-eval reports it, else acc."""
    return task_metrics.get("acc_norm", task_metrics.get("acc", float("nan")))


def run_data(run, ckpt, args):
    """The dataset folder of a run (--data, else its training config's)."""
    folder = run_dataset_dir(ckpt.get("train_config"), args.data)
    if folder is None:
        raise UserError(f"run {run} does not name its dataset: pass --data <dataset name or folder>")
    return folder


def load_run(run, args, device, ks=()):
    """(model with every layer running, checkpoint, dataset folder, held-out tokens) of a run, checked
    for pruning each k in ks; a passthrough in its config is noted and cleared: pruning and early exit
    score every layer."""
    model, ckpt = rundir.load_gpt(run, device)
    N = model.config.n_layer
    for k in (k for k in ks if not 1 <= k <= N - 1):
        pruned = ckpt.get("pruned_from")
        raise UserError(f"k={k}: must be in [1, {N - 1}] for the {N}-layer model of {run}" + (
            f" (already pruned: {pruned['removed_layers']} removed from {pruned['run']})" if pruned else ""))
    if model.passthrough:
        print(f"note: {run} has passthrough layers {sorted(model.passthrough)} in its config; every layer is scored")
        model.set_passthrough([])
    ddir = run_data(run, ckpt, args)
    return model, ckpt, ddir, load_tokens(os.path.join(ddir, "val.bin"), model.config.vocab_size)


def prune_run(run, tag, args, ks, methods, mc_items, tasks, device, ctx, to_time):
    """Scores, choices and evaluations of one run (healed too, and saved for timing into to_time, when
    asked): (the run's dict for the table, the model, its checkpoint, the choices)."""
    t0 = time.time()
    model, ckpt, ddir, val = load_run(run, args, device, ks)
    cfg = model.config
    N, T = cfg.n_layer, cfg.block_size
    print(f"== run {run}: {N} layers, {model.num_params() / 1e6:.1f}M params, held-out {ddir}/val.bin")

    calib = None
    if any(REGISTRY[m].calibration for m in methods):
        train = load_tokens(os.path.join(ddir, "train.bin"), cfg.vocab_size)
        # fixed windows of the training data (seeded): the calibration set is the same every call; on the
        # device once, so the methods that run it many times (SLEB) copy nothing and never wait on the host
        calib = [tuple(t.to(device) for t in get_batch(train, args.batch_size, T, step, args.calib_seed))
                 for step in range(args.calib_batches)]

    rankings = rank_layers(model, methods, ks, PruneInput(calib, device, ctx, run, ckpt, args))
    choice = {(m, k): Pruned(r.choice[k], r.edits.get(k, {}), m) for m, r in rankings.items() for k in ks}
    tok = run_tokenizer(cfg, ckpt, args)
    mc = None if mc_items is None else (mc_items, encode_items(mc_items, tok))
    measure = measurer(val, T, mc, tasks, tok, args, device, ctx)
    cache = {}   # Pruned.key -> metrics: methods that agree share one evaluation

    def score(pruned):
        if pruned.key not in cache:
            with edited(model, pruned.edits):
                model.set_passthrough(pruned.layers)
                cache[pruned.key] = measure(model)
                model.set_passthrough([])
        return cache[pruned.key]

    res = {"run": run, "n_layer": N, "baseline": score(Pruned([])), "cells": {},
           "scores": {m: list(map(float, r.scores)) for m, r in rankings.items()}}
    print(f"  baseline: {_fmt_metrics(res['baseline'])}")
    for m in methods:
        for k in ks:
            p = choice[(m, k)]
            r = dict(score(p), layers=p.layers) | ({"edited": sorted(p.edits)} if p.edits else {})
            res["cells"][f"{m}/{k}"] = r
            print(f"  {m:<10} k={k}: remove {r['layers']}{' (weights edited)' if p.edits else ''}  {_fmt_metrics(r)}")
    for mode in heal_modes(args):
        heal_cells(res, choice, mode, model, ckpt, run, tag, ddir, measure, args, device)
    if args.speed:
        save_for_timing(res, model, ckpt, run, tag, args, to_time)
    print(f"  ({time.time() - t0:.1f}s)")
    return res, model, ckpt, choice


class Pruned:
    """A pruned model: the layers removed and, for a method that also changes weights (ReplaceMe), its
    edits ({parameter name: tensor}); key: what makes two of them the same model."""

    def __init__(self, layers, edits=None, method=""):
        self.layers, self.edits = sorted(int(i) for i in layers), edits or {}
        self.key = (frozenset(self.layers), method if self.edits else "")
        self.tag = set_tag(self.layers) + (f"_{method}" if self.edits else "")


def _fmt_metrics(r):
    s = f"ppl {r['ppl']:.3f}"
    if "acc" in r:
        s += f"  acc {r['acc']:.4f}  acc_norm {r['acc_norm']:.4f}"
    if "tasks" in r:
        s += "  " + "  ".join(f"{t} {headline(v):.4f}" for t, v in r["tasks"].items())
    return s


# ---- healing and timing: train.py and bench.py on the physically pruned models ------------------------
def command_line(script, argv):
    """`python <script> argv` as a user would type it."""
    return "python " + shlex.join([script, *argv])


def start_script(script, argv, log=None):
    """`python <script> argv` started in a child process, printed first as a user would type it; its output
    goes to the file `log` when given, else to this process's."""
    print(f"$ {command_line(script, argv)}" + (f" > {log}" if log else ""), flush=True)
    out = open(log, "w") if log else None
    try:
        return subprocess.Popen([sys.executable, os.path.join(SCRIPTS, script), *argv], stdout=out,
                                stderr=subprocess.STDOUT if out else None)
    finally:
        if out:
            out.close()


def run_script(script, argv, check=True):
    """start_script, waited for (bench.py times). Returns its exit status; with check, a failure is a one-line
    error."""
    status = start_script(script, argv).wait()
    if check and status:
        raise UserError(f"{script} failed (exit status {status}, its error is above): {command_line(script, argv)}")
    return status


def set_tag(layers):
    return "drop_" + ("-".join(map(str, sorted(layers))) or "none")


HEAL_OWNED = ("init_from", "out_dir", "max_iters", "batch_size", "learning_rate", "tune", "tune_last",
              "lora_rank")   # train.py keys healing sets
HEAL_MODES = {"full": "every weight trained (continued training)",
              "partial": "the LM head, final norm and last --heal_last_layers remaining layers trained, the rest frozen",
              "lora": "LoRA adapters (rank --heal_lora_rank) on every linear map of the remaining layers, merged back"}
HEAL_KEPT = ("seed", "dtype", "grad_clip", "weight_decay", "beta1", "beta2", "eval_iters", "eval_batch_size")


def heal_argv(train_config, pruned, healed, ddir, T, args, mode="full", n_left=0):
    """train.py's arguments that heal a pruned model: its run's optimizer settings, dtype and seed, a fresh
    schedule over heal_tokens tokens (5 % warm-up, cosine to lr / 10), evaluated at the start and the end;
    `mode` (HEAL_MODES) picks the weights trained (train.py's tune; partial: of the n_left layers left)."""
    tc = train_config
    B = args.heal_batch_size or tc.get("batch_size", 8)
    steps = max(1, math.ceil(args.heal_tokens / (B * T)))
    lr = args.heal_lr or tc.get("learning_rate", 2e-4) / 10
    return ([f"--{k}={tc[k]!r}" for k in HEAL_KEPT if k in tc]
            + [f"--init_from={pruned}", f"--out_dir={healed}", f"--data_dir={ddir}", f"--batch_size={B}",
               f"--max_iters={steps}", f"--warmup_iters={steps // 20}", f"--learning_rate={lr!r}",
               f"--min_lr={lr / 10!r}", f"--eval_interval={steps}", f"--log_interval={max(1, steps // 10)}",
               "--equalize=False", "--overwrite=True", f"--device={args.device}"]
            + {"full": [], "partial": ["--tune=partial", f"--tune_last={min(args.heal_last_layers, n_left)}"],
               "lora": ["--tune=lora", f"--lora_rank={args.heal_lora_rank}"]}[mode] + shlex.split(args.heal_args))


MEASURE_KEYS = ("eval_batches", "batch_size", "hellaswag", "hs_items", "hs_tokens", "tasks", "task_limit",
                "include_path", "dtype")   # what measurer()'s numbers depend on, besides the model


def heal_modes(args):
    """The healing modes asked for ([] without --heal_tokens)."""
    return [m.strip() for m in args.heal_mode.split(",") if m.strip()] if args.heal_tokens else []


def healed_key(mode):
    """The cell key of a healing mode's metrics ('healed' for full training, as before the modes)."""
    return "healed" if mode == "full" else f"healed_{mode}"


def heal_cells(res, choice, mode, model, ckpt, run, tag, ddir, measure, args, device):
    """Every distinct pruned model of a run, saved with its layers removed, healed by train.py (`mode`: full,
    partial or lora) and measured again: cell[healed_key(mode)]. Only the healed runs' logs, dumps and
    healed.json stay unless --keep_models. A model healed and measured the same way by an earlier call (its
    healed.json) is not healed again, so a call stopped half-way goes on where it stopped."""
    jobs = {}   # one per distinct pruned model
    for name in res["cells"]:
        m, k = name.split("/")
        p = choice[(m, int(k))]
        if p.key not in jobs:
            by = [f"{a}/{b}" for (a, b), q in choice.items() if q.key == p.key]
            jobs[p.key] = heal_job(p, by, mode, model, ckpt, run, tag, ddir, args)
    heal_all([j for j in jobs.values() if j["metrics"] is None], model, ckpt, run, measure, args, device)
    for name, cell in res["cells"].items():
        m, k = name.split("/")
        cell[healed_key(mode)] = jobs[choice[(m, int(k))].key]["metrics"]
        print(f"  {name:<12} healed ({mode}, {args.heal_tokens:,.0f} tokens): {_fmt_metrics(cell[healed_key(mode)])}")


def heal_job(p, by, mode, model, ckpt, run, tag, ddir, args):
    """One pruned model's heal: where it goes, train.py's arguments, what it is stamped with, and the metrics
    of an earlier call that healed and measured it the same way (else None)."""
    suffix = "" if mode == "full" else f"_{mode}"
    healed = os.path.join(args.out, "healed", f"{tag}_{p.tag}{suffix}")
    pruned = os.path.join(args.out, "models", f"{tag}_{p.tag}")
    argv = heal_argv(ckpt.get("train_config") or {}, pruned, healed, ddir, model.config.block_size, args, mode,
                     model.config.n_layer - len(p.layers))
    stamp = {"source": run, "checkpoint": rundir.checkpoint_id(ckpt), "removed_layers": p.layers, "train_argv": argv,
             "measure": {k: getattr(args, k) for k in MEASURE_KEYS}} | ({"edited_by": p.key[1]} if p.edits else {})
    done = rundir.read_healed(healed, stamp)
    if done is not None:
        print(f"  {p.tag} ({mode}): healed and measured by an earlier call ({healed}/{rundir.HEALED}): reused")
    return {"pruned_model": p, "by": by, "pruned": pruned, "healed": healed, "argv": argv, "stamp": stamp,
            "metrics": done}


def heal_all(todo, model, ckpt, run, measure, args, device):
    """train.py on each job's pruned model, --heal_jobs at a time (small models share a GPU well), each
    measured and recorded (healed.json) as soon as it is done. Several at a time, each child's output goes to
    <healed>.log, kept if it fails. A failure stops new heals; those running finish and are kept. An error
    here (or Ctrl-C) stops the children still running, so none goes on holding the device."""
    running = []
    try:
        heal_pool(todo, running, model, ckpt, run, measure, args, device)
    except BaseException:
        for _, child, _ in running:
            child.terminate()
            child.wait()
        raise


def heal_pool(todo, running, model, ckpt, run, measure, args, device):
    """heal_all's loop; `running` holds the (job, child, log) started and not yet done."""
    pending, failed = list(todo), []
    while running or (pending and not failed):
        while pending and not failed and len(running) < args.heal_jobs:
            j = pending.pop(0)
            save_pruned(j["pruned"], model, ckpt, j["pruned_model"].layers, run, j["by"], j["pruned_model"].edits)
            log = j["healed"] + ".log" if args.heal_jobs > 1 else None
            os.makedirs(os.path.dirname(j["healed"]), exist_ok=True)
            running.append((j, start_script("train.py", j["argv"], log), log))
        finished = [r for r in running if r[1].poll() is not None]
        if not finished:
            time.sleep(0.2)
            continue
        for j, child, log in finished:
            running.remove((j, child, log))
            if child.returncode:
                failed.append(f"train.py failed healing {j['healed']} (exit status {child.returncode}; its error "
                              f"is {'in ' + log if log else 'above'}): {command_line('train.py', j['argv'])}")
                continue
            if log:
                os.remove(log)
            healed_model, _ = rundir.load_gpt(j["healed"], device)
            j["metrics"] = dict(measure(healed_model), run_dir=j["healed"])
            del healed_model
            rundir.write_healed(j["healed"], j["stamp"], j["metrics"])
            if not args.keep_models:
                shutil.rmtree(j["pruned"])
                os.remove(rundir.file(j["healed"], rundir.CKPT))
    if failed:
        raise UserError(failed[0] + (f" ({len(failed) - 1} more failed)" if len(failed) > 1 else ""))


def architecture(config):
    """What a model's speed depends on: its config (layers, widths, repeats, passthrough), as a key."""
    return json.dumps(asdict(config), sort_keys=True)


def save_for_timing(res, model, ckpt, run, tag, args, to_time):
    """Into to_time {architecture: model dir}: the baseline and every pruned model of an architecture not
    saved yet, with the layers physically removed (models of one architecture time alike)."""
    for cell in [res["baseline"]] + list(res["cells"].values()):
        layers = cell.get("layers", [])
        cell["architecture"] = architecture(model.config.without_layers(layers))
        if cell["architecture"] not in to_time:
            path = os.path.join(args.out, "models", f"{tag}_{set_tag(layers)}_timing")
            save_pruned(path, model, ckpt, layers, run, [])
            to_time[cell["architecture"]] = path


def time_models(to_time, T, args):
    """{architecture: speed} from bench.py on the saved models: forward latency (median ms) and tok/s of
    one block_size-token sequence, decode ms/token; the bench JSON and markdown stay in <out>/speed/."""
    dirs = list(to_time.values())
    extra = shlex.split(args.bench_args)
    out = os.path.join(args.out, "speed")
    half = max(2, min(128, T // 2))
    # on CUDA the forward under CUDA graphs, as decode is: a small model's plain compiled forward is launch-bound,
    # 2.4-2.8x slower and out of order with its depth (docs/RESULTS.md: extended Table 1, the re-timing)
    graphs = ["--compile=reduce-overhead"] if torch.device(args.device).type == "cuda" else []
    runs = {"inference": [f"--seq={T}", *graphs],
            "decode": [f"--prompt_len={half}", f"--new_tokens={half}"]}
    speed = {arch: {} for arch in to_time}
    for mode, shape in runs.items():
        path = os.path.join(out, f"{mode}.json")
        if os.path.exists(path):
            os.remove(path)   # a result of an earlier call must not pass for this one's
        run_script("bench.py", [*dirs, f"--mode={mode}", *shape, f"--device={args.device}", f"--out={path}", *extra],
                   check=False)   # a failed row is written with its error: the table shows it
        if not os.path.isfile(path):
            raise UserError(f"bench.py wrote no {path}: its error is above")
        with open(path) as f:
            bench = json.load(f)
        rows = bench["rows"]
        for arch, d in to_time.items():
            row = next((r for r in rows if r["config"] == os.path.basename(d)), {"error": "not timed"})   # 1st dtype
            speed[arch]["dtype"] = row.get("dtype")
            if mode == "inference":
                speed[arch].update(forward_ms=row.get("median_ms"), tok_s=row.get("tok_s"),
                                   forward_compile=bench["meta"].get("compile"))
            else:
                speed[arch]["decode_ms_per_token"] = row.get("ms_per_token")
            if "error" in row:
                speed[arch][f"{mode}_error"] = row["error"]
    if not args.keep_models:
        for d in dirs:
            shutil.rmtree(d)
    return speed


def remove_if_empty(folder):
    if os.path.isdir(folder) and not os.listdir(folder):
        os.rmdir(folder)


# ---- Table 1 ----------------------------------------------------------------------------------------
def _get(d, path):
    for key in path:
        d = d.get(key) if isinstance(d, dict) else None
    return d


def _cell(values, digits, spread=True):
    """mean ± std of a cell's values over runs; spread=False (speed: one measurement per architecture, taken
    in the runs that timed it) prints the mean of the values there are."""
    values = values if spread else [v for v in values if v is not None]
    if not values or any(v is None for v in values):
        return "—"
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if spread else f"{m:.{digits}f}"


def stability(results, methods):
    """Mean pairwise Spearman rho of each method's per-layer scores between runs (seeds)."""
    if len(results) < 2:
        return {}
    out = {}
    for m in methods:
        rhos = [spearman(a["scores"][m], b["scores"][m])[0] for a, b in combinations(results, 2)]
        out[m] = (float(np.mean(rhos)), [float(r) for r in rhos])
    return out


def timed_cell(results):
    """A cell with the speed of its model, from whichever run timed it (seeds pruned apart, one timed)."""
    return next((c for r in results for c in r["cells"].values() if "speed" in c), None)


def forward_how(results):
    """How the forward was compiled, where the timed runs say (results of before it was recorded do not)."""
    mode = timed_cell(results)["speed"].get("forward_compile")
    if not mode:
        return ""
    return f"; forward compiled with mode={mode}" + (" (CUDA graphs)" if mode == "reduce-overhead" else "")


def heal_name(mode):
    return "" if mode == "full" else f", {mode}"   # full training: the table's 'Healed' of before the modes


def healed_modes(cell):
    """The healing modes a cell was measured after, in HEAL_MODES' order."""
    return [m for m in HEAL_MODES if healed_key(m) in cell]


def table_sections(results):
    """[(title, [(label, path into a cell, digits)])]: the sections of the table and the rows of each k,
    for what the runs measured."""
    cell = next(iter(results[0]["cells"].values()))
    rows = [("PPL ↓", ("ppl",), 3)]
    if "acc" in cell:
        rows += [("acc ↑", ("acc",), 4), ("acc_norm ↑", ("acc_norm",), 4)]
    for task, metrics in cell.get("tasks", {}).items():
        name = "acc_norm" if "acc_norm" in metrics else "acc"
        rows.append((f"{task} {name} ↑", ("tasks", task, name), 4))
    if "tasks" in cell:
        rows.append(("zero-shot mean ↑", ("zero_shot_mean",), 4))
    sections = [("Pruned (layers passed through)", rows)]
    for mode in healed_modes(cell):
        sections.append((f"Healed{heal_name(mode)} (the pruned model trained further, then measured again)",
                         [(label, (healed_key(mode), *path), d) for label, path, d in rows]))
    if timed_cell(results):
        sections.append(("Speed of the physically pruned model", [
            ("forward ms ↓", ("speed", "forward_ms"), 2), ("tok/s ↑", ("speed", "tok_s"), 0),
            ("decode ms/token ↓", ("speed", "decode_ms_per_token"), 3)]))
    return sections


def table1(results, ks, methods, stab, settings):
    n = len(results)
    head = ["k", "metric"] + [method_label(m) for m in methods]
    lines = [f"Table 1: layer pruning of {results[0]['n_layer']}-layer model(s), {n} run(s)"
             + (" (mean ± sample std over runs)" if n > 1 else ""), "", *legend(results, settings)]
    for title, rows in table_sections(results):
        spread = not title.startswith("Speed")   # one measurement per architecture, not per run
        lines += ["", f"{title}:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for label, path, d in rows:
            base = _cell([_get(r["baseline"], path) for r in results], d, spread)
            if base != "—":   # healing leaves the baseline alone
                lines.append(f"| 0 (baseline) | {label} | " + " | ".join(base for _ in methods) + " |")
        for k in ks:
            for label, path, d in rows:
                lines.append(f"| {k} | {label} | " + " | ".join(
                    _cell([_get(r["cells"][f"{m}/{k}"], path) for r in results], d, spread) for m in methods) + " |")
    lines += ["", "Removed layers (per run):", "", "| k | " + " | ".join(method_label(m) for m in methods) + " |",
              "|" + "---|" * (len(methods) + 1)]
    for k in ks:
        lines.append(f"| {k} | " + " | ".join(" / ".join(str(r["cells"][f"{m}/{k}"]["layers"]) for r in results)
                                               for m in methods) + " |")
    if stab:
        notes = {"similarity": "similarity: the k=1 angular distance", "sleb": "sleb: the first round"}
        which = "; ".join(notes[m] for m in methods if m in notes)
        lines += ["", "Ranking stability across runs: mean pairwise Spearman rho of each method's per-layer scores"
                  + (f" ({which})" if which else ""), "", "| method | mean rho | pairs |", "|---|---|---|"]
        for m in methods:
            lines.append(f"| {method_label(m)} | {stab[m][0]:.3f} | {', '.join(f'{r:.3f}' for r in stab[m][1])} |")
    lines += agreement_with_cfp(results, methods) + kept_table(results, ks, methods, settings)
    return "\n".join(lines) + "\n"


def agreement_with_cfp(results, methods):
    """How each method's per-layer ranking agrees with CFP's (the training-history share) in the same run:
    Spearman rho per run, for the calibration-gradient and early-gradient shares above all."""
    if "cfp" not in methods or len(methods) < 2:
        return []
    lines = ["", "Agreement with CFP's ranking (Spearman rho of the per-layer scores with CFP's, per run):", "",
             "| method | rho per run | mean |", "|---|---|---|"]
    for m in (m for m in methods if m != "cfp"):
        rhos = [spearman(r["scores"][m], r["scores"]["cfp"])[0] for r in results]
        lines.append(f"| {method_label(m)} | {', '.join(f'{x:.3f}' for x in rhos)} | {np.mean(rhos):.3f} |")
    return lines


# ---- the field's form: % of the dense model kept --------------------------------------------------------------
def average_accuracy(m):
    """The accuracy a cell's "% kept" is of: the mean of the lm-eval tasks' numbers when measured (zero-shot
    mean), else the in-house multiple choice's acc_norm; None if neither."""
    return m.get("zero_shot_mean", m.get("acc_norm"))


def kept_percent(cell, base):
    """(% of the dense average accuracy kept, % of its perplexity kept) of one run's cell (or one healed
    stage of it): 100 x acc / acc_dense and 100 x ppl_dense / ppl (so lower perplexity is more kept)."""
    acc, acc0 = average_accuracy(cell), average_accuracy(base)
    return (100 * acc / acc0 if acc is not None and acc0 else None), 100 * base["ppl"] / cell["ppl"]


def kept_ks(ks, n_layer):
    """The table's columns: k at 25 % and 50 % of the layers removed, where asked for, else every k."""
    field = [k for k in ks if k in (round(n_layer / 4), round(n_layer / 2))]
    return field or list(ks)


def kept_stages(results, settings):
    """[(label, path prefix into a cell)]: pruned, then each healing mode measured, with its token budget."""
    cell = next(iter(results[0]["cells"].values()))
    return [("pruned (no training)", ())] + [(f"healed {m}, {settings.get('heal_tokens', 0):.3g} tokens",
                                              (healed_key(m),)) for m in healed_modes(cell)]


def kept_table(results, ks, methods, settings):
    """Table 1 in the field's form: % of the dense model's average accuracy and perplexity kept, mean ± std
    over runs, per method and stage, at 25 % and 50 % of the layers removed."""
    N, cols = results[0]["n_layer"], kept_ks(ks, results[0]["n_layer"])
    has_acc = average_accuracy(results[0]["baseline"]) is not None
    what = ["acc kept %", "PPL kept %"] if has_acc else ["PPL kept %"]
    head = ["method", "stage"] + [f"k={k} ({100 * k / N:.0f} % removed) {w}" for k in cols for w in what]
    lines = ["", "Table 1, the field's form: % of the dense model kept (mean ± std over runs). acc kept = 100 x "
             "(average accuracy of the pruned model) / (that of the dense model), the average being "
             + ("the mean over the lm-eval tasks (zero-shot mean)" if "zero_shot_mean" in results[0]["baseline"] else
                "the multiple-choice acc_norm") + "; PPL kept = 100 x dense PPL / pruned PPL.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        for label, pre in kept_stages(results, settings):
            vals = []
            for k in cols:
                per_run = [kept_percent(_get(r["cells"][f"{m}/{k}"], pre), r["baseline"]) for r in results]
                vals += [_cell([p[i] for p in per_run], 1) for i in range(len(what))] if has_acc else \
                    [_cell([p[1] for p in per_run], 1)]
            lines.append(f"| {method_label(m)} | {label} | " + " | ".join(vals) + " |")
    timed = timed_cell(results)
    if timed:
        run = next(r for r in results if "speed" in r["baseline"])
        base = run["baseline"]["speed"]
        lines += ["", "Speed-up of the physically pruned model (dense time / pruned time; bench.py, see above): "
                  + "; ".join(f"k={k}: forward {_ratio(base, run['cells'][f'{methods[0]}/{k}']['speed'], 'forward_ms')}"
                              f", decode {_ratio(base, run['cells'][f'{methods[0]}/{k}']['speed'], 'decode_ms_per_token')}"
                              for k in cols)]
    return lines


def _ratio(base, speed, key):
    return f"{base[key] / speed[key]:.2f}x" if base.get(key) and speed.get(key) else "—"


def plot_kept(results, ks, methods, settings, path):
    """Quality against layers removed: % of the dense accuracy (or perplexity) kept vs % of layers removed,
    one colour per method, one line style per stage (pruned, each healing mode), mean ± std over runs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    N = results[0]["n_layer"]
    panels = ([0] if average_accuracy(results[0]["baseline"]) is not None else []) + [1]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    x = [100 * k / N for k in ks]
    for ax, i in zip(axes[0], panels):
        for c, m in enumerate(methods):
            for (label, pre), ls in zip(kept_stages(results, settings), ("-", "--", "-.", ":")):
                ys = [[kept_percent(_get(r["cells"][f"{m}/{k}"], pre), r["baseline"])[i] for r in results] for k in ks]
                if any(v is None for y in ys for v in y):
                    continue
                ms = [mean_std(y) for y in ys]
                ax.errorbar(x, [a for a, _ in ms], yerr=[b for _, b in ms], color=f"C{c}", ls=ls, marker="o",
                            capsize=3, label=f"{method_label(m)}, {label.split(',')[0]}")
        ax.axhline(100, color="gray", ls=":")
        ax.set_xlabel("% of layers removed")
        ax.set_ylabel(["% of dense average accuracy kept", "% of dense perplexity kept (dense / pruned)"][i])
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def legend(results, settings):
    """What the rows mean, from what was measured and how."""
    cell = next(iter(results[0]["cells"].values()))
    mc = settings.get("mc_file", "none")
    out = ["PPL: held-out perplexity. " + (
        f"Multiple choice ({mc}, in-house scorer): acc = argmax of summed log-prob of the ending, acc_norm = "
        f"argmax of log-prob per character of the ending." if "acc" in cell else
        "Multiple choice (in-house): skipped (no --hellaswag file).")]
    if "tasks" in cell:
        out.append(f"lm-eval tasks, zero-shot ({settings.get('task_limit') or 'all'} items each): acc_norm where the "
                   f"task has it, else acc; zero-shot mean = their mean.")
    for mode in healed_modes(cell):
        what = HEAL_MODES[mode].replace("--heal_last_layers", str(settings.get("heal_last_layers", ""))).replace(
            "--heal_lora_rank", str(settings.get("heal_lora_rank", "")))
        out.append(f"Healed{heal_name(mode)}: the pruned model (layers removed) trained {settings['heal_tokens']:,.0f} more "
                   f"tokens, {what} (train.py --init_from; {settings.get('heal', '')}), then measured again.")
    if timed_cell(results):
        sp = timed_cell(results)["speed"]
        how = sp.get("dtype") + (f", {settings['bench_args']}" if settings.get("bench_args") else "")
        out.append(f"Speed: bench.py on the physically pruned model ({how}): forward = one {settings.get('block_size')}"
                   f"-token sequence (median ms, tok/s); decode = KV-cache greedy ms/token; one measurement per "
                   f"architecture{forward_how(results)}.")
    return out


def plot(results, ks, methods, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cell = next(iter(results[0]["cells"].values()))
    acc = ("zero_shot_mean",) if "tasks" in cell else ("acc_norm",) if "acc" in cell else None
    panels = [(("ppl",), "held-out PPL (log)")] + ([(acc, "zero-shot mean" if "tasks" in cell else "acc_norm")]
                                                   if acc else [])
    timed = timed_cell(results) is not None
    fig, axes = plt.subplots(1, len(panels) + timed, figsize=(5.5 * (len(panels) + timed), 4), squeeze=False)
    for ax, (key, name) in zip(axes[0], panels):
        for i, m in enumerate(methods):
            for pre, style in [((), "-")] + [((healed_key(h),), ls) for h, ls in zip(healed_modes(cell), ("--", "-.", ":"))]:
                vals = [[v for r in results if (v := _get(r["cells"][f"{m}/{k}"], pre + key)) is not None] for k in ks]
                if not all(vals):   # not measured (healed: not asked for)
                    continue
                ms = [mean_std(v) for v in vals]
                ax.errorbar(ks, [a for a, _ in ms], yerr=[s for _, s in ms], marker="o", capsize=3, ls=style,
                            color=f"C{i}", label=method_label(m) + (f" {pre[0].replace('_', ' ')}" if pre else ""))
        base = [v for r in results if (v := _get(r["baseline"], key)) is not None]
        if base:
            ax.axhline(mean_std(base)[0], color="gray", ls=":", label="baseline (k=0)")
        ax.set_xlabel("layers removed k")
        ax.set_ylabel(name)
        ax.set_xticks(ks)
    if timed:
        plot_speed(axes[0][-1], results, ks, methods)
    axes[0][0].set_yscale("log")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_speed(ax, results, ks, methods):
    """The pruned model's time as a fraction of the unpruned one's, against k: speed depends on the
    architecture alone, so the timed run's first method gives every k's point."""
    run = next(r for r in results if "speed" in r["baseline"])   # a timed run has speed in every cell
    base = run["baseline"]["speed"]
    for key, name, marker in (("forward_ms", "forward", "o"), ("decode_ms_per_token", "decode, per token", "s")):
        times = [(k, run["cells"][f"{methods[0]}/{k}"]["speed"].get(key)) for k in ks]
        pts = [(k, t / base[key]) for k, t in times if t and base.get(key)]
        if pts:
            ax.plot(*zip(*pts), marker=marker, label=name)
    n = results[0]["n_layer"]
    ax.plot(ks, [(n - k) / n for k in ks], color="gray", ls=":", label="layers kept / all")
    ax.set_xlabel("layers removed k")
    ax.set_ylabel("time vs the unpruned model")
    ax.set_xticks(ks)
    ax.legend(fontsize=7)


# ---- early exit -----------------------------------------------------------------------------------
def run_tokenizer(cfg, ckpt, args):
    """The tokenizer of a run's text: --tokenizer, the HF folder an imported run came from, or its vocabulary's."""
    return Tokenizer(cfg.vocab_size, source_tokenizer(ckpt, args.tokenizer))


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
        encoded = encode_items(hs_items, run_tokenizer(cfg, ckpt, args))
        for r, lp in zip(rows, ending_logprobs(model, encoded, device, ctx, args.hs_tokens, exits=True)):
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
        ax.set_ylabel({"ppl": "held-out PPL (log)", "acc_norm": "multiple-choice acc_norm"}[key])
    axes[0][0].set_yscale("log")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_pruned(path, model, ckpt, layers, run, by, edits=None):
    """The model with `layers` physically removed (and a method's weight edits applied: ReplaceMe), as a run
    directory (gfa.rundir) that every script loads: model_config.json, ckpt.pt (with pruned_from: the run,
    the layers, the methods that chose them, the parameters edited) and grad_norms.npz (the dump's kept
    layers, renamed, over the steps the source checkpoint saw)."""
    with edited(model, edits or {}):
        small = drop_layers(model, layers)
    keep = model.config.kept_layers(layers)
    extra = {"pruned_from": {"run": run, "removed_layers": list(layers), "by": list(by)}
             | ({"edited": sorted(edits)} if edits else {})}
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
    print(f"saved the {small.config.n_layer}-layer model (removed {list(layers)}{', by ' + ', '.join(by) if by else ''})"
          f" to {path}")


def check_runs(runs, save_pruned, out):
    """Before any work: every run has a checkpoint that fits its config and sane weights, and
    --save_pruned writes a new run, not over one. (That the runs are seeds of one experiment is
    rundir.check_poolable's, in main.)"""
    configs = []
    for run in runs:
        if not os.path.isfile(rundir.file(run, rundir.CKPT)):
            raise UserError(f"checkpoint {rundir.file(run, rundir.CKPT)} does not exist (train the run with train.py, "
                            f"or pass --runs <run dir>)")
        kind, _ = rundir.read_model_config(run)
        if kind != "gpt":
            raise UserError(f"{run} holds a {kind} model: prune.py prunes language models")
        _, _, mc = rundir.read_gpt(run)   # weights checked against the config and by the weights guard
        configs.append({k: v for k, v in mc.items() if k != "passthrough"})   # pruning scores every layer
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
    return configs[0]


def parse(argv):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=methods_help())
    p.add_argument("--runs", nargs="+", default=["out/vanilla_16l"], help="run directories; several = seeds")
    p.add_argument("--k", default="1,2,4,6,8", help="layers to remove, one or several: 4 or 1,2,4,6,8")
    p.add_argument("--methods", default=",".join(PAPER_METHODS), help="subset of " + ",".join(REGISTRY))
    p.add_argument("--hellaswag", default=None, help="multiple-choice jsonl in HellaSwag layout (ctx, endings, label; "
                   "any number of endings), or partial-scoring rows (WinoGrande's own, or contexts, continuation, label) for the "
                   "in-house scorer (default data/hellaswag/hellaswag_val.jsonl if present; 'none' skips)")
    p.add_argument("--hs_items", type=int, default=0, help="score only the first N items (0 = all)")
    p.add_argument("--hs_tokens", type=int, default=16384, help="padded tokens per log-likelihood batch")
    p.add_argument("--tokenizer", default=None, help="HellaSwag: the HF model folder whose tokenizer.json encodes "
                   "the text (default: the folder an imported run came from, else by vocabulary: bytes or GPT-2)")
    p.add_argument("--tasks", default="", help="lm-eval tasks, comma-separated, e.g. piqa,winogrande,hellaswag,"
                   "arc_easy,arc_challenge (needs lm-eval; default none)")
    p.add_argument("--include_path", default=None, help="folder of lm-eval task YAMLs (local tasks, offline)")
    p.add_argument("--task_limit", type=int, default=0, help="lm-eval: the first N items of each task (0 = all)")
    p.add_argument("--data", default=None, help="dataset name or folder (default: the run's train_config dataset)")
    p.add_argument("--eval_batches", type=int, default=20, help="held-out batches for perplexity")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per batch (perplexity, calibration)")
    p.add_argument("--cfp_steps", type=int, default=0, help="any-time CFP: the share over the first N training "
                   "steps only (0 = every step the checkpoint saw)")
    p.add_argument("--calib_batches", type=int, default=8, help="training-data batches for the methods that "
                   "read calibration batches (listed below)")
    p.add_argument("--calib_seed", type=int, default=1234, help="seed of the calibration windows")
    p.add_argument("--similarity_tokens", default="last", choices=("last", "all"),
                   help="similarity over the last token of each sequence (Gromov et al.) or over all tokens")
    p.add_argument("--magnitude", default="row_l2", choices=MAGNITUDE_READINGS,
                   help="magnitude score: per-output-row L2 norms summed (row_l2), or sum |W| (sum)")
    p.add_argument("--exits", action="store_true", help="early exit instead of pruning: PPL and HellaSwag of the "
                   "exit after every layer, one pass per batch; --runs may be different models (exits.md, exits.png)")
    p.add_argument("--heal_tokens", type=float, default=0, help="heal: train every pruned model this many more "
                   "tokens (train.py --init_from), e.g. 2e7; 0 = no healing")
    p.add_argument("--heal_lr", type=float, default=0, help="heal: peak learning rate (default: the run's / 10)")
    p.add_argument("--heal_batch_size", type=int, default=0, help="heal: sequences per step (default: the run's)")
    p.add_argument("--heal_mode", default="full", help="heal: which weights train, one or several (each healed apart "
                   "from the pruned model, the same --heal_tokens): " + "; ".join(f"{k} = {v}" for k, v in HEAL_MODES.items()))
    p.add_argument("--heal_last_layers", type=int, default=3, help="--heal_mode=partial: the last remaining layers "
                   "trained with the LM head")
    p.add_argument("--heal_lora_rank", type=int, default=8, help="--heal_mode=lora: the adapters' rank")
    p.add_argument("--heal_jobs", type=int, default=1, help="heal: pruned models healed at once (train.py processes "
                   "sharing the device; give each a fixed --heal_args='--micro_batch=N' that fits N-fold)")
    p.add_argument("--early_lr", type=float, default=0, help="early_grad: the fine-tuning learning rate (default: the "
                   "run's / 10, as healing)")
    p.add_argument("--early_steps", type=int, default=0, help="early_grad: fine-tuning steps on the calibration "
                   "batches (0 = one per batch)")
    p.add_argument("--heal_args", default="", help="heal: more train.py overrides, one string in the = form: "
                   "--heal_args='--compile=False --eval_iters=5'")
    p.add_argument("--speed", action="store_true", help="time every physically pruned model with bench.py")
    p.add_argument("--bench_args", default="", help="--speed: more bench.py options, one string in the = form: "
                   "--bench_args='--dtype fp32 --runs 50'")
    p.add_argument("--keep_models", action="store_true", help="keep the checkpoints of the pruned and healed models "
                   "(default: only the healed runs' logs and dumps stay)")
    p.add_argument("--combine", nargs="+", default=None, help="results.json files of earlier prune.py calls "
                   "(e.g. one per seed, run on different machines): one table over all their runs, no model loaded; "
                   "or exits.json files of --exits calls: one early-exit table and plot over their runs")
    p.add_argument("--allow_mixed", action="store_true", help="--runs / --combine: pool runs that are not seeds of "
                   "one experiment (another architecture, recipe or data; gfa/rundir.py: check_poolable); the table "
                   "and results.json say the pool is mixed")
    p.add_argument("--device", default="", help="default cuda when available, else cpu")
    p.add_argument("--dtype", default="float32", help="float32 (the paper), tf32 or bfloat16")
    p.add_argument("--out", default=None, help="folder for table1.md, table1_ppl.png, results.json "
                   "(default <first run>/prune)")
    p.add_argument("--save_pruned", default=None, help="write the pruned model (one run, one k, one method) "
                   "with its layers physically removed, as a new run directory")
    return p.parse_args(argv)


def check_args(args, ks, methods):
    """One-line errors for options that cannot work, before anything is loaded."""
    for name in ("eval_batches", "batch_size", "calib_batches", "hs_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1")
    if args.calib_seed < 0 or args.hs_items < 0:
        raise UserError("--calib_seed and --hs_items must be >= 0")
    if min(args.task_limit, args.heal_tokens, args.heal_lr, args.heal_batch_size) < 0:
        raise UserError("--task_limit, --heal_tokens, --heal_lr and --heal_batch_size must be >= 0")
    bad = [m for m in heal_modes(args) if m not in HEAL_MODES]
    if bad or (args.heal_tokens and not heal_modes(args)):
        raise UserError(f"--heal_mode {args.heal_mode!r}: choose one or several of {','.join(HEAL_MODES)}")
    if min(args.heal_last_layers, args.heal_lora_rank, args.heal_jobs) < 1 or min(args.early_lr, args.early_steps) < 0:
        raise UserError("--heal_last_layers, --heal_lora_rank and --heal_jobs must be >= 1, --early_lr and "
                        "--early_steps >= 0")
    if args.cfp_steps < 0:
        raise UserError(f"--cfp_steps {args.cfp_steps}: must be >= 0 (0 = every step the checkpoint saw)")
    if args.save_pruned and (len(args.runs) > 1 or len(ks) > 1 or len(methods) > 1):
        raise UserError("--save_pruned writes one model: give one run, one --k and one --methods")
    for arg in shlex.split(args.heal_args):
        key = arg[2:].split("=")[0] if arg.startswith("--") and "=" in arg else None
        if key is None or key in HEAL_OWNED:
            raise UserError(f"--heal_args {arg!r}: give train.py overrides as --key=value; prune.py sets init_from, "
                            f"out_dir, max_iters, batch_size and learning_rate itself (--heal_tokens, --heal_batch_size,"
                            f" --heal_lr)")


def mc_file(args):
    """The in-house multiple-choice items (None: skipped) and the file's name."""
    path = args.hellaswag
    if path is None:
        path = os.path.join(DATA, "hellaswag", "hellaswag_val.jsonl")   # the repo's data/, from any cwd
        if not os.path.isfile(path):
            print(f"note: HellaSwag skipped: {path} is absent (run data/hellaswag/prepare.py, or pass "
                  f"--hellaswag <jsonl in HellaSwag layout>)")
            path = "none"
    items = None if path == "none" else load_multiple_choice(path, args.hs_items)
    if items:
        print(f"multiple choice: {len(items)} items from {path}")
    return items, path


def main(argv):
    args = parse(argv)
    if args.combine:
        files = [(path, read_results(path)) for path in args.combine]   # each read once
        if is_exits(files[0][1]):
            return write_exits(*combine_exits(files), args.out or "exits_combined")
        return write_table(*combine(files, args.allow_mixed), args.out or "prune_combined")
    ks, methods = parse_ks(args.k), parse_methods(args.methods)
    check_args(args, ks, methods)
    if args.exits and args.save_pruned:
        raise UserError("--exits evaluates the exits of whole models: leave out --save_pruned")
    args.out = args.out or os.path.join(args.runs[0], "prune")
    config = check_runs(args.runs, args.save_pruned, args.out)
    mixed = None if args.exits else rundir.check_poolable(args.runs, args.allow_mixed)   # seeds of one experiment?
    tasks = None
    if args.tasks:   # lm-eval's tasks and their data, loaded before any model work
        from gfa.lm_eval_adapter import load_tasks
        tasks = load_tasks([t.strip() for t in args.tasks.split(",") if t.strip()], args.include_path)
    mc_items, mc_path = mc_file(args)
    args.device = pick_device(args.device)
    ctx = autocast_for(torch.device(args.device).type, args.dtype)
    if args.exits:
        return write_exits([exit_curve(run, args, mc_items, args.device, ctx) for run in args.runs], mc_path, args.out)

    results, to_time = [], {}   # to_time: one saved model per architecture, to time after all runs
    for i, run in enumerate(args.runs):
        tag = f"r{i}_{os.path.basename(os.path.normpath(run))}"
        res, model, ckpt, choice = prune_run(run, tag, args, ks, methods, mc_items, tasks, args.device, ctx, to_time)
        results.append(res | {"identity": pooled_identity(run)})   # what --combine checks
        if args.save_pruned:
            m, k = methods[0], ks[0]
            with rundir.RunStart() as start:   # one writer; a failed write leaves no half run
                start.claim(args.save_pruned)
                save_pruned(args.save_pruned, model, ckpt, choice[(m, k)].layers, run, [f"{m}/{k}"],
                            choice[(m, k)].edits)
                start.started()
        del model
    if to_time:
        speed = time_models(to_time, config["block_size"], args)
        for r in results:
            for cell in [r["baseline"]] + list(r["cells"].values()):
                cell["speed"] = speed[cell.pop("architecture")]
    remove_if_empty(os.path.join(args.out, "models"))   # saved only to heal or time (--keep_models keeps them)
    settings = {"magnitude": args.magnitude, "similarity_tokens": args.similarity_tokens,
                "calib_batches": args.calib_batches, "batch_size": args.batch_size, "dtype": args.dtype,
                "mc_file": mc_path, "tasks": args.tasks, "task_limit": args.task_limit, "heal_tokens": args.heal_tokens,
                "heal_mode": args.heal_mode, "heal_last_layers": args.heal_last_layers,
                "heal_lora_rank": args.heal_lora_rank, "early_lr": args.early_lr, "early_steps": args.early_steps,
                "heal": f"lr {args.heal_lr or 'run / 10'}, batch {args.heal_batch_size or 'run'}"
                        + (f", {args.heal_args}" if args.heal_args else ""),
                "block_size": config["block_size"], "speed": args.speed, "bench_args": args.bench_args,
                "cfp_steps": args.cfp_steps, "mixed": mixed}
    return write_table(results, ks, methods, settings, args.out)


def pooled_identity(run):
    """A run's identity for results.json (rundir.pool_member, less the machine's own path)."""
    return {k: v for k, v in rundir.pool_member(run).items() if k != "path"}


def combine_members(files):
    """[(label, identity)] of every run of read results.json files, for rundir.check_poolable: the identity
    results.json carries, or (results of earlier versions) what they say: the layer count, and the run's
    whole entry (the same file twice is the same runs twice)."""
    return [(f"{path} ({run.get('run')})", run.get("identity") or {
        "architecture": {"n_layer": run.get("n_layer")}, "fingerprint": json.dumps(run, sort_keys=True)})
        for path, r in files if isinstance(r, dict) and isinstance(r.get("runs"), list)
        for run in r["runs"] if isinstance(run, dict)]


def read_results(path):
    """One results.json or exits.json of an earlier prune.py call, or a one-line error."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"--combine {path}: cannot read it as JSON ({type(e).__name__}): give results.json or "
                        f"exits.json files of prune.py") from None


def is_exits(r):
    """Whether a read results file is an exits.json (prune.py --exits)."""
    return isinstance(r, dict) and isinstance(r.get("runs"), list) and bool(r["runs"]) and "exits" in r["runs"][0]


def combine_exits(files):
    """The runs of several read exits.json files [(path, contents)] (prune.py --exits), for one early-exit
    table and plot: (results, multiple-choice file). Runs without accuracy leave the accuracy columns out
    for all."""
    runs, mc = [], set()
    for path, r in files:
        if not is_exits(r):
            raise UserError(f"--combine {path}: not an exits.json of prune.py --exits; combine exits.json files "
                            f"with exits.json files only")
        runs += r["runs"]
        mc.add(r.get("mc_file", "none"))
    if not all("acc" in r["exits"][0] for r in runs):
        runs = [dict(r, exits=[{k: v for k, v in x.items() if k not in ("acc", "acc_norm")} for x in r["exits"]])
                for r in runs]
    return runs, " + ".join(sorted(mc))


def combine(files, allow_mixed=False):
    """The runs of several read results.json files [(path, contents)], checked to be one table: (results,
    ks, methods, settings). Speed is per architecture, not per seed: it comes from the first file that
    timed its models, and later files' timings (perhaps made another way) are left out, with a note.
    The runs must be seeds of one experiment (rundir.check_poolable), or allow_mixed: labelled mixed."""
    runs, first, timed, timed_path = [], None, {}, None
    for path, r in files:
        try:
            settings = dict(r.get("settings", {}), mc_file=r.get("mc_file", r.get("settings", {}).get("mc_file", "none")))
            key = (r["ks"], r["methods"], {k: v for k, v in settings.items() if k not in ("speed", "bench_args", "mixed")})
            if settings.get("speed") and timed_path:
                print(f"note: {path}'s speed is left out: the table's comes from {timed_path}, the first file "
                      f"that timed its models (put the one to show first)")
                r = dict(r, runs=[without_speed(run) for run in r["runs"]])
            elif settings.get("speed"):
                timed, timed_path = {k: settings[k] for k in ("speed", "bench_args")}, path
            runs += r["runs"]
        except (KeyError, TypeError, AttributeError) as e:
            raise UserError(f"--combine {path}: not a results.json of prune.py ({type(e).__name__})") from None
        if first is not None and key != first[1]:
            raise UserError(f"--combine: {path} was made with other --k, --methods, multiple-choice file or "
                            f"settings than {first[0]}: only runs pruned the same way make one table")
        first = first or (path, key)
    ks, methods, settings = first[1]
    mixed = rundir.check_poolable(combine_members(files), allow_mixed, option="--combine")
    mixed = "; ".join(m for m in [mixed] + [(r.get("settings") or {}).get("mixed") for _, r in files] if m) or None
    if len({r["n_layer"] for r in runs}) > 1:
        raise UserError("--combine: the runs have different numbers of layers: --combine takes seeds of one config")
    return runs, ks, methods, settings | timed | {"mixed": mixed}


def without_speed(run):
    """A run of results.json with its cells' speed left out (another file's timing stands for it)."""
    def strip(cell):
        return {k: v for k, v in cell.items() if k != "speed"}
    return dict(run, baseline=strip(run["baseline"]), cells={name: strip(c) for name, c in run["cells"].items()})


def write_table(results, ks, methods, settings, out):
    stab = stability(results, methods)
    text = table1(results, ks, methods, stab, settings)
    if settings.get("mixed"):   # --allow_mixed: the mean ± std is not over seeds of one experiment
        text = f"MIXED POOL (--allow_mixed; not seeds of one experiment): {settings['mixed']}\n\n" + text
    print()
    print(text)
    rundir.atomic_write_text(text, os.path.join(out, "table1.md"))
    rundir.atomic_write_json({"ks": ks, "methods": methods, "mc_file": settings["mc_file"], "settings": settings,
                              "runs": results, "stability": stab}, os.path.join(out, "results.json"), indent=1)
    plot(results, ks, methods, os.path.join(out, "table1_ppl.png"))
    plot_kept(results, ks, methods, settings, os.path.join(out, "table1_kept.png"))
    print(f"wrote {out}/table1.md, table1_ppl.png, table1_kept.png, results.json")
    return results


if __name__ == "__main__":
    cli(main)
