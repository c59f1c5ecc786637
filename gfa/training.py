"""
The training pieces train.py, resnet.py and bench.py share: LR schedule, the optimizer (AdamW, or
SGD with momentum) and its weight-decay groups, DDP setup, the optimizer step with its per-layer
(or per-sub-block) gradient norms, norm equalisation and clipping, and the non-finite guard. None of
them syncs with the host on the hot path. They also work on sharded parameters (FSDP2's DTensors,
gfa/sharding.py): each rank reduces its own shards and one all-reduce combines the ranks.
"""
import gc
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gfa.cli import UserError
from gfa.device import pick_device
from gfa.theory import layer_of


def check_init_from(value):
    if value not in ("scratch", "resume"):
        raise UserError(f"init_from={value!r}: use 'scratch' or 'resume'")


OPTIMIZERS = ("adamw", "sgd")
EQUALIZE_VIA = ("grad", "lr", "lr_mean")


def check_equalize_via(value):
    if value not in EQUALIZE_VIA:
        raise UserError(f"equalize_via={value!r}: use 'grad' (rescale each layer's gradient, the paper), 'lr' "
                        f"(scale each layer's learning rate by its factor) or 'lr_mean' (by its factor over their mean)")


def check_optimizer_settings(cfg):
    """One-line errors for optimizer and schedule settings that cannot be meant."""
    for key in ("learning_rate", "min_lr", "weight_decay", "seed"):
        if cfg[key] < 0:
            raise UserError(f"{key}={cfg[key]}: must be >= 0")
    for key in ("beta1", "beta2", "momentum"):
        if key in cfg and not 0 <= cfg[key] < 1:
            raise UserError(f"{key}={cfg[key]}: must be in [0, 1)")
    if cfg["min_lr"] > cfg["learning_rate"]:   # the cosine would rise to its "end"
        raise UserError(f"min_lr={cfg['min_lr']} is above learning_rate={cfg['learning_rate']} (the peak): give "
                        f"min_lr <= learning_rate")
    if cfg.get("optimizer", "adamw") not in OPTIMIZERS:
        raise UserError(f"optimizer={cfg['optimizer']!r}: use 'adamw' (the paper) or 'sgd' (with momentum)")


def check_logger(cfg):
    """wandb_log=True needs the wandb package: said before anything starts, not at the first log line."""
    import importlib.util
    if cfg.get("wandb_log") and importlib.util.find_spec("wandb") is None:
        raise UserError("wandb_log=True but the wandb package is not installed: pip install wandb, or leave "
                        "wandb_log out")


def check_resume(saved, requested, free, allow_changes):
    """Resume means "continue exactly": the settings that shape the run (the saved training config)
    must match the requested ones, except `free` keys (where output goes, how often to log or
    evaluate) and the keys the user allows to change (a comma list, e.g. 'max_iters').
    Returns {key: (checkpoint value, new value)} of the allowed changes, for the log."""
    allow = [k.strip() for k in allow_changes.split(",") if k.strip()]
    unknown = [k for k in allow if k not in requested]
    if unknown:
        raise UserError(f"allow_changes names {', '.join(unknown)}: not a training setting (the architecture cannot "
                        f"change on resume)")
    changed = {k: (saved[k], v) for k, v in requested.items() if k in saved and k not in free and saved[k] != v}
    refused = [k for k in changed if k not in allow]
    if refused:
        what = ", ".join(f"{k} (checkpoint {changed[k][0]!r}, now {changed[k][1]!r})" for k in refused)
        raise UserError(f"resuming would change the run: {what}; pass the run's own config and overrides, or allow "
                        f"the change with --allow_changes={','.join(refused)}")
    return changed


def use_compile(setting, device_type):
    """compile=None (the default): on for GPUs, off on CPUs; True / False as given."""
    if setting not in (None, True, False):
        raise UserError(f"compile={setting!r}: use True or False (or leave it out: on for GPUs, off on CPU)")
    return device_type == "cuda" if setting is None else setting


def cosine_lr(it, peak, floor, warmup, total):
    """Linear warm-up over `warmup` steps, then cosine decay from peak to floor at step `total`."""
    if it < warmup:
        return peak * (it + 1) / (warmup + 1)
    ratio = min(1.0, (it - warmup) / max(1, total - warmup))
    return floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (peak - floor)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def _decay_groups(params, weight_decay, by_layer=None):
    """Weight decay on matrices and convolutions only (dim >= 2; no norms or biases). by_layer
    ({group name: params}, model.param_groups_by_layer()): a decayed and an undecayed group per
    name, each tagged 'layer_group': name, so that each layer can get its own learning rate."""
    def pair(ps, **tag):
        ps = [p for p in ps if p.requires_grad]
        return [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": weight_decay, **tag},
                {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0, **tag}]
    if by_layer is None:
        return pair(params)
    return [g for name, ps in by_layer.items() for g in pair(ps, layer_group=name) if g["params"]]


def adamw(params, lr, betas, weight_decay, fused):
    """AdamW with weight decay on matrices and convolutions only."""
    return torch.optim.AdamW(_decay_groups(params, weight_decay), lr=lr, betas=betas, fused=fused)


def optimizer_for(cfg, params, fused, by_layer=None):
    """train.py's optimizer from its settings: AdamW (beta1, beta2; the paper) or SGD with momentum
    (`momentum`; its weight_decay is torch's coupled L2 term), both decaying matrices only. by_layer:
    one pair of parameter groups per layer (_decay_groups), for per-layer learning rates."""
    groups = _decay_groups(params, cfg["weight_decay"], by_layer)
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=cfg["learning_rate"], momentum=cfg["momentum"], fused=fused)
    return torch.optim.AdamW(groups, lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]), fused=fused)


# ---- processes ----------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: str = "cpu"
    ddp: bool = False       # a process group is up (torchrun, or parallel='fsdp')
    sharded: bool = False   # parallel='fsdp' (gfa/sharding.py)

    @property
    def master(self):
        return self.rank == 0

    @property
    def device_type(self):
        return torch.device(self.device).type


def setup_distributed(device=""):
    """One process, or one rank of a torchrun job (RANK set): its device (cuda:LOCAL_RANK on GPUs)
    and the process group (nccl on GPUs, gloo on CPUs)."""
    dev = pick_device(device)
    if int(os.environ.get("RANK", -1)) == -1:
        return Dist(device=dev)
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.device(dev).type == "cuda":
        dev = f"cuda:{local_rank}"
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.startswith("cuda") else "gloo")
    return Dist(rank, local_rank, world, dev, ddp=True)


def on_master(d, fn):
    """fn() on rank 0 only; a UserError it raises is raised on every rank (the same one line), so
    the other ranks stop with it instead of crashing in their next collective. Returns fn()'s
    result on rank 0, None elsewhere."""
    error, result = None, None
    if d.master:
        try:
            result = fn()
        except UserError as e:
            error = str(e)
    if d.ddp:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise UserError(error)
    return result


def teardown(d):
    """End the process group once every rank is done (rank 0 may still be saving). Call it after
    dropping the DDP-wrapped model: gloo work still referenced at interpreter exit can abort the
    process ("terminate called without an active exception")."""
    if d.ddp and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


# ---- the optimizer step -----------------------------------------------------------------------------
def is_sharded(t):
    """Is t a DTensor (FSDP2's parameters and gradients)? Asked only once something has imported
    DTensor: the import costs ~0.7 s, which a script that shards nothing should not pay."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def local_shard(t):
    """The part of t this rank holds: a DTensor's local shard (possibly empty), else t itself.
    In-place changes to it change t."""
    return t.to_local() if is_sharded(t) else t


def shard_group(tensors):
    """The process group over which tensors are sharded (FSDP2's 1D mesh), or None if they are not."""
    sharded = [t for t in tensors if is_sharded(t)]
    return sharded[0].device_mesh.get_group() if sharded else None


class LayerGradNorms:
    """L2 norm of each named parameter group's gradient, as one device tensor [G].

    groups: {name: [params]} (GPT.param_groups_by_layer(), or the ResNet's). One fused
    _foreach_norm over all gradients plus one index_add: no per-layer host sync. Sharded
    gradients (FSDP): the same over this rank's shards, then one all-reduce of the squares."""

    def __init__(self, groups):
        self.names = list(groups)
        self.params, index = [], []
        for g, name in enumerate(self.names):
            for p in groups[name]:
                self.params.append(p)
                index.append(g)
        self.index = torch.tensor(index)
        self.shard_group = shard_group(self.params)

    def __call__(self):
        dev = self.params[0].device
        have = [i for i, p in enumerate(self.params) if p.grad is not None]
        sq = torch.zeros(len(self.names), device=dev, dtype=torch.float32)
        if have:
            key = (dev, tuple(have))
            if getattr(self, "_key", None) != key:   # copy the index to the device once, not every step
                self._key, self._dev_index = key, self.index[have].to(dev)
            norms = torch._foreach_norm([local_shard(self.params[i].grad) for i in have])
            sq.index_add_(0, self._dev_index, torch.stack(norms).float() ** 2)
        if self.shard_group is not None:   # FSDP: each rank summed its shards' squares; add up the ranks
            dist.all_reduce(sq, group=self.shard_group)
        return sq.sqrt()


def clip_coef(total_norm, max_norm):
    """The factor clip_grad_norm_ applies, as a device tensor (no host sync); 1 when max_norm <= 0."""
    if max_norm <= 0:
        return torch.ones_like(total_norm)
    return (max_norm / (total_norm + 1e-6)).clamp(max=1.0)


def scaled_step(optimizer, grads, coef):
    """optimizer.step() on the gradients multiplied by coef (a 0-d fp32 device tensor, such as
    clip_coef's); the gradients are left scaled, as an in-place clip leaves them. A fused optimizer
    scales inside its own pass over the gradients, through grad_scale (the hook torch.amp.GradScaler
    uses: the kernel divides each gradient by it and writes the result back). That saves the
    separate in-place pass over every gradient: -0.5 % to -1.5 % of a Vanilla-16L training step
    on an H100 (experiments/bench/probes/train_switches.py)."""
    if optimizer.defaults.get("fused") and getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.grad_scale = coef.float().reciprocal()
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale
    else:
        torch._foreach_mul_(grads, coef)
        optimizer.step()


class GradStep:
    """Everything after backward, as train.py does it: per-group gradient norms of the global
    gradient (one fused reduction), optional norm equalisation, clipping of the total norm
    (folded into a fused optimizer's own pass), the optimizer step, zero_grad. The groups
    partition the parameters: per layer ('layer.i'), or per sub-block ('layer.i.attn', 'layer.i.mlp').

    Norm equalisation (Appendix A.2.2): each transformer layer's gradient (all its sub-blocks) is
    rescaled to the largest layer norm, target / n_i (1 where n_i = 0); the other groups
    (embedding, head, a ResNet's stem) are left alone, the same groups Eq. 2's share is over. The
    clip then acts on the equalised total. Returns (norms, equalised norms or None, total norm),
    per group, on the device.

    equalize_via='lr' applies the same factors to each layer's learning rate instead of its
    gradient: Adam's update hardly changes when a gradient is rescaled (its second moment rescales
    with it), so only this acts on the updates. The gradients, the clip and the returned norms stay
    as they were (no equalised norms: the factors follow from the norms); the optimizer needs one
    group pair per layer (optimizer_for(..., by_layer=...)), and the factors cost one host sync a step.
    'lr_mean' divides the factors by their mean over the layers: it changes which layers move more, not
    the layers' mean lr (the factors themselves raise it several-fold in a 16-layer model, and with them
    AdamW at 2e-4 diverged: experiments/recipe/README.md)."""

    def __init__(self, groups, optimizer, grad_clip=0.0, equalize=False, equalize_via="grad"):
        self.norms = LayerGradNorms(groups)
        self.groups = [list(g) for g in groups.values()]   # LayerGradNorms' order
        self.params = [p for g in self.groups for p in g]
        check_equalize_via(equalize_via)
        self.optimizer, self.grad_clip, self.equalize, self.via = optimizer, grad_clip, equalize, equalize_via
        layer = [layer_of(n) for n in self.norms.names]
        layers = list(dict.fromkeys(n for n in layer if n))
        dev = self.params[0].device
        self.layer_groups = [g for g, n in enumerate(layer) if n is not None]
        self.is_layer = torch.tensor([n is not None for n in layer], device=dev)
        self.layer_index = torch.tensor([layers.index(n) if n else 0 for n in layer], device=dev)   # group -> layer
        self.n_layers = len(layers)
        if equalize and equalize_via != "grad":   # optimizer group -> layer index (None: embedding, head)
            tags = [layer_of(g.get("layer_group") or "") for g in optimizer.param_groups]
            if not any(tags):
                raise ValueError(f"equalize_via={equalize_via!r} needs an optimizer with a group per layer "
                                 f"(optimizer_for by_layer)")
            self.lr_layer = [layers.index(t) if t else None for t in tags]

    def _layer_scale(self, norms):
        """Each layer's equalisation factor: the largest layer norm over its own (1 where it is 0)."""
        sq = torch.where(self.is_layer, norms.square(), torch.zeros_like(norms))
        layer_norms = torch.zeros(self.n_layers, device=norms.device).index_add_(0, self.layer_index, sq).sqrt()
        return torch.where(layer_norms > 0, layer_norms.max() / layer_norms, torch.ones_like(layer_norms))

    def _equalize(self, norms):
        scale = torch.where(self.is_layer, self._layer_scale(norms)[self.layer_index], torch.ones_like(norms))
        for g in self.layer_groups:   # the other groups keep scale 1: nothing to do
            grads = [local_shard(p.grad) for p in self.groups[g] if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, scale[g])   # 0-dim device tensor: no host sync
        return norms * scale   # each group's norm scaled with it: no second norm pass (nor FSDP all-reduce)

    def _scale_lrs(self, norms):
        """Multiply each layer's learning rate (set for this step by set_lr) by its factor."""
        scale = self._layer_scale(norms)
        if self.via == "lr_mean":
            scale = scale / scale.mean()
        scale = scale.tolist()
        for group, layer in zip(self.optimizer.param_groups, self.lr_layer):
            if layer is not None:
                group["lr"] = group["lr"] * scale[layer]

    def __call__(self):
        norms = self.norms()
        norms_eq = None
        if self.equalize and self.via == "grad":
            norms_eq = self._equalize(norms)
        elif self.equalize:
            self._scale_lrs(norms)
        total = (norms if norms_eq is None else norms_eq).square().sum().sqrt()
        if self.grad_clip > 0:
            scaled_step(self.optimizer, [local_shard(p.grad) for p in self.params if p.grad is not None],
                        clip_coef(total, self.grad_clip))
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norms, norms_eq, total


def copy_weights(model):
    """A copy of model's weights on the CPU (sharded: this rank's shards), for restore_weights()."""
    return [local_shard(t).to("cpu", copy=True) for t in model.state_dict().values()]


@torch.no_grad()
def restore_weights(model, copy):
    """Put back the weights copy_weights() took, in place (the parameters the optimizer holds)."""
    for t, c in zip(model.state_dict().values(), copy):
        local_shard(t).copy_(c)


# ---- the non-finite guard -----------------------------------------------------------------------------
class FiniteGuard:
    """Catches a non-finite loss or gradient without a per-step host sync: each step leaves a
    device flag, and check() reads them all at once (at log intervals and before every save)."""

    def __init__(self):
        self.pending = []

    def watch(self, step, *values):
        self.pending.append((step, ~torch.stack([torch.isfinite(v).all() for v in values]).all()))

    def check(self, kept):
        """UserError naming the first bad step; kept says what happens to the last checkpoint."""
        if not self.pending:
            return
        flags = torch.stack([b for _, b in self.pending]).cpu().tolist()
        steps = [s for s, _ in self.pending]
        self.pending.clear()
        if any(flags):
            raise UserError(f"non-finite loss or gradient at step {steps[flags.index(True)]}: stopped ({kept}); "
                            f"try a lower learning_rate or dtype=float32")


EXPLODED = 1e10   # no weight of a healthy model comes near this (they are O(0.02)-O(10))


def _largest(named):
    """max |w| of each (name, tensor), as a CPU tensor: one fused reduction and one host sync (plus one
    all-reduce of the maxima when the tensors are FSDP shards). NaN stays NaN (inf when sharded)."""
    local = [local_shard(t) for _, t in named]
    top = torch.zeros(len(named), device=local[0].device if local else "cpu")
    have = [i for i, t in enumerate(local) if t.numel()]   # a rank's shard may be empty
    if have:
        top[have] = torch.stack(torch._foreach_norm([local[i] for i in have], ord=float("inf"))).float()
    group = shard_group([t for _, t in named])
    if group is not None:   # FSDP: the largest over every rank's shards (NaN as inf: MAX may drop a NaN)
        top = torch.where(torch.isnan(top), float("inf"), top)
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    return top.cpu()


def bad_weight(state, limit=EXPLODED):
    """(name, max |w|) of the first floating-point tensor of a state dict (or [(name, tensor)]) that is
    non-finite or larger than limit in magnitude, else None: the one weights guard every load and write
    of weights goes through (check_weights, check_state)."""
    items = state.items() if isinstance(state, dict) else state
    named = [(n, t) for n, t in items if torch.is_tensor(t) and t.is_floating_point() and t.numel()]
    if not named:
        return None
    top = _largest(named)
    bad = ~torch.isfinite(top) | (top > limit)
    if not bad.any():
        return None
    i = int(bad.nonzero()[0])
    return named[i][0], top[i].item()


def check_weights(model, step, kept):
    """UserError when a weight or buffer is non-finite or has exploded (|w| > EXPLODED): a finite loss
    does not prove sane weights, since the update after it can blow them up. One fused max-|w|
    reduction and one host sync (plus one all-reduce when sharded): call it before saving, not every step."""
    bad = bad_weight(model.state_dict())
    if bad:
        raise UserError(f"a weight is non-finite or has exploded after step {step} (max |w| {bad[1]:.3g} in "
                        f"{bad[0]}): stopped ({kept}); try a lower learning_rate or dtype=float32")


def check_state(state, where, limit=EXPLODED, fix="restore the weights from a good copy, or train again"):
    """The weights guard at a door (a checkpoint read or written, an import, an export): a UserError
    naming the tensor when a weight is non-finite or |w| > limit (default EXPLODED; an export's dtype
    passes its largest finite value)."""
    bad = bad_weight(state, limit)
    if bad:
        what = "non-finite" if not math.isfinite(bad[1]) else f"too large (max |w| {bad[1]:.3g} > {limit:.3g})"
        raise UserError(f"{where}: weight {bad[0]} is {what}: {fix}")
