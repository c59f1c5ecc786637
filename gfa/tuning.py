"""
Which weights a training run updates (train.py's `tune`): all of them (the default), 'partial' (the LM head,
the final norm and the last `tune_last` layers; everything else frozen: "Reassessing Layer Pruning in LLMs",
ICLR 2026), or 'lora' (every base weight frozen; each linear map of every block gets a low-rank adapter,
W x + (alpha / r) B A x, LoRA, Hu et al. 2021). prune.py's --heal_mode picks one for healing.

A LoRA model's checkpoints hold the merged weights (plain_state_dict: W + (alpha / r) B A under W's own
name), so every script loads them as the plain model they are; merge() folds the adapters in for good.

    from gfa.tuning import apply_tuning, plain_state_dict
    what = apply_tuning(model, "lora", rank=8, alpha=16)   # before the optimizer: only the adapters train
"""
import math

import torch
import torch.nn as nn

from gfa.cli import UserError

TUNE_MODES = ("all", "partial", "lora")
LORA_PARAMS = ("lora_A", "lora_B")


def apply_tuning(model, mode, last=2, rank=8, alpha=16.0):
    """Freeze what `mode` does not train (and add the adapters for 'lora'); returns a one-line description."""
    if mode not in TUNE_MODES:
        raise UserError(f"tune={mode!r}: use one of {', '.join(TUNE_MODES)}")
    N = model.config.n_layer
    if mode == "all":
        return "every weight trained"
    for p in model.parameters():
        p.requires_grad_(False)
    if mode == "partial":
        if not 1 <= last <= N:
            raise UserError(f"tune_last={last}: must be in [1, {N}] (the layers trained with the LM head)")
        for m in [model.norm_f, model.lm_head, *model.blocks[N - last:]]:
            for p in m.parameters():
                p.requires_grad_(True)
        tied = " (tied: the token embedding too)" if model.config.tie_embeddings else ""
        return f"partial: the LM head{tied}, the final norm and layers {N - last}..{N - 1} trained, the rest frozen"
    if rank < 1:
        raise UserError(f"lora_rank={rank}: must be >= 1")
    linears = [m for b in model.blocks for m in b.modules() if isinstance(m, nn.Linear)]
    for lin in linears:
        add_lora(lin, rank, alpha)
    n = sum(getattr(lin, p).numel() for lin in linears for p in LORA_PARAMS)
    return f"lora: rank {rank}, alpha {alpha:g}, {len(linears)} linear maps, {n:,} adapter weights; base frozen"


def add_lora(linear, rank, alpha):
    """Adapters A [r, in] (Kaiming-uniform, as LoRA) and B [out, r] (zero: the model starts unchanged) on an
    nn.Linear, applied by a forward hook: out + (alpha / r) x A^T B^T."""
    w = linear.weight
    A = nn.Parameter(torch.empty(rank, w.shape[1], device=w.device, dtype=w.dtype))
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    linear.register_parameter("lora_A", A)
    linear.register_parameter("lora_B", nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device, dtype=w.dtype)))
    linear.lora_scale = alpha / rank
    linear.lora_hook = linear.register_forward_hook(_lora_forward)


def _lora_forward(linear, args, out):
    return out + (args[0] @ linear.lora_A.T @ linear.lora_B.T) * linear.lora_scale


def _has_lora(m):
    return isinstance(m, nn.Linear) and hasattr(m, "lora_A")


def merged_weight(linear):
    return linear.weight + linear.lora_scale * (linear.lora_B @ linear.lora_A)


@torch.no_grad()
def plain_state_dict(model):
    """The model's state dict as the plain model's: a LoRA linear's weight merged, its adapters left out."""
    sd = model.state_dict()
    for name, m in model.named_modules():
        if _has_lora(m):
            sd[f"{name}.weight"] = merged_weight(m).detach()
            for p in LORA_PARAMS:
                del sd[f"{name}.{p}"]
    return sd


@torch.no_grad()
def merge(model):
    """Fold every adapter into its weight and remove it: the plain model, computing what the adapted one did."""
    for m in model.modules():
        if _has_lora(m):
            m.weight.copy_(merged_weight(m))
            m.lora_hook.remove()
            for p in LORA_PARAMS:
                delattr(m, p)
            del m.lora_scale, m.lora_hook
    return model
