"""
Train a CascadeFormer / GFA model and dump its per-layer gradient norms.

    python train.py config/demo.py                                 # CPU demo, the embedded Shakespeare
    python train.py config/cascade_a2.py --batch_size=8 --max_iters=100
    torchrun --nproc_per_node=8 train.py config/cascade_a2.py      # DDP on one node
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST0 --master_port=29500 \
        train.py config/cascade_a2.py                              # ... and node_rank=1 on the second node

Defaults below are the paper's Table 5 and the 1.2B model; config files and --key=value override
them (every GPTConfig field is a key too, e.g. --F_d=2). batch_size is the GLOBAL batch in
sequences per optimizer step; it is split over world_size x gradient_accumulation_steps.

Writes to out_dir: ckpt.pt (atomic; model, model_config, train_config, optimizer, step,
gradient dump; common.load_model reads it), model_config.json (the architecture, so a
run can be analysed before its first checkpoint), grad_norms.npz (per-step per-layer gradient norms and the
accumulated share of Eq. 2: common.GradNormDump documents it; rewritten at every log interval),
log.txt. init_from='resume' continues a run exactly where its checkpoint left it.

Norm equalisation (Appendix A.2.2, equalize=True): after backward each transformer layer's
gradient is rescaled to the largest layer norm, target / n_i (1 where n_i = 0); the embedding
and head groups are left alone (the paper equalises "each layer i", the same groups Eq. 2's share
is over); then clipping uses grad_clip * equalize_clip_factor.
"""
import math
import os
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import common
from common import (UserError, cli, read_config, load_tokens, get_batch, evaluate, atomic_save, atomic_write_json, read_checkpoint,
                    LayerGradNorms, GradNormDump, clip_coef, scaled_step, autocast_for, peak_flops)
from model import GPT, GPTConfig

_before = set(globals())
# ---- defaults: the paper's Table 5 (model fields come from GPTConfig: the 1.2B Vanilla-16L) ----
out_dir = "out/run"
dataset = "dolma"              # data/<dataset>/{train,val}.bin
data_dir = ""                  # overrides data/<dataset>
init_from = "scratch"          # 'scratch' or 'resume' (from out_dir/ckpt.pt)
seed = 324709
batch_size = 64                # global sequences per optimizer step (x block_size tokens)
gradient_accumulation_steps = 1
max_iters = 53400              # one epoch of 7B tokens at 64 x 2048
stop_iter = 0                  # > 0: stop (and checkpoint) there, schedule unchanged, as if interrupted
learning_rate = 2e-4           # peak
min_lr = 2e-5                  # end of the cosine
warmup_iters = 2000
weight_decay = 0.1             # on matrices only (dim >= 2)
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0                # 0 = off
equalize = False               # norm equalisation (Appendix A.2.2)
equalize_clip_factor = 1.0     # clip norm multiplier while equalising
dtype = "float32"              # 'float32' (paper), 'tf32', 'bfloat16' (autocast)
device = ""                    # '' = cuda if available, else cpu
compile = None                 # None = on for cuda, off for cpu
eval_interval = 1000
eval_iters = 20                # batches of the fixed held-out set
eval_batch_size = 8            # fixed, so val losses compare across batch sizes and world sizes
log_interval = 10
always_save_checkpoint = True  # False: only save when val loss improves
wandb_log = False
wandb_project = "cascadeformer"
wandb_run_name = ""
_DEFAULTS = {k: v for k, v in globals().items() if k not in _before and not k.startswith("_")}


def get_lr(it, cfg):
    """Linear warm-up, then cosine decay from learning_rate to min_lr at max_iters."""
    if it < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (it + 1) / (cfg["warmup_iters"] + 1)
    span = max(1, cfg["max_iters"] - cfg["warmup_iters"])
    ratio = min(1.0, (it - cfg["warmup_iters"]) / span)
    return cfg["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg["learning_rate"] - cfg["min_lr"])


def main(argv):
    cfg = read_config(argv, GPTConfig.defaults() | _DEFAULTS)
    model_cfg = GPTConfig.from_dict(cfg)
    T = model_cfg.block_size

    # ---- devices and DDP ------------------------------------------------------------------------
    ddp = int(os.environ.get("RANK", -1)) != -1
    dev = cfg["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    if ddp:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        if dev.startswith("cuda"):
            dev = f"cuda:{local_rank}"
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.startswith("cuda") else "gloo")
    else:
        rank, local_rank, world = 0, 0, 1
    master = rank == 0
    device_type = "cuda" if dev.startswith("cuda") else "cpu"
    use_compile = cfg["compile"] if cfg["compile"] is not None else device_type == "cuda"
    ctx = autocast_for(device_type, cfg["dtype"])
    accum = cfg["gradient_accumulation_steps"]
    B = cfg["batch_size"]
    if accum < 1 or B < 1 or B % (world * accum):
        raise UserError(f"batch_size={B} does not split evenly over world_size {world} x "
                        f"gradient_accumulation_steps {accum}: use a multiple of {world * max(accum, 1)}")
    micro = B // (world * accum)
    for k in ("max_iters", "eval_interval", "log_interval", "eval_iters", "eval_batch_size"):
        if cfg[k] < 1:
            raise UserError(f"{k}={cfg[k]}: must be >= 1")
    out_dir = cfg["out_dir"]
    ckpt_path = os.path.join(out_dir, "ckpt.pt")

    # ---- data (the embedded Shakespeare is prepared on first use, so a fresh clone runs) -------
    data_dir = common.data_dir(cfg)
    if not cfg["data_dir"] and cfg["dataset"] == "shakespeare" and local_rank == 0 and not all(
            os.path.isfile(os.path.join(data_dir, f"{s}.bin")) for s in ("train", "val")):
        import importlib.util
        spec = importlib.util.spec_from_file_location("shakespeare_prepare", os.path.join(data_dir, "prepare.py"))
        prep = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(prep)
        prep.prepare(data_dir)
    if ddp:
        dist.barrier()
    train_data = load_tokens(os.path.join(data_dir, "train.bin"), model_cfg.vocab_size)
    val_data = load_tokens(os.path.join(data_dir, "val.bin"), model_cfg.vocab_size)

    # ---- model, optimizer, resume ---------------------------------------------------------------
    ckpt = None
    if cfg["init_from"] == "resume":
        if not os.path.isfile(ckpt_path):
            raise UserError(f"init_from='resume' but {ckpt_path} does not exist (train with init_from='scratch' first)")
        ckpt = read_checkpoint(ckpt_path)
        want, have = asdict(model_cfg), ckpt["model_config"]
        diff = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
        if diff:
            raise UserError(f"{ckpt_path} holds a different model: " + ", ".join(
                f"{k} (checkpoint {have.get(k)!r}, requested {want.get(k)!r})" for k in diff)
                + ": pass the run's config, or another out_dir")
    elif cfg["init_from"] != "scratch":
        raise UserError(f"init_from={cfg['init_from']!r}: use 'scratch' or 'resume'")
    if master:
        os.makedirs(out_dir, exist_ok=True)
        atomic_write_json(asdict(model_cfg), os.path.join(out_dir, "model_config.json"), indent=1)

    torch.manual_seed(cfg["seed"])   # same init on every rank (DDP broadcasts rank 0's anyway)
    raw_model = GPT(model_cfg)
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
    raw_model.to(dev)
    groups = raw_model.param_groups_by_layer()
    assert sum(len(g) for g in groups.values()) == len(list(raw_model.parameters())), "a parameter has no group"
    layer_norms = LayerGradNorms(groups)   # one fused reduction, no host sync
    names = layer_norms.names
    is_layer = torch.tensor([n.startswith("layer.") for n in names], device=dev)   # embed/head: not equalised
    params = [p for p in raw_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg["weight_decay"]},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]), fused=device_type == "cuda")
    dump = GradNormDump(names, os.path.join(out_dir, "grad_norms.npz"), equalized=cfg["equalize"])
    iter_num, best_val = 0, float("inf")
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        iter_num, best_val = ckpt["iter_num"], ckpt.get("best_val_loss", float("inf"))
        dump.load_state_dict(ckpt["grad_dump"], before_step=iter_num)
        del ckpt   # no RNG state to restore: batches come from (seed, step), and nothing else draws
    start_iter = iter_num

    model = raw_model
    if use_compile:
        # fullgraph: the forward is one graph (layer loops unroll); a graph break would be a bug
        model = torch.compile(model, fullgraph=not model_cfg.deep_supervision)
    eval_model = model
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None,
                    find_unused_parameters=bool(model_cfg.passthrough))   # passthrough layers get no grad

    fpt = raw_model.flops_per_token(T)
    peak = peak_flops(dev, cfg["dtype"])
    if master:
        print(f"model: {raw_model.num_params():,} params ({raw_model.num_params(False):,} without the embedding), "
              f"{fpt / 1e6:,.1f} MFLOP/token forward; data {data_dir}: {len(train_data):,} train tokens")
        print(f"device {dev} x {world}, dtype {cfg['dtype']}, compile {use_compile}; global batch {B} x {T} tokens"
              f" = {micro} per micro-step x {accum} accumulation x {world} ranks" +
              (f"; resuming at step {iter_num}" if start_iter else ""))
    log_file = open(os.path.join(out_dir, "log.txt"), "a") if master else None
    if cfg["wandb_log"] and master:
        import wandb
        wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"] or None, config=cfg)

    def log(line):
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    pending_bad = []   # (step, device bool): checked at log intervals, never per step (no host sync)

    def check_finite():
        if pending_bad:
            flags = torch.stack([b for _, b in pending_bad]).cpu().tolist()
            steps = [s for s, _ in pending_bad]
            pending_bad.clear()
            if any(flags):
                bad = steps[flags.index(True)]
                keep = f"{ckpt_path} keeps the last good checkpoint" if os.path.isfile(ckpt_path) else "no checkpoint written"
                raise UserError(f"non-finite loss or gradient at step {bad}: stopped ({keep}); "
                                f"try a lower learning_rate or dtype=float32")

    def save():
        atomic_save({"model": raw_model.state_dict(), "model_config": asdict(model_cfg), "train_config": dict(cfg),
                     "iter_num": iter_num, "optimizer": optimizer.state_dict(), "best_val_loss": best_val,
                     "grad_dump": dump.state_dict()}, ckpt_path)

    history = {"loss": {}, "val": {}}   # what the log printed; main() returns it (tests)
    clip = cfg["grad_clip"] * (cfg["equalize_clip_factor"] if cfg["equalize"] else 1.0)
    t_last, it_last = time.time(), iter_num
    while True:
        # ---- evaluation and checkpoint ------------------------------------------------------------
        last = iter_num >= cfg["max_iters"] or 0 < cfg["stop_iter"] <= iter_num
        if iter_num % cfg["eval_interval"] == 0 or last:
            check_finite()   # never save a checkpoint of a run that went non-finite
            if master:
                val = evaluate(eval_model, val_data, T, cfg["eval_batch_size"], cfg["eval_iters"], dev, ctx)
                history["val"][iter_num] = val
                log(f"step {iter_num} | val loss {val:.4f} | val ppl {math.exp(min(val, 50)):.2f}")
                if cfg["wandb_log"]:
                    wandb.log({"step": iter_num, "val/loss": val, "val/ppl": math.exp(min(val, 50))})
                improved = val < best_val
                best_val = min(best_val, val)
                stopping = 0 < cfg["stop_iter"] <= iter_num   # a stop is for resuming: always save
                if iter_num > start_iter and (improved or cfg["always_save_checkpoint"] or stopping):
                    dump.flush()
                    save()
            t_last, it_last = time.time(), iter_num   # eval time is not training time
        if last:
            break

        # ---- one optimizer step: forward/backward over the micro-batches ------------------------
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # the global batch of this step is fixed by (seed, step); rank r takes its own rows, so
        # any world size / accumulation computes the same gradient as one process
        x, y = get_batch(train_data, B, T, step=iter_num, seed=cfg["seed"],
                         rows=slice(rank * micro * accum, (rank + 1) * micro * accum))
        if device_type == "cuda":
            x, y = x.pin_memory().to(dev, non_blocking=True), y.pin_memory().to(dev, non_blocking=True)
        loss_sum = torch.zeros((), device=dev)
        for m in range(accum):
            if ddp:   # all-reduce only on the last micro-step
                model.require_backward_grad_sync = m == accum - 1
            with ctx:
                _, loss = model(x[m * micro:(m + 1) * micro], y[m * micro:(m + 1) * micro])
            loss = loss / accum
            loss.backward()
            loss_sum += loss.detach()

        # ---- per-layer gradient norms (global gradient: after the all-reduce, before clipping) ----
        grads = [p.grad for p in params if p.grad is not None]
        norms = layer_norms()
        norms_eq = None
        if cfg["equalize"]:
            target = torch.where(is_layer, norms, torch.zeros_like(norms)).max()
            scale = torch.where(is_layer & (norms > 0), target / norms, torch.ones_like(norms))
            for g, group_params in enumerate(groups.values()):   # LayerGradNorms' order
                gs = [p.grad for p in group_params if p.grad is not None]
                if gs:
                    torch._foreach_mul_(gs, scale[g])   # 0-dim device tensor: no host sync
            norms_eq = layer_norms()
        total = (norms if norms_eq is None else norms_eq).square().sum().sqrt()
        if clip > 0:
            scaled_step(optimizer, grads, clip_coef(total, clip))
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if master:
            dump.record(iter_num, norms, norms_eq)
        pending_bad.append((iter_num, ~(torch.isfinite(loss_sum) & torch.isfinite(total))))
        step = iter_num
        iter_num += 1

        # ---- logging (the only host syncs of the loop) ----------------------------------------------
        if step % cfg["log_interval"] == 0 or iter_num == cfg["max_iters"] or iter_num == cfg["stop_iter"]:
            check_finite()
            if ddp:   # the global batch's loss, as one process would report it
                dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
                loss_sum /= world
            lossf, gnorm = loss_sum.item(), total.item()
            dt = (time.time() - t_last) / max(1, iter_num - it_last)
            t_last, it_last = time.time(), iter_num
            if master:
                tok_s = B * T / dt
                mfu = f"{100 * 3 * fpt * tok_s / (peak * world):.1f}%" if peak else "n/a"
                history["loss"][step] = lossf
                log(f"step {step} | loss {lossf:.4f} | lr {lr:.2e} | grad norm {gnorm:.4f} | {dt * 1000:.1f} ms/step"
                    f" | {tok_s:,.0f} tok/s | MFU {mfu}")
                dump.flush()
                if cfg["wandb_log"]:
                    wandb.log({"step": step, "train/loss": lossf, "lr": lr, "grad_norm": gnorm, "tok_s": tok_s})

    if master:
        dump.flush()
        log_file.close()
    if ddp:
        dist.destroy_process_group()
    return history


if __name__ == "__main__":
    cli(lambda: main(sys.argv[1:]))
