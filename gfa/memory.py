"""
The memory plan of a train.py run: per-GPU bytes of parameters, gradients, optimizer state,
activations and the largest transient (the logits and their gradient), from the model config and
the run's settings alone (no GPU, nothing allocated); the micro-batch that fits a GPU; and the one
line that says so when a step does not fit.

    python train.py config/cascade_a2.py --plan                         # this machine's GPU, or 80 GiB
    python train.py config/cascade_a2.py --plan --world_size=8 --gpu_mem_gb=141 --parallel=fsdp

What each term counts (bytes per GPU; P parameters, N = micro-batch x block_size tokens, e the
compute dtype's size: 2 under bfloat16 autocast, else 4; d, a, f, h: d_model, a layer's attention
width and FFN width, its heads):
  parameters   4P, fp32 master weights in every dtype (autocast computes in bf16 and keeps them fp32);
               FSDP: 4P / world.
  gradients    4P (fp32, as the weights); DDP also keeps its own fp32 buckets (4P, allocated at wrap);
               FSDP: 4P / world. With one micro-step and no DDP the step's peak comes before most of
               them exist (set_to_none), so the peak counts the LM head's only.
  optimizer    AdamW 8P (exp_avg, exp_avg_sq); SGD 4P (momentum; 0 without); FSDP: / world.
  activations  the tensors each block saves for backward, per token: torch.compile (inductor's
               min-cut partition, read from its forward graph: tests/gfa/test_memory.py)
               8d + e(2d + 5a + 3f) + 4h + 8: the fp32 residual stream in and mid-block, both norm
               outputs, q k v, the attention output and its reshape, the SwiGLU's two projections and
               product, the logsumexp and the norms' rstd; eager 16d + e(2d + 6a + 4f) + 4h + 8. Each
               application of a block counts (virtual depth repeats it). Under bf16 autocast the bf16
               copies of the matmul weights are saved as well (2 bytes a weight). Activation
               checkpointing keeps only each block's input (4d) and recomputes one block at a time
               (with its bf16 weight copies), after the LM head's backward has freed the logits: the
               peak is the larger of the two phases, not their sum (on an H100 the sum ran 8.7-10 %
               over the measured peak; the larger phase is 0.9-2.7 % over the same measurements).
  transient    the LM head's logits and their gradient. Compiled: 3NVe, the saved logits, the softmax
               and the logits' gradient (on an H100 with torch 2.11 the fp32 peak is activations + 12NV
               + the head's work to 1 KB; 2NVe, used before, ran 3 GiB under the paper's command).
               Eager: 12NV (+2NV under bf16: the fp32 log-softmax, its gradient and the logits'
               gradient), also under FSDP, whose root is not compiled, and for deep supervision's
               exits. With fused_ce a chunk's, chunk x V x (2e + 8), while each loss keeps its
               grad_x and fp32 grad_W.
Outside torch's allocator (what torch.cuda.max_memory_allocated does not see): the CUDA context,
cuBLAS/NCCL workspaces: CONTEXT_GIB (+ NCCL_GIB with a process group of more than one rank).
"""
from dataclasses import dataclass, replace

import torch

from model import GPT

GIB = 2 ** 30
CONTEXT_GIB = 0.75   # CUDA context + library handles, outside the caching allocator (H100, CUDA 12: ~0.5-0.7)
NCCL_GIB = 0.5       # NCCL's own buffers with more than one rank
HEADROOM = 0.12      # of the free memory micro_batch="auto" leaves: the plan runs up to ~7 % under the measured peak
INT32_ELEMENTS = 2 ** 31   # logits of a micro-step at or above this take inductor's 64-bit indexing path, which
                           # no GPU run here has compiled yet: 'auto' stays below it (see fit())
DEFAULT_GPU_GIB = 80.0     # --plan without a GPU and without --gpu_mem_gb: an 80 GB H100 / A100


@dataclass(frozen=True)
class Setting:
    """What the plan depends on besides the model: train.py's settings, resolved."""
    micro: int                     # sequences per micro-step per GPU
    dtype: str = "float32"         # 'float32', 'tf32', 'bfloat16' (autocast)
    parallel: str = "none"         # 'none' (one process), 'ddp', 'fsdp'
    world: int = 1
    accum: int = 1                 # micro-steps per optimizer step
    compile: bool = True
    activation_checkpointing: bool = False
    fused_ce: bool = False
    fused_ce_chunk: int = 8192
    optimizer: str = "adamw"
    momentum: float = 0.9
    eval_batch: int = 8


def param_counts(cfg):
    """{'embedding', 'blocks': [per block], 'head' (final norm + untied LM head)}: GPT's own parameters,
    counted on a meta-device model (no memory, milliseconds even at 1.2B)."""
    with torch.device("meta"):
        model = GPT(cfg)
    blocks = [sum(p.numel() for p in b.parameters()) for b in model.blocks]
    embedding = model.tok_emb.weight.numel()
    return {"embedding": embedding, "blocks": blocks, "head": model.num_params() - embedding - sum(blocks)}


def num_params(cfg):
    c = param_counts(cfg)
    return c["embedding"] + sum(c["blocks"]) + c["head"]


def block_saved_per_token(cfg, layer, e, compiled):
    """Bytes one application of block `layer` saves for backward per token (see the module docstring)."""
    d, a, f, h = cfg.d_model, cfg.layer_heads()[layer] * cfg.head_dim, cfg.layer_ffn()[layer], cfg.layer_heads()[layer]
    if compiled:
        return 8 * d + e * (2 * d + 5 * a + 3 * f) + 4 * h + 8
    return 16 * d + e * (2 * d + 6 * a + 4 * f) + 4 * h + 8


@dataclass
class Plan:
    """Bytes per GPU of each term; peak is what torch.cuda.max_memory_allocated should read (within
    ~10 %), need adds what lives outside torch's allocator."""
    setting: Setting
    params: int
    grads: int
    optimizer: int
    buffers: int          # DDP's gradient buckets, or FSDP's gathered (unsharded) parameters and gradients
    activations: int
    transient: int
    recompute: int        # activation checkpointing: one block's recomputed activations (0 without)
    grads_at_peak: int
    eval_peak: int
    logits_elements: int  # of one micro-step's plain LM head (0 with fused_ce)

    @property
    def static(self):
        return self.params + self.optimizer + self.buffers

    @property
    def peak(self):
        head = self.static + self.grads_at_peak + self.activations + self.transient   # backward's start
        # checkpointing recomputes the blocks after the head's backward; every gradient counted there (an
        # upper bound: with one micro-step the blocks' gradients appear as their inputs are freed)
        blocks = self.static + self.grads + self.activations + self.recompute if self.recompute else 0
        during_backward = max(head, blocks)
        after_backward = self.static + self.grads   # the optimizer step: every gradient, no activations
        return max(during_backward, after_backward, self.eval_peak)

    @property
    def need(self):
        return self.peak + overhead(self.setting)

    def fits(self, gpu_bytes):
        return self.need <= gpu_bytes


def overhead(s):
    """Bytes outside torch's caching allocator (CUDA context, NCCL) for setting s."""
    return int((CONTEXT_GIB + (NCCL_GIB if s.world > 1 else 0)) * GIB)


def plan(cfg, s):
    """The Plan of GPTConfig cfg trained with Setting s."""
    counts = param_counts(cfg)
    P = num_params(cfg)
    W = s.world if s.parallel == "fsdp" else 1
    e = 2 if s.dtype == "bfloat16" else 4
    N, V, d = s.micro * cfg.block_size, cfg.vocab_size, cfg.d_model
    per_state = {"adamw": 2, "sgd": 1 if s.momentum else 0}[s.optimizer]
    params, grads, optimizer = 4 * P // W, 4 * P // W, 4 * P * per_state // W
    buffers = 4 * P if s.parallel == "ddp" else 0   # DDP's buckets (any world size, one rank too)
    if s.parallel == "fsdp":   # the root (embedding, norm, head) stays gathered in fp32; blocks two at a time
        pe = e if s.dtype == "bfloat16" else 4
        buffers = 4 * (counts["embedding"] + counts["head"]) + max(counts["blocks"]) * (2 * pe + 4)
    acts, recompute = activation_bytes(cfg, s, N, e, counts)
    transient, logits = head_transient(cfg, s, N, e)
    head_grad = 4 * V * d // W
    grads_at_peak = grads if s.accum > 1 else head_grad   # set_to_none: one micro-step starts without
    # evaluation: eval_batch sequences, no gradients (set_to_none), the logits in fp32 and log-softmax
    eval_peak = params + optimizer + buffers + s.eval_batch * cfg.block_size * V * (e + 8)
    return Plan(s, params, grads, optimizer, buffers, acts, transient, recompute, grads_at_peak, eval_peak, logits)


def activation_bytes(cfg, s, N, e, counts):
    """(saved-for-backward bytes of the blocks and the head, not the logits: head_transient counts them;
    under activation checkpointing the largest block's recomputed activations, else 0)."""
    run = [l for l in range(cfg.n_layer) if l not in set(cfg.passthrough)]
    reps = cfg.layer_repeats()
    per_block = {l: N * block_saved_per_token(cfg, l, e, s.compile) for l in run}
    recompute = 0
    if s.activation_checkpointing:   # each application keeps its input; backward recomputes one block at a time
        acts = sum(reps[l] for l in run) * N * 4 * cfg.d_model
        recompute = max(per_block.values(), default=0)
    else:
        acts = sum(reps[l] * per_block[l] for l in run)
    acts += N * cfg.d_model * (4 + e) + 12 * N   # the final norm's input, output and rstd; the loss's logsumexp
    if s.dtype == "bfloat16":   # autocast's bf16 copies of the matmul weights, saved for backward
        matmul = [c - 2 * cfg.d_model for c in counts["blocks"]]   # a block's weights but its two norms'
        if s.parallel == "fsdp":
            matmul = [0]   # FSDP gathers the blocks in bf16 and frees them after forward
        if s.activation_checkpointing:   # a block's copies are made again when it is recomputed
            recompute += 2 * max(matmul)
            matmul = [0]
        acts += 2 * (sum(matmul) + cfg.vocab_size * cfg.d_model)
    if s.fused_ce and cfg.deep_supervision:   # every early exit keeps its grad_x and fp32 grad_W
        acts += (len(run) - 1) * 4 * (N * cfg.d_model + cfg.vocab_size * cfg.d_model)
    return acts, recompute


def head_transient(cfg, s, N, e):
    """(bytes, logits elements): the LM head's largest transient in backward and the size of its logits."""
    V = cfg.vocab_size
    if s.fused_ce:
        chunk = min(s.fused_ce_chunk, N)
        return 4 * N * cfg.d_model + 4 * V * cfg.d_model + chunk * V * (2 * e + 8), 0
    work = 8 * N * cfg.d_model + 4 * V * cfg.d_model   # the head's backward: grad_x in fp32, a fresh grad_W
    eager = 12 * N * V + (2 * N * V if e == 2 else 0) + work
    compiled = 3 * N * V * e + work   # saved logits, softmax, the logits' gradient (measured: tests/gfa/test_memory.py)
    # eager where the loss is not in a compiled graph: deep supervision's exits (checkpointed regions, traced
    # apart) and FSDP's root (gfa/sharding.py compiles the blocks only)
    whole = s.compile and not cfg.deep_supervision and s.parallel != "fsdp"
    return (compiled if whole else eager), N * V


def divisors(n):
    return [k for k in range(1, n + 1) if n % k == 0]


def fit(cfg, s, per_rank, budget, below=None):
    """The largest micro-batch (a divisor of per_rank, the sequences each GPU computes per step, and
    below `below` if given) whose plan needs at most `budget` bytes, and whose logits stay below 2^31
    elements when compiled without fused_ce; None if not even 1 fits."""
    for m in sorted((k for k in divisors(per_rank) if below is None or k < below), reverse=True):
        p = plan(cfg, replace(s, micro=m, accum=per_rank // m))
        if p.need <= budget and not (s.compile and p.logits_elements >= INT32_ELEMENTS):
            return m
    return None


def gib(n):
    return f"{n / GIB:.2f} GiB" if n < 10 * GIB else f"{n / GIB:.1f} GiB"


def describe(p, gpu_bytes, block_size):
    """The plan as log lines: the terms, the total against the GPU, and whether it fits."""
    s = p.setting
    opt = {"adamw": "AdamW", "sgd": "SGD"}[s.optimizer]
    shard = f" (1/{s.world} each: fsdp)" if s.parallel == "fsdp" else ""
    lines = [f"memory plan per GPU ({s.micro} x {block_size} tokens per micro-step x {s.accum} accumulation, "
             f"{s.dtype}, "
             + {"none": "one process", "ddp": f"ddp x {s.world}", "fsdp": f"fsdp x {s.world}"}[s.parallel]
             + (", compiled" if s.compile else ", eager") + (", activation checkpointing" if s.activation_checkpointing
                                                            else "") + (", fused_ce" if s.fused_ce else "") + "):",
             f"  params {gib(p.params)} + grads {gib(p.grads)} + {opt} {gib(p.optimizer)}{shard}"
             + (f" + {'DDP buckets' if s.parallel == 'ddp' else 'FSDP gathered'} {gib(p.buffers)}" if p.buffers else "")
             + f" + activations {gib(p.activations)} + "
             + (f"max(logits/loss {gib(p.transient)}, a recomputed block {gib(p.recompute)} + the grads)" if p.recompute
                else f"logits/loss {gib(p.transient)}"),
             f"  peak {gib(p.peak)} (torch.cuda.max_memory_allocated) + {gib(overhead(s))} CUDA context"
             + (" and NCCL" if s.world > 1 else "") + f" = {gib(p.need)} of {gib(gpu_bytes)}: "
             + ("fits" if p.fits(gpu_bytes) else "does NOT fit")]
    return lines


def alternatives(cfg, s, per_rank, gpu_bytes):
    """What fits instead (with micro_batch='auto's headroom), cheapest change first: [(settings to pass, the
    plan's need)]: the micro-batch alone, then activation checkpointing, parallel=fsdp (several ranks),
    bfloat16, and their sums."""
    out, budget = [], int(gpu_bytes * (1 - HEADROOM))
    changes = [{}, {"activation_checkpointing": True}]
    if s.world > 1 and s.parallel != "fsdp":
        changes += [{"parallel": "fsdp"}, {"parallel": "fsdp", "activation_checkpointing": True}]
    if s.dtype != "bfloat16":
        changes += [dict(c, dtype="bfloat16") for c in list(changes)]
    for change in changes:
        if any(getattr(s, k) == v for k, v in change.items()):
            continue
        t = replace(s, **change)
        m = fit(cfg, t, per_rank, budget, below=None if change else s.micro)
        if m is not None:
            best = plan(cfg, replace(t, micro=m, accum=per_rank // m))
            args = [f"--{k}={v}" for k, v in change.items()] + [f"--micro_batch={m}"]
            out.append((" ".join(args), best.need))
        if len(out) >= 3:
            break
    return out


def advice(cfg, s, per_rank, gpu_bytes):
    """One clause naming the changes that fit, for the plan and the out-of-memory line."""
    alts = alternatives(cfg, s, per_rank, gpu_bytes)
    if not alts:
        return (f"nothing fits {gib(gpu_bytes)} per GPU, even one sequence per micro-step: use more GPUs with "
                f"--parallel=fsdp, or a smaller model")
    return "fits: " + "; ".join(f"{a} ({gib(n)})" for a, n in alts)


def is_oom(e):
    """Is e (or what it wraps: a compile failure around an allocation) a CUDA out-of-memory error?"""
    import torch
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, torch.OutOfMemoryError) or "CUDA out of memory" in str(e).split("\n")[0]:
            return True
        e = getattr(e, "inner_exception", None) or e.__cause__
    return False


def is_compile_failure(e):
    """Is e an error of torch.compile (dynamo or inductor), e.g. BackendCompilerFailed?"""
    return any(c.__module__.startswith(("torch._dynamo", "torch._inductor")) for c in type(e).__mro__)


def first_line(e, limit=200):
    text = (str(e).strip().splitlines() or [""])[0]
    return text if len(text) <= limit else text[:limit] + "..."
