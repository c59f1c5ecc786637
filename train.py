r"""
Train a CascadeFormer / GFA model and dump its per-layer gradient norms.

    python train.py config/demo.py                                 # CPU demo, the embedded Shakespeare
    python train.py config/small.py config/cascade_a2.py           # a scale, then a variant: one GPU
    python train.py config/cascade_a2.py --batch_size=8 --max_iters=100
    torchrun --nproc_per_node=8 train.py config/cascade_a2.py      # DDP on one node
    torchrun --nproc_per_node=8 train.py config/cascade_a2.py --parallel=fsdp   # sharded (FSDP2, gfa/sharding.py)
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST0 --master_port=29500 train.py \
        config/cascade_a2.py                                       # ... and node_rank=1 on the second node
    python train.py config/cascade_a2.py --plan --world_size=8 --gpu_mem_gb=80   # memory per GPU; no GPU needed

Defaults below are the paper's Table 5 and the 1.2B model; config files and --key=value override
them (every GPTConfig field is a key too, e.g. --F_d=2). batch_size is the GLOBAL batch in
sequences per optimizer step; it is split over the ranks x gradient_accumulation_steps. On a GPU,
micro_batch='auto' picks the largest micro-batch the memory plan (gfa/memory.py) fits in the free
memory and the accumulation that keeps the global batch; every run's log opens with that plan.
out_dir defaults to out/<the config files' names joined by _>, e.g. out/small_cascade_a2.

Writes the run directory out_dir (gfa/rundir.py documents it): model_config.json, ckpt.pt
(atomic, at every eval), grad_norms.npz (rewritten at every log interval), log.txt, identity.json (what
the run is: architecture, recipe, seed, the data's content id; a resume refuses data that changed). One
process writes a run directory at a time (a second gets a one-line error naming the first), and a start
that fails leaves the folder as it was (gfa/rundir.py: RunStart).
init_from='resume' continues a run exactly where its checkpoint left it. init_from=<ckpt.pt or
its run directory> starts a new run from any checkpoint's weights (nanoGPT style: a pruned
model to heal, a passthrough one, another run's): the architecture is the checkpoint's (a model
key set in a config file or override must agree with it), the optimizer and the schedule are
fresh (step 0 of max_iters), and ckpt.pt records where the weights came from (initialised_from).

parallel='fsdp' shards parameters, gradients and optimizer state over the ranks (FSDP2,
gfa/sharding.py) instead of holding the whole model on each (DDP); its checkpoints are sharded
(torch.distributed.checkpoint, <out_dir>/ckpt_sharded/) and resume on any number of ranks.

Norm equalisation (Appendix A.2.2, equalize=True): after backward each transformer layer's
gradient is rescaled to the largest layer norm (gfa.training.GradStep), then clipping uses
grad_clip * equalize_clip_factor. The paper derives that factor "from the ratio of maximum
observed norms between the hooked and standard models"; equalize_clip_factor=0 (the default)
does so: from this run's initialisation and batches, a standard pilot and an equalised pilot
train equalize_pilot_iters steps each, clipped at grad_clip, and the factor is the ratio of
their largest total gradient norms. equalize_reference=<run dir> takes the standard maximum over
the same steps from that run's gradient dump instead of a pilot (a vanilla run of the same
config and seed). The pilots' weights are discarded; the factor, both maxima and where they came
from are logged and stored in ckpt.pt (equalize_clip), and the log's last line says on what share
of steps the clip fired.
equalize_via='lr' applies the same per-layer factors to the layers' learning rates instead: AdamW
normalises a rescaled gradient away, so only this changes its updates. The gradients and the clip
are left alone (no clip factor is derived), and the factors cost one host sync per step.
equalize_via='lr_mean' divides the factors by their mean over the layers, so the layers' mean lr
stays the schedule's (plain 'lr' raises it several-fold in a 16-layer model: AdamW at 2e-4 diverged).
"""
import inspect
import math
import os
import time
from dataclasses import asdict

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from gfa import memory, rundir, sharding
from gfa.cli import UserError, cli, config_name, read_config
from gfa.data import dataset_dir, get_batch, load_split, prepare_builtin
from gfa.device import DTYPES, autocast_for, peak_flops, percent, pick_device, sync
from gfa.evaluation import evaluate
from gfa.training import (Dist, FiniteGuard, GradStep, check_equalize_via, check_logger, check_optimizer_settings,
                          check_resume, check_state, check_weights, copy_weights, cosine_lr, on_master,
                          optimizer_for, restore_weights, set_lr, teardown, use_compile)
from gfa.tuning import apply_tuning, plain_state_dict
from model import GPT, GPTConfig

_before = set(globals())
# ---- defaults: the paper's Table 5 (model fields come from GPTConfig: the 1.2B Vanilla-16L) ----
out_dir = ""                   # '' = out/<config names>, e.g. out/small_cascade_a2
dataset = "dolma"              # data/<dataset>/{train,val}.bin
data_dir = ""                  # any folder with train.bin / val.bin (overrides dataset)
init_from = "scratch"          # 'scratch', 'resume' (out_dir/ckpt.pt), or a checkpoint to start from: its weights
overwrite = False              # True: a new run may replace the run already in out_dir
allow_changes = ""             # resume: settings allowed to differ from the checkpoint's, e.g. "max_iters"
seed = 324709                  # model init and the training batches of every step
batch_size = 64                # global sequences per optimizer step (x block_size tokens)
gradient_accumulation_steps = 1  # micro-steps per optimizer step (same global batch); set, it fixes micro_batch
micro_batch = "auto"           # sequences per GPU per micro-step: 'auto' = the largest the memory plan fits (CPU: 1 step)
max_iters = 53400              # one epoch of 7B tokens at 64 x 2048
stop_iter = 0                  # > 0: stop (and checkpoint) there, schedule unchanged, as if interrupted
stop_after_min = 0.0           # > 0: the same stop at the first log line after this many minutes (a job's time limit)
learning_rate = 2e-4           # peak
min_lr = 2e-5                  # end of the cosine
warmup_iters = 2000             # linear warm-up steps
optimizer = "adamw"            # 'adamw' (the paper) or 'sgd' (SGD with momentum; its lr wants retuning)
weight_decay = 0.1             # on matrices only (dim >= 2); AdamW's is decoupled, SGD's an L2 term
beta1 = 0.9                    # AdamW
beta2 = 0.95                   # AdamW
momentum = 0.9                 # SGD
grad_clip = 1.0                # 0 = off
equalize = False               # norm equalisation (Appendix A.2.2)
equalize_clip_factor = 0.0     # clip norm multiplier while equalising; 0 = derive it (see above)
equalize_pilot_iters = 0       # steps of each pilot that derives the factor (0 = warmup_iters)
equalize_reference = ""        # a standard run to take the standard maximum from ('' = a standard pilot)
equalize_via = "grad"          # 'grad' (the paper: rescale gradients), 'lr' or 'lr_mean' (scale each layer's lr; see above)
dtype = "float32"              # 'float32' (paper), 'tf32', 'bfloat16' (autocast)
device = ""                    # '' = cuda if available, else cpu
compile = None                 # None = on for cuda, off for cpu
parallel = "ddp"               # with torchrun: 'ddp' (whole model on every rank) or 'fsdp' (sharded, FSDP2)
activation_checkpointing = False  # recompute each block's activations in backward (less memory, ~1/3 more compute)
fused_ce = False               # LM head + cross-entropy fused and chunked (model.LinearCrossEntropy): no logits kept
fused_ce_chunk = 8192          # fused_ce: tokens per chunk (each chunk's fp32 logits live only inside it)
eval_interval = 1000           # steps between held-out evaluations (and checkpoints)
eval_iters = 20                # batches of the fixed held-out set
eval_batch_size = 8            # fixed, so val losses compare across batch sizes and world sizes
log_interval = 10              # steps between log lines (the only host syncs)
always_save_checkpoint = True  # False: only save when val loss improves
tune = "all"                   # which weights train (gfa/tuning.py): 'all', 'partial' (LM head + last tune_last layers), 'lora'
tune_last = 2                  # tune='partial': the last layers trained with the LM head
lora_rank = 8                  # tune='lora': the adapters' rank
lora_alpha = 16.0              # tune='lora': their scale is lora_alpha / lora_rank
wandb_log = False              # log to Weights & Biases (needs the wandb package)
wandb_project = "cascadeformer"  # its project
wandb_run_name = ""             # its run name ('' = wandb's)
plan = False                   # True (or --plan): print the per-GPU memory plan and what fits, then exit (no GPU used)
world_size = 0                 # --plan: GPUs to plan for (0 = torchrun's WORLD_SIZE, else 1)
gpu_mem_gb = 0.0               # GiB per GPU for the plan and micro_batch='auto' (0 = the GPU's; --plan without one: 80)
_DEFAULTS = {k: v for k, v in globals().items() if k not in _before and not k.startswith("_")}
# settings a resume may change freely: where output goes, how often to log and evaluate, how the same
# global batch is computed (accumulation), the device and compiler; everything else shapes the run
_FREE_ON_RESUME = {"out_dir", "init_from", "overwrite", "allow_changes", "device", "compile", "eval_interval",
                   "eval_iters", "eval_batch_size", "log_interval", "always_save_checkpoint", "stop_iter", "stop_after_min",
                   "gradient_accumulation_steps", "wandb_log", "wandb_project", "wandb_run_name",
                   "parallel", "activation_checkpointing", "fused_ce", "fused_ce_chunk",
                   "equalize_reference", "equalize_pilot_iters",   # a resume reuses the recorded clip factor
                   "micro_batch", "plan", "world_size", "gpu_mem_gb"}


def equalizing(cfg):
    """How the run equalises: 'grad' (rescaled gradients, the paper), 'lr' / 'lr_mean' (per-layer lrs) or None."""
    return cfg["equalize_via"] if cfg["equalize"] else None


def check_settings(cfg, world):
    """One-line errors for settings that cannot work; returns the micro-batch per rank."""
    accum, B = cfg["gradient_accumulation_steps"], cfg["batch_size"]
    if accum < 1 or B < 1 or B % (world * accum):
        raise UserError(f"batch_size={B} does not split evenly over world_size {world} x "
                        f"gradient_accumulation_steps {accum}: use a multiple of {world * max(accum, 1)}")
    for k in ("max_iters", "eval_interval", "log_interval", "eval_iters", "eval_batch_size"):
        if cfg[k] < 1:
            raise UserError(f"{k}={cfg[k]}: must be >= 1")
    if cfg["dtype"] not in DTYPES:
        raise UserError(f"dtype={cfg['dtype']!r}: use float32, tf32 or bfloat16")
    for k in ("warmup_iters", "grad_clip", "stop_iter", "stop_after_min"):
        if cfg[k] < 0:
            raise UserError(f"{k}={cfg[k]}: must be >= 0")
    if cfg["equalize_clip_factor"] < 0 or cfg["equalize_pilot_iters"] < 0:
        raise UserError("equalize_clip_factor and equalize_pilot_iters must be >= 0 (0 = derive / warmup_iters)")
    check_equalize_via(cfg["equalize_via"])
    grad_eq = equalizing(cfg) == "grad"
    if equalizing(cfg) not in (None, "grad") and cfg["equalize_clip_factor"]:   # 'lr', 'lr_mean'
        raise UserError(f"equalize_clip_factor acts on equalised gradients; equalize_via={cfg['equalize_via']!r} leaves "
                        f"them (and the clip) alone: leave equalize_clip_factor out")
    if grad_eq and not cfg["equalize_clip_factor"] and not cfg["grad_clip"]:
        raise UserError("equalize=True derives a clip factor, but grad_clip=0 (no clipping): give grad_clip > 0, "
                        "or equalize_clip_factor=1")
    if cfg["fused_ce_chunk"] < 1:
        raise UserError(f"fused_ce_chunk={cfg['fused_ce_chunk']}: must be >= 1 (tokens per chunk of the fused loss)")
    check_memory_settings(cfg, world)
    check_optimizer_settings(cfg)
    check_logger(cfg)
    if cfg["tune"] != "all" and (cfg["parallel"] == "fsdp" or cfg["equalize"]):
        raise UserError(f"tune={cfg['tune']!r} trains some weights only: not with parallel='fsdp' or equalize=True")
    if cfg["tune"] == "lora" and cfg["init_from"] == "resume":
        raise UserError("tune='lora' cannot resume: its checkpoints hold the merged weights, not the adapters; "
                        "start a new run from them (--init_from=<the run>)")
    use_compile(cfg["compile"], "cpu")   # checks the value
    return B // (world * accum)


# ---- memory: the plan, the micro-batch that fits, one line for what does not (gfa/memory.py) ----------------
def check_memory_settings(cfg, world):
    mb = cfg["micro_batch"]
    if mb != "auto" and not (isinstance(mb, int) and not isinstance(mb, bool) and mb >= 1):
        raise UserError(f"micro_batch={mb!r}: use 'auto' (the largest that fits the GPU) or a number of sequences >= 1")
    per_rank = cfg["batch_size"] // world
    if mb != "auto" and per_rank % mb:
        raise UserError(f"micro_batch={mb} does not divide the {per_rank} sequences each of the {world} ranks computes "
                        f"per step (batch_size={cfg['batch_size']}): use one of {memory.divisors(per_rank)}")
    if cfg["world_size"] < 0 or cfg["gpu_mem_gb"] < 0:
        raise UserError("world_size and gpu_mem_gb must be >= 0 (0 = torchrun's / the GPU's)")


def plan_flag(argv):
    """`--plan` alone means --plan=True (the one key that is a switch on the command line)."""
    return ["--plan=True" if a == "--plan" else a for a in argv]


def set_allocator(device):
    """expandable_segments:True for the CUDA caching allocator, set before CUDA starts, unless the user
    configured the allocator: a long run's varying block sizes otherwise fragment its memory (the paper's
    8 x 2048 fp32 step: 5.4 GiB reserved but unusable by step 2, an OOM). Returns the log line."""
    if pick_device(device) == "cpu":
        return None
    for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        if var in os.environ:
            return f"allocator: {var}={os.environ[var]} (yours)"
    if torch.cuda.is_initialized():   # train.main called in a process that already uses the GPU (tests)
        return "allocator: as this process started CUDA (PYTORCH_CUDA_ALLOC_CONF not set)"
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    return ("allocator: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (train.py's default against fragmentation; "
            "set the variable to choose another)")


def memory_setting(cfg, micro, accum, world, parallel, compiled):
    return memory.Setting(micro, cfg["dtype"], parallel, world, accum, compiled, cfg["activation_checkpointing"],
                          cfg["fused_ce"], cfg["fused_ce_chunk"], cfg["optimizer"], cfg["momentum"],
                          cfg["eval_batch_size"])


def gpu_budget(cfg, d):
    """(the GPU's bytes for the plan, the bytes micro_batch='auto' may plan for): --gpu_mem_gb, else the
    device's total and its free memory now (the smallest over the ranks, so they all pick alike)."""
    if cfg["gpu_mem_gb"]:
        total = int(cfg["gpu_mem_gb"] * memory.GIB)
        return total, int(total * (1 - memory.HEADROOM))
    if d.device_type != "cuda":
        total = int(memory.DEFAULT_GPU_GIB * memory.GIB)
        return total, total
    free, total = torch.cuda.mem_get_info(d.device)
    if d.ddp:
        box = torch.tensor([free], device=d.device)
        torch.distributed.all_reduce(box, op=torch.distributed.ReduceOp.MIN)
        free = int(box.item())
    # the context already spent is not in `free`, but the plan's need counts it
    return total, int(free * (1 - memory.HEADROOM)) + int(memory.CONTEXT_GIB * memory.GIB)


def fit_micro_batch(cfg, given, model_cfg, d, micro):
    """micro_batch='auto' on a GPU, gradient_accumulation_steps not set: the largest per-GPU micro-batch
    the memory plan fits in the free memory, and the accumulation that keeps the global batch (the data
    of every step is the same: get_batch draws the global batch, the micro-steps split it). An explicit
    micro_batch or gradient_accumulation_steps wins; on a CPU 'auto' keeps gradient_accumulation_steps.
    Sets cfg's gradient_accumulation_steps (and fused_ce, see below); returns (micro, Setting, the GPU's
    bytes, log lines)."""
    per_rank, T, V = cfg["batch_size"] // d.world, model_cfg.block_size, model_cfg.vocab_size
    parallel = "fsdp" if d.sharded else "ddp" if d.ddp else "none"
    compiled = use_compile(cfg["compile"], d.device_type)
    total, budget = gpu_budget(cfg, d)
    setting = memory_setting(cfg, micro, per_rank // micro, d.world, parallel, compiled)
    notes = []
    if cfg["micro_batch"] != "auto":
        if "gradient_accumulation_steps" in given and cfg["micro_batch"] != micro:
            raise UserError(f"micro_batch={cfg['micro_batch']} and gradient_accumulation_steps="
                            f"{cfg['gradient_accumulation_steps']} disagree ({per_rank} sequences per rank): set one")
        micro = cfg["micro_batch"]
    elif d.device_type == "cuda" and "gradient_accumulation_steps" not in given:
        micro = memory.fit(model_cfg, setting, per_rank, budget) or 1
        notes.append(f"micro_batch auto: {micro} sequences per micro-step, the largest whose plan fits in "
                     + (f"--gpu_mem_gb" if cfg["gpu_mem_gb"] else "the GPU's free memory")
                     + f" less {memory.HEADROOM:.0%} ({memory.gib(budget)})")
    cfg["gradient_accumulation_steps"] = per_rank // micro
    if compiled and not cfg["fused_ce"] and "fused_ce" not in given and micro * T * V >= memory.INT32_ELEMENTS:
        cfg["fused_ce"] = True   # logits past int32 indexing: a compiled path no GPU run here has tried
        notes.append(f"fused_ce on: a micro-step's logits ({micro} x {T} x {V} = {micro * T * V:.3g} elements) "
                     f"exceed 2^31, past the compiled loss's tested range; the fused loss never holds them")
    setting = memory_setting(cfg, micro, per_rank // micro, d.world, parallel, compiled)
    p = memory.plan(model_cfg, setting)
    lines = memory.describe(p, total, T) + notes
    if not p.fits(total):
        lines.append("  " + memory.advice(model_cfg, setting, per_rank, total))
    return micro, setting, total, lines if d.device_type == "cuda" else []   # a GPU's plan: not in a CPU run's log


def print_plan(cfg, given):
    """--plan: the memory plan of this command for --world_size GPUs of --gpu_mem_gb, what micro_batch
    'auto' picks, and what fits when it does not; needs no GPU and writes nothing."""
    world = cfg["world_size"] or int(os.environ.get("WORLD_SIZE", 1))
    if cfg["batch_size"] % world:
        raise UserError(f"batch_size={cfg['batch_size']} does not split over world_size {world}")
    _, model_cfg, _, _ = starting_point(cfg, given)
    here = torch.cuda.get_device_properties(0).total_memory / memory.GIB if torch.cuda.is_available() else 0
    # a GPU run as train.py would start it (compiled by default), on GPUs of gpu_mem_gb (this one's, or 80 GiB)
    plan_cfg = dict(cfg, compile=True if cfg["compile"] is None else cfg["compile"],
                    gpu_mem_gb=cfg["gpu_mem_gb"] or here or memory.DEFAULT_GPU_GIB)
    ddp = world > 1 or cfg["parallel"] == "fsdp" or "RANK" in os.environ   # torchrun wraps DDP on one rank too
    d = Dist(world=world, device="cuda", ddp=ddp, sharded=cfg["parallel"] == "fsdp")
    micro = check_settings(plan_cfg, world)
    micro, setting, total, lines = fit_micro_batch(plan_cfg, given, model_cfg, d, micro)
    params = memory.num_params(model_cfg)
    print(f"model: {params:,} params; global batch {cfg['batch_size']} x "
          f"{model_cfg.block_size} over {world} GPU{'s' if world > 1 else ''} of {memory.gib(total)}: "
          f"{cfg['batch_size'] // world} sequences per GPU per step = {micro} per micro-step x "
          f"{plan_cfg['gradient_accumulation_steps']} accumulation")
    print("\n".join(lines))
    print("(the plan only: nothing trained, nothing written)")


def stop_line(e, where, cfg, model_cfg, setting, gpu):
    """The one line for a step that did not fit (CUDA out of memory) or did not compile (torch.compile's
    errors), naming the step, the plan's figure and what would fit; None for any other error."""
    kept = rundir.kept(cfg["out_dir"])
    if memory.is_oom(e):
        p = memory.plan(model_cfg, setting)
        evaluating = where.startswith("the evaluation")   # its batch is eval_batch_size, not the micro-batch
        return (f"CUDA out of memory in {where}: the memory plan puts this run at {memory.gib(p.need)} per GPU of "
                f"{memory.gib(gpu)}; " + (f"a smaller --eval_batch_size (now {setting.eval_batch}) fits, or "
                                          if evaluating else "") + memory.advice(
                    model_cfg, setting, setting.micro * setting.accum, gpu) + f"; stopped ({kept})")
    if memory.is_compile_failure(e):
        inner = getattr(e, "inner_exception", None) or e
        n = setting.micro * model_cfg.block_size * model_cfg.vocab_size
        big = n >= memory.INT32_ELEMENTS and not setting.fused_ce
        return (f"torch.compile failed in {where} ({type(inner).__name__}: {memory.first_line(inner)}): run with "
                f"--compile=False (eager: slower, same numbers)" + (
                    f", or --fused_ce=True / a smaller --micro_batch (its logits, {n:.3g} elements, exceed 2^31)"
                    if big else "") + f"; stopped ({kept})")
    return None


def check_given_model_keys(config, cfg, given, where):
    """The architecture comes from a checkpoint: a model key a config file or override set must agree."""
    diff = [k for k in sorted(given) if k in GPTConfig.defaults() and cfg[k] != config.get(k)]
    if diff:
        raise UserError(f"{where}: the model is the checkpoint's, but " + ", ".join(
            f"{k}={cfg[k]!r} (checkpoint {config.get(k)!r})" for k in diff) + " was set: leave the model's config "
            "file and overrides out (a scale file that agrees with the checkpoint may stay)")


def init_weights(cfg, given):
    """init_from=<ckpt.pt or run directory>: (that checkpoint, its GPTConfig, where the weights come from),
    read and checked before anything is written."""
    value = cfg["init_from"]
    run = (os.path.dirname(value) or ".") if value.endswith(".pt") else value
    if not os.path.exists(value) or (value.endswith(".pt") and os.path.basename(value) != rundir.CKPT):
        raise UserError(f"init_from={value!r}: use 'scratch', 'resume', or a checkpoint to start from (a run's "
                        f"{rundir.CKPT}, or the run directory holding it)"
                        + ("" if os.path.exists(value) else f"; {value} does not exist"))
    if os.path.realpath(run) == os.path.realpath(cfg["out_dir"]):
        raise UserError(f"init_from={value} is out_dir's own checkpoint: continue the run with --init_from=resume, "
                        f"or start a new run from its weights in another --out_dir")
    ckpt, weights, config = rundir.read_gpt(run)
    ckpt = {k: v for k, v in ckpt.items() if k != "sharded"} | {"model": weights}   # FSDP's too, gathered
    check_given_model_keys(config, cfg, given, f"init_from={value}")
    source = {"path": os.path.abspath(run), "iter_num": ckpt.get("iter_num", 0), "save_id": rundir.checkpoint_id(ckpt)}
    return ckpt, GPTConfig(**config), source


def read_resume(cfg, model_cfg, given):
    """The checkpoint to continue from (init_from='resume'), checked against the requested model and
    settings; returns (checkpoint, its GPTConfig, the settings allowed to change). A run started
    from another checkpoint's weights keeps that checkpoint's architecture."""
    run = cfg["out_dir"]
    if not os.path.isfile(rundir.file(run, rundir.CKPT)):
        unfinished = os.path.isfile(rundir.file(run, rundir.GRAD_DUMP))
        raise UserError(f"init_from='resume' but {rundir.file(run, rundir.CKPT)} does not exist ("
                        + ("the run stopped before its first checkpoint: start it again with --overwrite=True)"
                           if unfinished else "train with init_from='scratch' first)"))
    ckpt = rundir.read_checkpoint(run)
    if "model" in ckpt:   # the weights guard (sharded weights: checked before their next save)
        check_state(ckpt["model"], f"{run}/ckpt.pt", fix="it cannot be resumed; restore it from a good copy")
    if "optimizer" not in ckpt and "sharded" not in ckpt:
        raise UserError(f"{run}/ckpt.pt holds no optimizer state (a model written by prune.py --save_pruned?): "
                        f"it cannot be resumed; start a new run from its weights with --init_from={run}")
    if ("sharded" in ckpt) != (cfg["parallel"] == "fsdp"):
        raise UserError(f"{run}/ckpt.pt is " + ("a sharded checkpoint: resume it with --parallel=fsdp (any number of "
                        "ranks)" if "sharded" in ckpt else "not sharded: resume it with --parallel=ddp"))
    _, have = rundir.read_model_config(run)
    if ckpt.get("initialised_from"):
        check_given_model_keys(have, cfg, given, f"resuming {run}")
        model_cfg = GPTConfig(**have)
    want = asdict(model_cfg)
    diff = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
    if diff:
        raise UserError(f"{run} holds a different model: " + ", ".join(
            f"{k} (checkpoint {have.get(k)!r}, requested {want.get(k)!r})" for k in diff)
            + ": pass the run's config, or another out_dir")
    changes = check_resume(ckpt["train_config"], {k: cfg[k] for k in _DEFAULTS}, _FREE_ON_RESUME, cfg["allow_changes"])
    return ckpt, model_cfg, changes


def starting_point(cfg, given):
    """(checkpoint or None, GPTConfig, resume's allowed changes, where the weights come from or None)."""
    if cfg["init_from"] == "scratch":
        return None, GPTConfig.from_dict(cfg), {}, None
    if cfg["init_from"] == "resume":
        ckpt, model_cfg, changes = read_resume(cfg, GPTConfig.from_dict(cfg), given)
        return ckpt, model_cfg, changes, ckpt.get("initialised_from")
    ckpt, model_cfg, source = init_weights(cfg, given)
    return ckpt, model_cfg, {}, source


def build(cfg, model_cfg, d, ckpt):
    """Model, optimizer, the step after backward, the gradient dump: the weights from ckpt if given, the
    rest too when resuming. parallel='fsdp': the model is sharded (and compiled per block) here, before
    the optimizer; a sharded checkpoint's weights are loaded with its optimizer state."""
    torch.manual_seed(cfg["seed"])   # same init on every rank (DDP broadcasts rank 0's anyway)
    model = GPT(model_cfg)
    if ckpt is not None and "model" in ckpt:
        model.load_state_dict(ckpt["model"])
    model.set_fused_ce(cfg["fused_ce_chunk"] if cfg["fused_ce"] else 0)
    model.tuning = apply_tuning(model, cfg["tune"], cfg["tune_last"], cfg["lora_rank"], cfg["lora_alpha"])
    if cfg["activation_checkpointing"]:
        sharding.checkpoint_blocks(model)
    if d.sharded:
        sharding.shard(model, d, cfg["dtype"], use_compile(cfg["compile"], d.device_type))
    else:
        model.to(d.device)
    grad_eq, lr_eq = equalizing(cfg) == "grad", equalizing(cfg) not in (None, "grad")
    optimizer = optimizer_for(cfg, model.parameters(), fused=d.device_type == "cuda",
                              by_layer=model.param_groups_by_layer() if lr_eq else None)
    clip = cfg["grad_clip"] * ((cfg["equalize_clip_factor"] or 1.0) if grad_eq else 1.0)   # 0: derived later
    # the dump records attention and MLP apart; a run begun before they were recorded goes on without them
    resuming = ckpt is not None and cfg["init_from"] == "resume"   # else a fresh optimizer, step 0, a new dump
    sublayers = not resuming or rundir.records_sublayers(ckpt["grad_dump"]["names"])
    step = GradStep(model.param_groups_by_layer(sublayers), optimizer, clip, cfg["equalize"], cfg["equalize_via"])
    dump = rundir.GradNormDump(step.norms.names, rundir.file(cfg["out_dir"], rundir.GRAD_DUMP), grad_eq)
    iter_num, best_val = 0, float("inf")
    if resuming:
        if d.sharded:
            sharding.load(cfg["out_dir"], ckpt, model, optimizer)
        else:
            optimizer.load_state_dict(ckpt["optimizer"])
        iter_num, best_val = ckpt["iter_num"], ckpt.get("best_val_loss", float("inf"))
        dump.load_state_dict(ckpt["grad_dump"], before_step=iter_num)
        # no RNG state to restore: batches come from (seed, step), and nothing else draws
    return model, optimizer, step, dump, iter_num, best_val


def identity_of(cfg, train_cfg, model_cfg, source):
    """The run's identity (gfa/rundir.py: run_identity); a resume refuses data whose content changed."""
    data = rundir.run_data_id("gpt", train_cfg)
    if cfg["init_from"] == "resume":
        rundir.check_resume_data(cfg["out_dir"], data)
    recipe = train_cfg | {"init_from": "checkpoint" if source else "scratch"}
    return rundir.run_identity("gpt", asdict(model_cfg), recipe, data)


def main(argv):
    with rundir.RunStart() as start:   # one writer per run directory; a failed start leaves nothing behind
        return _main(argv, start)


def _main(argv, start):
    t_start = time.time()
    given = set()   # the keys config files and overrides set
    argv = plan_flag(argv)
    cfg = read_config(argv, GPTConfig.defaults() | _DEFAULTS | {"micro_batch": None}, given=given,   # 'auto' or int
                      help=(__doc__, [("train.py", _DEFAULTS, __file__),
                                      ("the model (model.py's GPTConfig)", GPTConfig.defaults(),
                                       inspect.getsourcefile(GPTConfig))]))
    cfg["micro_batch"] = "auto" if cfg["micro_batch"] is None else cfg["micro_batch"]
    cfg["out_dir"] = cfg["out_dir"] or os.path.join("out", config_name(argv))
    sharding.check(cfg["parallel"])   # before it starts a process group
    if cfg["plan"]:
        return print_plan(cfg, given)
    allocator = set_allocator(cfg["device"])   # before CUDA starts
    d = sharding.setup(cfg["parallel"], cfg["device"])
    on_master(d, lambda: start.claim(cfg["out_dir"]))
    micro = check_settings(cfg, d.world)
    ckpt, model_cfg, changes, source = starting_point(cfg, given)   # read and checked; nothing written yet
    micro, mem_setting, gpu_bytes, mem_lines = fit_micro_batch(cfg, given, model_cfg, d, micro)
    train_cfg = {k: cfg[k] for k in _DEFAULTS}   # the model's keys live in model_config.json only
    if d.local_rank == 0:   # the embedded Shakespeare is prepared on first use, so a fresh clone runs
        prepare_builtin(cfg["dataset"], cfg["data_dir"])
    if d.ddp:
        torch.distributed.barrier()
    train_data = load_split(cfg["dataset"], cfg["data_dir"], "train", model_cfg.vocab_size)
    val_data = load_split(cfg["dataset"], cfg["data_dir"], "val", model_cfg.vocab_size)
    identity = identity_of(cfg, train_cfg, model_cfg, source)
    if cfg["init_from"] != "resume":   # a new run: never into a folder that holds another one (unless overwrite)
        rundir.start_run(cfg["out_dir"], "gpt", asdict(model_cfg), cfg["overwrite"], write=d.master, identity=identity)
    elif d.master:   # the same architecture, checked: a run of an earlier version gets its model_config.json
        rundir.write_model_config(cfg["out_dir"], "gpt", asdict(model_cfg))
        rundir.write_identity(cfg["out_dir"], identity)   # allowed changes (max_iters) are the recipe now
        rundir.record_invocation(cfg["out_dir"])
    raw_model, optimizer, step, dump, iter_num, best_val = build(cfg, model_cfg, d, ckpt)
    resuming = cfg["init_from"] == "resume"
    ckpt_clip = ckpt.get("equalize_clip") if resuming else None   # a resumed run keeps its factor
    del ckpt
    compiled = use_compile(cfg["compile"], d.device_type)
    model = raw_model
    if compiled and not d.sharded:   # (FSDP compiled each block in build)
        # fullgraph: the forward is one graph (layer loops unroll); a graph break would be a bug. The plain
        # path's checkpointed deep-supervision exits are not traced as one graph; the fused loss's are
        # dynamic=False: evaluation (eval_batch_size) and training (the micro-batch) each get a static graph.
        # Left to guess, dynamo makes the batch dimension symbolic at the second shape, and under DDP its
        # graph splitter then fails ("'int' object has no attribute 'meta'", pytorch#134182)
        model = torch.compile(model, fullgraph=not model_cfg.deep_supervision or cfg["fused_ce"], dynamic=False)
    eval_model = model
    if d.ddp and not d.sharded:
        model = DDP(model, device_ids=[d.local_rank] if d.device_type == "cuda" else None,
                    find_unused_parameters=bool(model_cfg.passthrough))   # passthrough layers get no grad
    log = rundir.Log(cfg["out_dir"], d.master)
    T, B = model_cfg.block_size, cfg["batch_size"]
    data = dataset_dir(cfg["dataset"], cfg["data_dir"])
    log(f"model: {raw_model.num_params():,} params ({raw_model.num_params(False):,} without the embedding), "
        f"{raw_model.flops_per_token(T) / 1e6:,.1f} MFLOP/token forward; data {data}: {len(train_data):,} train tokens")
    log(f"device {d.device} x {d.world}, {'fsdp' if d.sharded else 'ddp' if d.ddp else 'one process'}, dtype "
        f"{cfg['dtype']}, compile {compiled}" + (", activation checkpointing" if cfg["activation_checkpointing"] else "")
        + (f", fused LM head + CE ({cfg['fused_ce_chunk']} tokens a chunk)" if cfg["fused_ce"] else "")
        + f"; global batch {B} x {T} tokens"
        f" = {micro} per micro-step x {cfg['gradient_accumulation_steps']} accumulation x {d.world} ranks"
        + (f"; resuming at step {iter_num}" if iter_num else "") + f"; {raw_model.tuning}")
    for line in ([allocator] if allocator else []) + mem_lines:
        log(line)
    if resuming:   # every resume is recorded, with what it was allowed to change
        log(f"resumed at step {iter_num}" + (": " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
                                             if changes else ", settings unchanged"))
    elif source:
        log(f"weights from {source['path']} (step {source['iter_num']} of its run); a fresh optimizer and schedule, "
            f"{model_cfg.n_layer} layers")
    loop = Loop(cfg, train_cfg, d, raw_model, model, eval_model, optimizer, step, dump, log, micro, t_start, source)
    history = train_to_the_end(loop, start, (train_data, val_data), (iter_num, best_val, ckpt_clip),
                               (model_cfg, mem_setting, gpu_bytes))
    log.close()
    del loop, model, eval_model   # DDP's reducer must go before its process group (see teardown)
    teardown(d)
    return history


def train_to_the_end(loop, start, data, at, plan):
    """The equalisation's clip factor (when asked), then the loop; an out-of-memory or torch.compile failure
    ends in one line with the plan's figure and what fits (the last good checkpoint untouched)."""
    (train_data, val_data), (iter_num, best_val, ckpt_clip), (model_cfg, mem_setting, gpu_bytes) = data, at, plan
    cfg, log = loop.cfg, loop.log
    try:
        if equalizing(cfg) == "grad":   # 'lr' leaves the clip alone
            if iter_num and not ckpt_clip and not cfg["equalize_clip_factor"]:
                raise UserError(f"{cfg['out_dir']}/ckpt.pt does not record its equalisation clip factor (an earlier "
                                f"version): resume with the factor it was trained with, e.g. --equalize_clip_factor=1.0")
            loop.set_equalize_clip(ckpt_clip or equalize_clip(cfg, loop, train_data))
        start.started()
        return loop.run(train_data, val_data, iter_num, best_val)
    except Exception as e:   # out of memory, or torch.compile failed: one line, the plan's figure, what fits
        line = stop_line(e, loop.where, cfg, model_cfg, mem_setting, gpu_bytes)
        if line is None:
            raise
        if log.file:   # the log records how the run ended; the terminal gets the line once, from cli()
            log.file.write(f"error: {line}\n")
            log.file.flush()
        raise UserError(line) from None


def reference_max_norm(run, steps, model_cfg):
    """The largest total gradient norm a standard run recorded over steps [0, steps)."""
    kind, config = rundir.read_model_config(run)
    if kind != "gpt" or {k: v for k, v in config.items() if k != "passthrough"} != \
            {k: v for k, v in asdict(model_cfg).items() if k != "passthrough"}:
        raise UserError(f"equalize_reference={run} holds another model than this run: give a standard run of the "
                        f"same config, or leave equalize_reference empty (a standard pilot)")
    d = rundir.read_grad_dump(run, before_step=steps)
    if "norms_equalized" in d or d["steps"].tolist() != list(range(steps)):
        raise UserError(f"equalize_reference={run}: needs a standard (not equalised) run whose dump covers steps "
                        f"0..{steps - 1}")
    return float(np.sqrt((d["norms"].astype(np.float64) ** 2).sum(1)).max())


def equalize_clip(cfg, loop, train_data):
    """Appendix A.2.2's clip factor: largest total gradient norm of the equalised model over that of the
    standard model, both over the same first steps from this run's initialisation, clipped at grad_clip."""
    if cfg["equalize_clip_factor"]:
        return {"factor": cfg["equalize_clip_factor"]}   # given outright
    steps = cfg["equalize_pilot_iters"] or cfg["warmup_iters"]
    if steps < 1:
        raise UserError("deriving the equalisation clip factor needs pilot steps: set equalize_pilot_iters >= 1")
    ref = cfg["equalize_reference"]
    if ref:
        standard = reference_max_norm(ref, steps, loop.raw_model.config)
    else:
        standard = loop.pilot_max_norm(train_data, steps, equalize=False)
    equalised = loop.pilot_max_norm(train_data, steps, equalize=True)
    return {"factor": equalised / standard, "steps": steps, "equalised_max": equalised, "standard_max": standard,
            "standard_from": ref or "pilot"}


class Loop:
    """The training loop: evaluation and checkpoint every eval_interval, one optimizer step per
    iteration, a log line every log_interval (the only host syncs)."""

    def __init__(self, cfg, train_cfg, d, raw_model, model, eval_model, optimizer, step, dump, log, micro, t_start,
                 initialised_from):
        self.cfg, self.train_cfg, self.d, self.log, self.micro = cfg, train_cfg, d, log, micro
        self.raw_model, self.model, self.eval_model = raw_model, model, eval_model
        self.optimizer, self.step, self.dump = optimizer, step, dump
        self.ctx = autocast_for(d.device_type, cfg["dtype"])
        self.guard = FiniteGuard()
        self.history = {"loss": {}, "val": {}}   # what the log printed; main() returns it (tests)
        self.equalize_clip = None   # how the equalisation clip factor was set (equalize=True)
        self.initialised_from = initialised_from   # init_from=<checkpoint>: where the weights came from
        self.stop_iter = cfg["stop_iter"]   # stop_after_min moves it to the step where time ran out
        self.t_start = t_start   # main()'s start: stop_after_min counts from there
        self.where = "setup"   # what runs now, for the out-of-memory / compile-failure line
        self.wandb = None
        if cfg["wandb_log"] and d.master:
            import wandb
            wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"] or None, config=cfg)
            self.wandb = wandb

    def pilot_max_norm(self, train_data, steps, equalize):
        """The largest total gradient norm (before clipping, after any equalisation) over `steps`
        steps trained from the current weights with a fresh optimizer, clipped at grad_clip; the
        weights are put back afterwards and nothing is recorded."""
        cfg = self.cfg
        start = copy_weights(self.raw_model)
        saved = self.optimizer, self.step, self.dump
        self.optimizer = optimizer_for(cfg, self.raw_model.parameters(), fused=self.d.device_type == "cuda")
        self.step = GradStep(self.raw_model.param_groups_by_layer(), self.optimizer, cfg["grad_clip"], equalize)
        self.dump = None
        self.where = "the equalisation pilots (before step 0)"
        try:
            totals = torch.stack([self.train_step(train_data, it)[1] for it in range(steps)])
            self.guard.check("a pilot for the equalisation clip factor; nothing saved")
        finally:
            restore_weights(self.raw_model, start)
            self.optimizer, self.step, self.dump = saved
        return totals.max().item()

    def set_equalize_clip(self, record):
        self.equalize_clip = record
        self.step.grad_clip = self.cfg["grad_clip"] * record["factor"]
        r = record
        how = "given" if "steps" not in r else (
            f"derived over steps 0..{r['steps'] - 1}: equalised pilot max {r['equalised_max']:.4g} / standard max "
            f"{r['standard_max']:.4g} (" + ("a standard pilot" if r["standard_from"] == "pilot" else
                                            f"the dump of {r['standard_from']}") + ")")
        self.log(f"equalisation clip factor {r['factor']:.4g} ({how}): clip at {self.step.grad_clip:.4g}")

    def log_clip_share(self):
        """The share of steps on which the clip fired, from the whole dump (after any equalisation)."""
        clip = self.step.grad_clip
        sd = self.dump.state_dict()
        norms = sd.get("norms_equalized", sd["norms"]).astype(np.float64)
        if clip > 0 and len(norms):
            fired = (np.sqrt((norms ** 2).sum(1)) > clip).mean()
            self.log(f"gradient clip at {clip:.4g} fired on {100 * fired:.1f} % of the {len(norms)} steps recorded")

    def evaluate_and_save(self, val_data, it, start, best_val):
        cfg = self.cfg
        self.guard.check(rundir.kept(cfg["out_dir"]))   # never save a checkpoint of a run that went non-finite
        check_weights(self.raw_model, it, rundir.kept(cfg["out_dir"]))   # an update can blow up the weights
        if self.d.sharded:   # FSDP: a forward gathers every rank's shards, so every rank evaluates and saves
            return self._evaluate_and_save(val_data, it, start, best_val)
        best = on_master(self.d, lambda: self._evaluate_and_save(val_data, it, start, best_val))
        return best_val if best is None else best

    def _evaluate_and_save(self, val_data, it, start, best_val):
        cfg = self.cfg
        val = evaluate(self.eval_model, val_data, self.raw_model.config.block_size, cfg["eval_batch_size"],
                       cfg["eval_iters"], self.d.device, self.ctx)
        if self.d.sharded:   # rank 0's number, so every rank takes the same decisions below
            box = [val]
            torch.distributed.broadcast_object_list(box, src=0)
            val = box[0]
        self.history["val"][it] = val
        self.log(f"step {it} | val loss {val:.4f} | val ppl {math.exp(min(val, 50)):.2f}")
        if not math.isfinite(val):
            raise UserError(f"non-finite val loss at step {it}: stopped ({rundir.kept(cfg['out_dir'])}); "
                            f"try a lower learning_rate or dtype=float32")
        if self.wandb:
            self.wandb.log({"step": it, "val/loss": val, "val/ppl": math.exp(min(val, 50))})
        stopping = 0 < self.stop_iter <= it   # a stop is for resuming: always save
        if it > start and (val < best_val or cfg["always_save_checkpoint"] or stopping):
            self.save(it, min(best_val, val))
        return min(best_val, val)

    def save(self, it, best_val):
        """The checkpoint: on rank 0 (DDP: all of it there), or sharded, by every rank (FSDP)."""
        extra = {k: v for k, v in (("equalize_clip", self.equalize_clip), ("initialised_from", self.initialised_from))
                 if v}
        if self.d.master:
            self.dump.flush()
            extra |= {"grad_dump": self.dump.state_dict()}   # the dump lives on rank 0
        if self.d.sharded:
            sharding.save(self.cfg["out_dir"], self.d, self.raw_model, self.optimizer, self.train_cfg, it,
                          best_val_loss=best_val, **extra)
        else:
            rundir.save_checkpoint(self.cfg["out_dir"], "gpt", plain_state_dict(self.raw_model), self.train_cfg, it,
                                   optimizer=self.optimizer.state_dict(), best_val_loss=best_val, **extra)

    def train_step(self, train_data, it):
        """One optimizer step over the micro-batches; returns (loss, total gradient norm) on the device."""
        cfg, d, micro = self.cfg, self.d, self.micro
        accum, T = cfg["gradient_accumulation_steps"], self.raw_model.config.block_size
        set_lr(self.optimizer, cosine_lr(it, cfg["learning_rate"], cfg["min_lr"], cfg["warmup_iters"], cfg["max_iters"]))
        # the global batch of this step is fixed by (seed, step); rank r takes its own rows, so
        # any world size / accumulation computes the same gradient as one process
        x, y = get_batch(train_data, cfg["batch_size"], T, step=it, seed=cfg["seed"],
                         rows=slice(d.rank * micro * accum, (d.rank + 1) * micro * accum))
        if d.device_type == "cuda":
            x, y = x.pin_memory().to(d.device, non_blocking=True), y.pin_memory().to(d.device, non_blocking=True)
        loss_sum = torch.zeros((), device=d.device)
        for m in range(accum):
            if isinstance(self.model, DDP):   # all-reduce only on the last micro-step (FSDP reduce-scatters each)
                self.model.require_backward_grad_sync = m == accum - 1
            with self.ctx:
                _, loss = self.model(x[m * micro:(m + 1) * micro], y[m * micro:(m + 1) * micro])
            loss = loss / accum
            loss.backward()
            loss_sum += loss.detach()
        norms, norms_eq, total = self.step()   # norms of the global gradient: after the all-reduce
        if d.master and self.dump is not None:
            self.dump.record(it, norms, norms_eq)
        self.guard.watch(it, loss_sum, total)
        return loss_sum, total

    def log_step(self, it, loss_sum, total, dt):
        cfg, d = self.cfg, self.d
        self.guard.check(rundir.kept(self.cfg["out_dir"]))
        if d.ddp:   # the global batch's loss, as one process would report it
            torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.SUM)
            loss_sum /= d.world
        lossf, gnorm = loss_sum.item(), total.item()
        if not d.master:
            return
        tok_s = cfg["batch_size"] * self.raw_model.config.block_size / dt
        peak = peak_flops(d.device, cfg["dtype"])
        mfu = percent(3 * self.raw_model.train_flops_per_token() * tok_s / (peak * d.world)) if peak else "n/a"
        lr = self.optimizer.param_groups[0]["lr"]
        # rank 0's peak since the start (CUDA only): what the multi-GPU scaling table reports
        mem = f" | peak mem {torch.cuda.max_memory_allocated(d.device) / 2**30:.2f} GiB" if d.device_type == "cuda" else ""
        self.history["loss"][it] = lossf
        self.log(f"step {it} | loss {lossf:.4f} | lr {lr:.2e} | grad norm {gnorm:.4f} | {dt * 1000:.1f} ms/step"
                 f" | {tok_s:,.0f} tok/s | MFU {mfu}{mem}")
        self.dump.flush()
        if self.wandb:
            self.wandb.log({"step": it, "train/loss": lossf, "lr": lr, "grad_norm": gnorm, "tok_s": tok_s})

    def out_of_time(self):
        """stop_after_min passed (rank 0's clock decides for every rank; called at log lines, which sync anyway)."""
        if not self.cfg["stop_after_min"]:
            return False
        late = torch.tensor(float(time.time() - self.t_start > 60 * self.cfg["stop_after_min"]), device=self.d.device)
        if self.d.ddp:
            torch.distributed.broadcast(late, src=0)
        return bool(late.item())

    def run(self, train_data, val_data, it, best_val):
        cfg, start = self.cfg, it
        t_last, it_last = time.time(), it
        while True:
            last = it >= cfg["max_iters"] or 0 < self.stop_iter <= it
            if it % cfg["eval_interval"] == 0 or last:
                self.where = f"the evaluation at step {it}"
                best_val = self.evaluate_and_save(val_data, it, start, best_val)
                t_last, it_last = time.time(), it   # eval time is not training time
            if last:
                break
            first = it == start and use_compile(cfg["compile"], self.d.device_type)
            self.where = f"training step {it}" + (" (the first compiled step)" if first else "")
            loss_sum, total = self.train_step(train_data, it)
            it += 1
            if (it - 1) % cfg["log_interval"] == 0 or it in (cfg["max_iters"], self.stop_iter):
                sync()   # the steps done, not launched: one step after an evaluation would time its launch only
                dt = (time.time() - t_last) / max(1, it - it_last)
                t_last, it_last = time.time(), it
                self.log_step(it - 1, loss_sum, total, dt)
                if it < cfg["max_iters"] and self.out_of_time():
                    self.stop_iter = it
                    self.log(f"stop_after_min={cfg['stop_after_min']:g} reached: stopping at step {it}")
        if self.d.master:
            self.dump.flush()
            self.log_clip_share()
        return self.history


if __name__ == "__main__":
    cli(main)
