"""
CascadeFormer / GFA model: a Llama-style Pre-LN decoder whose layers have explicit widths.

    x = x + Attn(RMSNorm(x));  x = x + SwiGLU(RMSNorm(x))

RoPE, causal multi-head attention (as many K/V heads as Q heads, head_dim 64) through
F.scaled_dot_product_attention, no biases, final RMSNorm, untied LM head. For Llama-family
checkpoints (gfa/hf_llama.py) the config also takes grouped-query attention (n_kv_head), a tied
LM head and HF Llama's RoPE scaling; the defaults leave the paper's model as it was.

Per layer l = 0..N-1 the model has its own number of heads and its own FFN inner size,
given as explicit lists or by the paper's taper rules (Section 4.5):
    d_attn(l) = d_attn0 - S_d * floor(l / F_d)        (F_d = 0: no attention taper)
    d_ffn(l)  = d_ffn0  - S_f * l                      (S_f = 0: no FFN taper)
Options: deep supervision (an auxiliary LM loss after every block, LayerSkip style),
shared-layer repetition (block i applied repeats[i] times in a row, "virtual depth") and
passthrough (layers skipped as identity; used by pruning and importance ablation).
Normalisation placement (norm_placement; the paper's is Pre-LN):
    'post'    x = RMSNorm(x + Attn(x));  x = RMSNorm(x + SwiGLU(x))
    'mix'     Mix-LN: Post-LN for layers l < floor(mix_post_fraction * N), Pre-LN after
    'scaled'  LayerNorm scaling: Pre-LN with each norm's output times 1/sqrt(l + 1)
and residual_scale s multiplies every residual branch: x = x + s * Attn(RMSNorm(x)).
Generation: a KV cache (generate()), and decode_step(), a static-shape greedy step that
compiles once and replays as a CUDA graph (bench.py --mode decode). Early exit: exit_states()
gives the residual stream after every block from one pass, head() turns one into logits.
Self-speculative decoding (LayerSkip): generate_self_speculative() drafts with the first E
blocks and verifies with the whole model, reusing the draft's KV cache below E.

The paper leaves S_d open; Table 2's parameter counts fix it at 128 (docs/paper_notes.md).
`python fanin.py --theory config/x.py` prints a config's per-layer architecture.
"""
import math
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def cross_entropy(logits, targets, **kw):
    """CE over (..., vocab) logits; bf16/fp16 logits are upcast so the softmax runs in fp32."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), **kw)


class LinearCrossEntropy(torch.autograd.Function):
    """CE of the logits x @ weight.T against targets (ignore_index -1), mean or sum, without ever holding
    the [N, V] logits: forward walks `chunk` tokens at a time and computes each chunk's loss and both
    gradients at once, g = (softmax - onehot) * scale, grad_x = g @ W, grad_W += g.T @ x (fp32), so the
    chunk's logits die with it; backward only scales the stored gradients by grad_output.

    Why: the plain head keeps N x V logits and their fp32 softmax for backward (GBs at 50k vocabulary),
    and deep supervision's exits, which cannot keep them all, recompute them in backward (checkpoint:
    4 head matmuls per exit instead of 3). Here each call keeps grad_x [N, C] and an fp32 grad_W [V, C]
    instead, and runs the three matmuls once. Matmuls run in the autocast dtype (as the plain head
    under autocast), the softmax in fp32. x: [N, C], weight: [V, C], targets: [N] (long)."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk, reduction="mean"):
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        w = weight.to(dtype)
        valid = targets != -1
        scale = 1.0 / valid.sum() if reduction == "mean" else torch.ones((), device=x.device)   # no host sync
        loss = torch.zeros((), device=x.device)
        grad_w = torch.zeros(weight.shape, device=x.device)   # fp32: the chunks' sum
        grad_x = []
        cols = torch.arange(weight.size(0), device=x.device)
        for xc, tc, vc in zip(x.split(chunk), targets.split(chunk), valid.split(chunk)):
            xc = xc.to(dtype)
            logits = xc @ w.t()   # [chunk, V] in the matmul dtype; every step below reads it in fp32
            lse = logits.float().logsumexp(-1)
            tc = tc.clamp(min=0)[:, None]   # an ignored target points anywhere: its row is zeroed below
            loss = loss + torch.where(vc, lse - logits.gather(1, tc)[:, 0].float(), 0.0).sum()
            # (softmax - onehot) * scale, ignored rows zero, cast last: all element-wise, so compiled it is one
            # pass from the matmul's output to g (no fp32 [chunk, V] buffer); eager makes fp32 temporaries
            p = (logits.float() - lse[:, None]).exp()
            g = (torch.where(cols == tc, p - 1, p) * (vc[:, None] * scale)).to(dtype)
            grad_x.append((g @ w).to(x.dtype))
            grad_w = grad_w + (g.t() @ xc).float()
        ctx.save_for_backward(torch.cat(grad_x), grad_w.to(weight.dtype))
        return loss * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_out.to(grad_x.dtype), grad_w * grad_out.to(grad_w.dtype), None, None, None


class ConfigError(ValueError):
    """A user mistake in a model config; scripts print it as one line, without a traceback."""


MIX_POST_FRACTION = 0.25   # Mix-LN's alpha (Li et al. 2024 found 0.25 best)


@dataclass
class GPTConfig:
    vocab_size: int = 50280          # token ids 0..vocab_size-1 (GPT-2 BPE: 50257, padded to 50280)
    block_size: int = 2048           # longest sequence (RoPE table, KV cache)
    d_model: int = 2048              # residual stream width
    n_layer: int = 16                # physical layers (blocks)
    head_dim: int = 64               # per attention head (even: RoPE)
    # explicit per-layer widths; an empty list means "derive from the taper rule below"
    n_head: list = field(default_factory=list)   # heads per layer; empty = the attention taper below
    d_ffn: list = field(default_factory=list)    # SwiGLU inner size per layer; empty = the FFN taper
    # attention taper: d_attn(l) = d_attn0 - S_d * floor(l / F_d); F_d = 0 switches it off
    d_attn0: int = 2048              # attention width of layer 0 (a multiple of head_dim)
    S_d: int = 128                   # the paper leaves S_d open; Table 2's counts fix it at 128
    F_d: int = 0                     # attention narrows by S_d every F_d layers; 0 = no taper
    # FFN taper: d_ffn(l) = d_ffn0 - S_f * l; S_f = 0 switches it off
    d_ffn0: int = 8192               # FFN inner size of layer 0
    S_f: int = 0                     # FFN narrows by S_f per layer; 0 = no taper
    repeats: list = field(default_factory=list)       # per layer, >= 1; empty = all 1
    passthrough: list = field(default_factory=list)   # layer indices skipped (identity)
    deep_supervision: bool = False   # an auxiliary LM loss after every block (LayerSkip)
    ds_alpha: list = field(default_factory=list)      # aux-loss weight per block; empty = all 1
    # LayerSkip's schedules 'uniform', 'linear', 'sum', 'sqrt', 'inv', 'inv_sqrt' weight exit l (1-based)
    # by 1, l, 1+..+l, sqrt(l), 1/l, 1/sqrt(l), the early exits times ds_e_scale, normalised to sum 1
    ds_scale: str = "paper"          # exit loss weights: 'paper' = L_N + sum_k alpha_k L_k, or a LayerSkip schedule
    ds_e_scale: float = 1.0          # LayerSkip's e_scale: multiplies every exit but the last
    # 'scaled': the two projections writing into the residual stream get 0.02 / sqrt(2 * n_layer)
    # (GPT-2 / nanoGPT; physical layers, so a repeated-layer model and its reference start alike)
    init: str = "normal"             # 'normal': every weight N(0, 0.02), as HF Llama (the paper); or 'scaled'
    rope_theta: float = 10000.0      # RoPE base
    norm_eps: float = 1e-5           # RMSNorm epsilon
    # Llama-family options (HF checkpoints, gfa/hf_llama.py); the defaults are the paper's model, unchanged
    n_kv_head: int = 0               # K/V heads per layer (grouped-query attention); 0 = as many as query heads
    tie_embeddings: bool = False     # the LM head reuses the token embedding matrix
    # HF Llama's RoPE scaling: {'rope_type': 'linear', 'factor': f}, or 'llama3' with factor,
    # low_freq_factor, high_freq_factor and original_max_position_embeddings
    rope_scaling: dict = field(default_factory=dict)   # RoPE scaling as HF Llama configures it; {} = none
    # where each block normalises (NORM_PLACEMENTS): 'pre' x + f(norm(x)) (the paper's); 'post' norm(x + f(x));
    # 'mix' Mix-LN (Li et al. 2024): Post-LN for layers l < floor(mix_post_fraction * n_layer), Pre-LN after;
    # 'scaled' LayerNorm scaling (Sun et al. 2025, "curse of depth"): Pre-LN, each norm's output times 1/sqrt(l+1)
    norm_placement: str = "pre"      # 'pre' (the paper), 'post', 'mix' (Mix-LN) or 'scaled' (LayerNorm scaling)
    mix_post_fraction: float = MIX_POST_FRACTION   # Mix-LN: the fraction of layers, from the first, that are Post-LN
    # explicit per-layer forms of the two rules above (a pruned model keeps its layers' own); empty = the rule
    post_ln: list = field(default_factory=list)       # per layer: True = Post-LN; empty = from norm_placement
    norm_scale: list = field(default_factory=list)    # per layer: its norms' output times this; empty = from norm_placement
    residual_scale: float = 1.0      # each residual branch's output times this: x + s * f(.)

    def __post_init__(self):
        def need(ok, msg):
            if not ok:
                raise ConfigError(msg)
        for name in ("n_head", "d_ffn", "repeats", "passthrough", "ds_alpha", "post_ln", "norm_scale"):
            setattr(self, name, list(getattr(self, name)))   # tuples from overrides, saved lists
        N, hd = self.n_layer, self.head_dim
        need(N >= 1, f"n_layer={N}: must be >= 1")
        need(self.vocab_size >= 1, f"vocab_size={self.vocab_size}: must be >= 1")
        need(self.block_size >= 1, f"block_size={self.block_size}: must be >= 1")
        need(self.d_model >= 1, f"d_model={self.d_model}: must be >= 1")
        need(hd >= 2 and hd % 2 == 0, f"head_dim={hd}: must be a positive even number (RoPE)")
        for name in ("n_head", "d_ffn", "repeats", "ds_alpha", "post_ln", "norm_scale"):
            v = getattr(self, name)
            need(len(v) in (0, N), f"{name} has {len(v)} entries but n_layer={N}: give one per layer or none")
        need(not (self.n_head and self.F_d), "n_head is given explicitly and F_d != 0: use one or the other")
        need(not (self.d_ffn and self.S_f), "d_ffn is given explicitly and S_f != 0: use one or the other")
        need(self.F_d >= 0, f"F_d={self.F_d}: must be >= 0 (0 = no attention taper)")
        need(self.d_attn0 > 0 and self.d_attn0 % hd == 0,
             f"d_attn0={self.d_attn0}: must be a positive multiple of head_dim={hd}")
        need(self.S_d >= 0 and self.S_d % hd == 0, f"S_d={self.S_d}: must be a non-negative multiple of head_dim={hd}")
        need(self.d_ffn0 > 0, f"d_ffn0={self.d_ffn0}: must be >= 1")
        need(self.S_f >= 0, f"S_f={self.S_f}: must be >= 0")
        for l, h in enumerate(self.layer_heads()):
            need(isinstance(h, int) and h >= 1,
                 f"n_head[{l}]={h}: attention width must be a positive multiple of head_dim={hd}"
                 + (" (the attention taper reaches zero: lower S_d or raise F_d)" if not self.n_head else ""))
        for l, f in enumerate(self.layer_ffn()):
            need(isinstance(f, int) and f >= 1, f"d_ffn[{l}]={f}: must be >= 1"
                 + (" (the FFN taper reaches zero: lower S_f)" if not self.d_ffn else ""))
        for l, r in enumerate(self.layer_repeats()):
            need(isinstance(r, int) and r >= 1, f"repeats[{l}]={r}: must be an integer >= 1")
        for i in self.passthrough:
            need(isinstance(i, int) and 0 <= i < N, f"passthrough index {i}: must be in [0, {N - 1}]")
        need(not self.ds_alpha or self.deep_supervision, "ds_alpha is set but deep_supervision=False")
        need(all(isinstance(a, (int, float)) and a >= 0 for a in self.ds_alpha),
             f"ds_alpha={list(self.ds_alpha)}: the loss weights must be >= 0")
        need(self.ds_scale in DS_SCALES, f"ds_scale={self.ds_scale!r}: use one of {', '.join(DS_SCALES)}")
        need(not self.ds_alpha or self.ds_scale == "paper", "ds_alpha weights the 'paper' loss only: drop it, or "
             "set ds_scale='paper'")
        need(self.ds_e_scale > 0, f"ds_e_scale={self.ds_e_scale}: must be > 0")
        need(self.init in ("normal", "scaled"), f"init={self.init!r}: use 'normal' (N(0, 0.02), the paper) or 'scaled'")
        kv = self.n_kv_head
        need(isinstance(kv, int) and kv >= 0, f"n_kv_head={kv}: must be >= 0 (0 = as many K/V heads as query heads)")
        for l, h in enumerate(self.layer_heads()):
            need(not kv or h % kv == 0, f"n_head[{l}]={h} is not a multiple of n_kv_head={kv}: grouped-query "
                 f"attention shares each K/V head among n_head / n_kv_head query heads")
        need(isinstance(self.rope_scaling, dict), f"rope_scaling={self.rope_scaling!r}: must be a dict ({{}} = none)")
        if self.rope_scaling:
            kind, keys = self.rope_scaling.get("rope_type"), ROPE_SCALING.get(self.rope_scaling.get("rope_type"))
            need(keys is not None, f"rope_scaling rope_type={kind!r}: use one of {', '.join(ROPE_SCALING)} "
                 f"({{}} = none)")
            bad = [k for k in keys if not isinstance(self.rope_scaling.get(k), (int, float))
                   or self.rope_scaling[k] <= 0]
            extra = sorted(set(self.rope_scaling) - set(keys) - {"rope_type"})
            need(not bad and not extra, f"rope_scaling {kind} takes positive numbers {', '.join(keys)}"
                 + (f"; {', '.join(bad)} missing or not positive" if bad else f"; not {', '.join(extra)}"))
            need(kind != "llama3" or self.rope_scaling["high_freq_factor"] > self.rope_scaling["low_freq_factor"],
                 "rope_scaling llama3: high_freq_factor must be larger than low_freq_factor")
        self._check_norms(need)

    def _check_norms(self, need):
        p = self.norm_placement
        need(p in NORM_PLACEMENTS, f"norm_placement={p!r}: use one of {', '.join(NORM_PLACEMENTS)}")
        need(0 <= self.mix_post_fraction <= 1, f"mix_post_fraction={self.mix_post_fraction}: must be in [0, 1]")
        need(p == "mix" or self.mix_post_fraction == MIX_POST_FRACTION,
             f"mix_post_fraction is set but norm_placement={p!r}: it applies to norm_placement='mix' only")
        need(not (self.post_ln and p in ("post", "mix")),
             f"post_ln is given explicitly and norm_placement={p!r}: use one or the other")
        need(not (self.norm_scale and p == "scaled"), "norm_scale is given explicitly and norm_placement='scaled': "
             "use one or the other")
        for l, b in enumerate(self.post_ln):
            need(isinstance(b, bool), f"post_ln[{l}]={b!r}: must be True or False")
        for l, v in enumerate(self.norm_scale):
            need(isinstance(v, (int, float)) and math.isfinite(v) and v > 0, f"norm_scale[{l}]={v!r}: must be > 0")
        need(math.isfinite(self.residual_scale) and self.residual_scale > 0,
             f"residual_scale={self.residual_scale}: must be > 0 (1 = the plain residual)")

    # --- resolved per-layer widths (derived, never stored, so a saved config rebuilds exactly)
    def layer_heads(self):
        if self.n_head:
            return list(self.n_head)
        step = (lambda l: l // self.F_d) if self.F_d else (lambda l: 0)
        return [(self.d_attn0 - self.S_d * step(l)) // self.head_dim for l in range(self.n_layer)]

    def layer_kv_heads(self):
        return [self.n_kv_head or h for h in self.layer_heads()]

    def layer_ffn(self):
        return list(self.d_ffn) if self.d_ffn else [self.d_ffn0 - self.S_f * l for l in range(self.n_layer)]

    def layer_repeats(self):
        return list(self.repeats) if self.repeats else [1] * self.n_layer

    def layer_post_ln(self):
        """Per layer: True where it normalises after the residual add (Post-LN)."""
        if self.post_ln:
            return list(self.post_ln)
        n_post = {"post": self.n_layer, "mix": math.floor(self.mix_post_fraction * self.n_layer)}.get(
            self.norm_placement, 0)
        return [l < n_post for l in range(self.n_layer)]

    def layer_norm_scale(self):
        """Per layer: the factor on its norms' output (LayerNorm scaling: 1/sqrt(l+1), else 1)."""
        if self.norm_scale:
            return [float(v) for v in self.norm_scale]
        return [1 / math.sqrt(l + 1) if self.norm_placement == "scaled" else 1.0 for l in range(self.n_layer)]

    def layer_alphas(self):
        return list(self.ds_alpha) if self.ds_alpha else [1.0] * self.n_layer

    def exit_weights(self, layers):
        """Deep supervision: the loss weight of the exit after each of `layers` (the layers that run,
        in order); the last entry weights the final output. 'paper': alpha_l, and 1 + alpha_last for
        the final (L_N plus the sum over k = 0..N-1, which includes the last block's exit);
        LayerSkip's schedules: DS_SCALES[name](l) for exit l = 1..E, the early exits times
        ds_e_scale, normalised to sum 1 (Elhoushi et al. 2024, as torchtune implements them)."""
        if self.ds_scale == "paper":
            a = [self.layer_alphas()[i] for i in layers]
            return a[:-1] + [1.0 + a[-1]]
        f = DS_SCALES[self.ds_scale]
        w = [f(l) * (self.ds_e_scale if l < len(layers) else 1.0) for l in range(1, len(layers) + 1)]
        return [x / sum(w) for x in w]

    def kept_layers(self, drop):
        """The layer indices left, in order, once layers `drop` are removed."""
        drop = set(drop)
        return [l for l in range(self.n_layer) if l not in drop]

    def without_layers(self, drop):
        """The config of the same model with layers `drop` physically removed (explicit lists)."""
        keep = self.kept_layers(drop)
        pick = lambda xs: [xs[l] for l in keep]
        d = asdict(self)
        d.update(n_layer=len(keep), n_head=pick(self.layer_heads()), d_ffn=pick(self.layer_ffn()), F_d=0, S_f=0,
                 repeats=pick(self.layer_repeats()), passthrough=[keep.index(i) for i in self.passthrough if i in keep],
                 ds_alpha=pick(self.ds_alpha) if self.ds_alpha else [])
        if self.norm_placement in ("mix", "scaled") or self.post_ln or self.norm_scale:   # depth-dependent: explicit
            d.update(norm_placement="pre", mix_post_fraction=MIX_POST_FRACTION, post_ln=pick(self.layer_post_ln()),
                     norm_scale=pick(self.layer_norm_scale()))
        return GPTConfig(**d)

    @classmethod
    def defaults(cls):
        """{field: default}: the model keys a config file or --key=value may set."""
        return {f.name: (f.default_factory() if callable(f.default_factory) else f.default) for f in fields(cls)}

    @classmethod
    def from_dict(cls, d):
        """Build from a dict that may hold other keys (a config file, a checkpoint's train config)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# HF Llama's RoPE scalings (transformers' modeling_rope_utils): their keys besides rope_type
ROPE_SCALING = {"linear": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
NORM_PLACEMENTS = ("pre", "post", "mix", "scaled")
DS_SCALES = {"paper": None, "uniform": lambda l: 1.0, "linear": lambda l: float(l), "sum": lambda l: l * (l + 1) / 2,
             "sqrt": math.sqrt, "inv": lambda l: 1.0 / l, "inv_sqrt": lambda l: 1.0 / math.sqrt(l)}


def rope_tables(head_dim, length, theta, scaling=None):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if scaling:
        inv_freq = scaled_frequencies(inv_freq, scaling)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)   # (T, head_dim/2)
    return angles.cos(), angles.sin()


def scaled_frequencies(inv_freq, scaling):
    """HF Llama's RoPE scaling of the inverse frequencies, written as transformers computes it.
    linear: all divided by factor. llama3 (Llama 3.1): wavelengths above original / low_freq_factor
    divided by factor, below original / high_freq_factor kept, smoothly interpolated between."""
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) * ~(wavelen > old / low)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x, cos, sin):
    # rotate-half form (as in Llama); cos/sin broadcast against x's (..., T, [H,] D/2)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


def cache_mask(pos, length, dtype):
    """The static-shape steps' attention mask over a KV cache of `length` positions: the query at
    position q sees cache position p when p <= q. Additive (0 / -inf) in the compute dtype and built
    once per step for every layer (GPT.run_blocks), so no layer builds or converts its own."""
    visible = torch.arange(length, device=pos.device) <= pos[:, None]   # (T, length)
    return torch.zeros(visible.shape, dtype=dtype, device=pos.device).masked_fill(~visible, float("-inf"))


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, d_model, n_head, head_dim, n_kv_head=0):
        super().__init__()
        self.n_head, self.head_dim = n_head, head_dim
        self.n_kv_head = n_kv_head or n_head   # fewer: grouped-query, each K/V head serves n_head / n_kv_head
        self.qkv = nn.Linear(d_model, (n_head + 2 * self.n_kv_head) * head_dim, bias=False)   # fused Q, K, V
        self.proj = nn.Linear(n_head * head_dim, d_model, bias=False)

    def _expand(self, k, v):
        """Grouped-query attention: each K/V head repeated for its query heads (as HF's repeat_kv)."""
        if self.n_kv_head == self.n_head:
            return k, v
        r = self.n_head // self.n_kv_head
        return k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)

    def forward(self, x, cos, sin, cache=None, pos=0, mask=None):
        B, T, _ = x.shape
        if self.n_kv_head == self.n_head:
            q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)   # (B, T, H, D)
        else:
            q, k, v = self.qkv(x).view(B, T, -1, self.head_dim).split([self.n_head, self.n_kv_head, self.n_kv_head], 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)   # (T, 1, D/2): broadcast over heads
        # RoPE in (B, T, H, D) memory, then (B, H, T, D) views for SDPA: cuDNN attention returns
        # its output in the query's memory layout, so the reshape after it is free (measured on
        # an H100: one copy kernel less per layer, -0.9 % forward latency)
        q, k = apply_rope(q, cos, sin).transpose(1, 2), apply_rope(k, cos, sin).transpose(1, 2)
        v = v.transpose(1, 2)
        if cache is None:
            y = F.scaled_dot_product_attention(q, *self._expand(k, v), is_causal=True)
        elif torch.is_tensor(pos):   # static shapes: write at positions pos, attend to the whole cache, masked
            cache[0].index_copy_(2, pos, k.to(cache[0].dtype))
            cache[1].index_copy_(2, pos, v.to(cache[1].dtype))
            mask = cache_mask(pos, cache[0].size(2), q.dtype) if mask is None else mask
            k, v = self._expand(cache[0].to(q.dtype), cache[1].to(q.dtype))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:   # KV cache: write this chunk at [pos, pos+T), attend to everything up to it
            cache[0][:, :, pos:pos + T] = k
            cache[1][:, :, pos:pos + T] = v
            k, v = self._expand(cache[0][:, :, :pos + T], cache[1][:, :, :pos + T])
            if T == 1:
                y = F.scaled_dot_product_attention(q, k, v)
            else:
                mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, d_model, d_ffn):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * d_ffn, bias=False)   # fused W1 (gate) and W3 (up)
        self.down = nn.Linear(d_ffn, d_model, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def _times(x, s):
    return x if s == 1.0 else x * s   # 1: no multiply kernel in the default model (x * 1.0 would be exact too)


class Block(nn.Module):
    """Layer `layer` of the stack: Pre-LN  x = x + s * Attn(c * norm(x));  x = x + s * SwiGLU(c * norm(x)),
    or Post-LN  x = norm(x + s * Attn(x));  x = norm(x + s * SwiGLU(x)), with s = residual_scale and c the
    layer's norm scale (GPTConfig.layer_post_ln / layer_norm_scale say which, per layer)."""

    def __init__(self, cfg, n_head, d_ffn, layer):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, n_head, cfg.head_dim, cfg.n_kv_head)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, d_ffn)
        self.post_ln, self.norm_scale = cfg.layer_post_ln()[layer], cfg.layer_norm_scale()[layer]
        self.residual_scale = cfg.residual_scale

    def forward(self, x, cos, sin, cache=None, pos=0, mask=None):
        s, c = self.residual_scale, self.norm_scale
        if self.post_ln:
            x = self.attn_norm(x + _times(self.attn(x, cos, sin, cache, pos, mask), s))
            return self.ffn_norm(x + _times(self.ffn(x), s))
        x = x + _times(self.attn(_times(self.attn_norm(x), c), cos, sin, cache, pos, mask), s)
        return x + _times(self.ffn(_times(self.ffn_norm(x), c)), s)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.heads, self.ffns, self.repeats = cfg.layer_heads(), cfg.layer_ffn(), cfg.layer_repeats()
        self.kv_heads = cfg.layer_kv_heads()
        self.fused_ce_chunk = 0   # set_fused_ce(): a run-time switch, not architecture (not in the config)
        # under torch.device("meta") (shapes only: counts, descriptions, plans) no values are drawn:
        # nn.Embedding's own N(0, 1) draw on meta imports torch._dynamo, about a second of start-up
        shapes_only = torch.empty(()).is_meta
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model,
                                    _weight=torch.empty(cfg.vocab_size, cfg.d_model) if shapes_only else None)
        self.blocks = nn.ModuleList(Block(cfg, h, f, l) for l, (h, f) in enumerate(zip(self.heads, self.ffns)))
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if shapes_only:   # placeholders of the tables' shape (computing them on meta imports torch._dynamo too)
            shape = (cfg.block_size, cfg.head_dim // 2)
            cos, sin = torch.empty(shape), torch.empty(shape)
        else:
            cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # Init (cfg.init): every weight N(0, 0.02), norms 1, as HF Llama; 'scaled' shrinks the
        # residual-stream projections by sqrt(2 * n_layer), the GPT-2 rule
        if shapes_only:
            return
        self.apply(self._init_weights)
        if cfg.init == "scaled":
            for block in self.blocks:
                nn.init.normal_(block.attn.proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))
                nn.init.normal_(block.ffn.down.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    @property
    def passthrough(self):
        """The skipped layers; the config is the one source, so a saved config records them."""
        return frozenset(self.config.passthrough)

    def set_passthrough(self, layers):
        """Skip exactly `layers` (identity) from now on; GPTConfig checks the indices."""
        self.config = replace(self.config, passthrough=sorted(int(i) for i in layers))

    def set_fused_ce(self, chunk):
        """Training losses through LinearCrossEntropy, `chunk` tokens at a time (0: the plain head and
        cross_entropy). Numbers equal the plain path's to rounding; forward with targets and gradients
        on then returns logits=None."""
        if not (isinstance(chunk, int) and chunk >= 0):
            raise ConfigError(f"fused_ce_chunk={chunk!r}: must be an integer >= 0 (tokens per chunk; 0 = off)")
        self.fused_ce_chunk = chunk

    # ---- forward -------------------------------------------------------------------------
    def head(self, x):
        """Logits of residual-stream states: the final norm and the LM head (an exit, after any block)."""
        return self.lm_head(self.norm_f(x))

    def _head_loss(self, x, targets):
        return cross_entropy(self.head(x), targets, ignore_index=-1)

    def _fused_head_loss(self, x, targets):
        h = self.norm_f(x)   # the norm stays outside: autograd takes LinearCrossEntropy's grad_x through it
        return LinearCrossEntropy.apply(h.reshape(-1, h.size(-1)), self.lm_head.weight, targets.reshape(-1),
                                        self.fused_ce_chunk)

    def _rope(self, T, pos):
        """(cos, sin, pos) for T tokens from position pos: an int, or a 0-d long tensor (static shapes),
        which comes back as the tensor of the T positions."""
        if torch.is_tensor(pos):   # index_select, not rope_cos[pos]: a 0-d tensor index breaks fullgraph
            pos = pos.view(1) + torch.arange(T, device=pos.device)
            return self.rope_cos.index_select(0, pos), self.rope_sin.index_select(0, pos), pos
        if pos + T > self.config.block_size:
            raise ValueError(f"sequence of {pos + T} tokens is longer than block_size={self.config.block_size}")
        return self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T], pos

    def run_blocks(self, x, cos, sin, kv_cache=None, pos=0, start=0, stop=None, on_exit=None):
        """x through blocks start..stop-1: passthrough ones skipped, each applied repeats[i] times;
        on_exit(i, x) after each block that runs. kv_cache[v] is the cache of virtual position v."""
        v, skip = sum(self.repeats[:start]), self.passthrough
        static = kv_cache is not None and torch.is_tensor(pos)   # decode_step & co.: one mask for every layer
        mask = cache_mask(pos, kv_cache[0][0].size(2), x.dtype) if static else None
        for i in range(start, self.config.n_layer if stop is None else stop):
            if i in skip:
                v += self.repeats[i]
                continue
            for _ in range(self.repeats[i]):
                x = self.blocks[i](x, cos, sin, None if kv_cache is None else kv_cache[v], pos, mask)
                v += 1
            if on_exit is not None:
                on_exit(i, x)
        return x

    def forward(self, idx, targets=None, kv_cache=None, pos=0, last_only=False):
        """Returns (logits, loss). loss is the final exit's cross-entropy, plus, in train mode
        with deep supervision, sum_k alpha_k * CE(exit after block k) (the training objective).
        With kv_cache, idx continues a sequence at position pos: an int, or a 0-d long tensor for
        static shapes (decode_step). After set_fused_ce(chunk), a forward with targets and gradients
        on computes every loss through LinearCrossEntropy and returns logits=None."""
        cos, sin, pos = self._rope(idx.size(1), pos)
        run = [i for i in range(self.config.n_layer) if i not in self.passthrough]
        deep = self.config.deep_supervision and self.training and targets is not None and bool(run)
        weights = self.config.exit_weights(run) if deep else None
        fused = bool(self.fused_ce_chunk) and targets is not None and torch.is_grad_enabled()
        aux = []

        def exit_loss(i, x):
            if i != run[-1]:   # the last exit is the final loss, weighted below
                # plain: recompute logits in backward, so peak memory holds one layer's logits, not N
                ce = self._fused_head_loss(x, targets) if fused else checkpoint(self._head_loss, x, targets,
                                                                                 use_reentrant=False)
                aux.append(weights[run.index(i)] * ce)
        x = self.run_blocks(self.tok_emb(idx), cos, sin, kv_cache, pos, on_exit=exit_loss if deep else None)
        if targets is None:
            return self.head(x[:, -1:] if last_only else x), None
        if fused:
            logits, loss = None, self._fused_head_loss(x, targets)
        else:
            logits = self.head(x)
            loss = cross_entropy(logits, targets, ignore_index=-1)
        if deep:   # the final output's weight ('paper': 1 + alpha_last, the last block's exit being the same CE)
            loss = loss * weights[-1]
        return logits, (loss + sum(aux[1:], aux[0]) if aux else loss)

    def exit_states(self, idx):
        """[(i, residual stream after block i)] for every block that runs, from one forward pass (no
        cache): the exit after block i has logits self.head(state), the last one the model's own."""
        cos, sin, _ = self._rope(idx.size(1), 0)
        states = []
        self.run_blocks(self.tok_emb(idx), cos, sin, on_exit=lambda i, x: states.append((i, x)))
        return states

    # ---- generation with a KV cache ----------------------------------------------------------
    def new_kv_cache(self, batch_size, length=None, dtype=None):
        length = length or self.config.block_size
        dtype = dtype or self.lm_head.weight.dtype
        dev = self.lm_head.weight.device
        cache = []
        for h, r in zip(self.kv_heads, self.repeats):
            for _ in range(r):
                shape = (batch_size, h, length, self.config.head_dim)
                cache.append((torch.zeros(shape, dtype=dtype, device=dev), torch.zeros(shape, dtype=dtype, device=dev)))
        return cache

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Sample max_new_tokens after idx (B, T). temperature=0 is greedy decoding."""
        B, T = idx.shape
        if T + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt {T} + {max_new_tokens} new tokens exceeds block_size={self.config.block_size}")
        cache = self.new_kv_cache(B, T + max_new_tokens)
        logits, _ = self(idx, kv_cache=cache, pos=0, last_only=True)
        out = [idx]
        for step in range(max_new_tokens):
            logits = logits[:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            out.append(nxt)
            if step + 1 < max_new_tokens:
                logits, _ = self(nxt, kv_cache=cache, pos=T + step, last_only=True)
        return torch.cat(out, dim=1)

    def decode_step(self, tok, pos, cache):
        """One greedy token per sequence, with static shapes: tok (B, 1) is written into the cache
        at pos (a 0-d long tensor) and attends to the whole cache through a mask, so the step
        compiles once and replays as a CUDA graph. Returns the next tokens (B, 1)."""
        logits, _ = self(tok, kv_cache=cache, pos=pos, last_only=True)
        return logits[:, -1].float().argmax(dim=-1, keepdim=True)

    # ---- self-speculative decoding (LayerSkip, Elhoushi et al. 2024) --------------------------
    def draft_step(self, tok, pos, cache, exit_layer):
        """One greedy draft token per sequence from the first exit_layer blocks: tok (B, 1) at
        position pos (a 0-d long tensor; static shapes, as decode_step) through blocks < exit_layer
        (their KV cache written), then the final norm and head. Returns (next tokens (B, 1), the
        state after those blocks (B, 1, C), which verify_step continues from)."""
        cos, sin, pos = self._rope(1, pos)
        x = self.run_blocks(self.tok_emb(tok), cos, sin, cache, pos, stop=exit_layer)
        return self.head(x).float().argmax(dim=-1), x

    def verify_step(self, states, tok, pos, cache, exit_layer):
        """The whole model's greedy next token after each of d + 1 inputs at positions pos..pos+d,
        in one pass: states (B, d, C) are the drafted inputs' states after block exit_layer - 1
        (draft_step's, their KV cache below exit_layer already written), tok (B, 1) the last draft,
        which alone still goes through blocks < exit_layer; then all d + 1 go through the rest.
        Returns (B, d + 1)."""
        d = states.size(1)
        cos, sin, at = self._rope(1, pos + d)
        last = self.run_blocks(self.tok_emb(tok), cos, sin, cache, at, stop=exit_layer)
        cos, sin, at = self._rope(d + 1, pos)
        x = self.run_blocks(torch.cat([states, last], dim=1), cos, sin, cache, at, start=exit_layer)
        return self.head(x).float().argmax(dim=-1)

    @torch.no_grad()
    def generate_self_speculative(self, idx, max_new_tokens, exit_layer, draft_len, draft=None, verify=None,
                                  cache=None):
        """Greedy decoding of one sequence (idx (1, T)) by self-speculation: each round drafts
        draft_len tokens with the first exit_layer blocks (draft_step), verifies them with the whole
        model in one pass that reuses the draft's KV cache and states below exit_layer (verify_step),
        and keeps the drafts up to the first one the model disagrees with, plus the model's own next
        token. The result is greedy generate()'s (up to argmax ties that a batched and a one-token
        matmul round differently). draft, verify: those steps compiled, cache: a new_kv_cache of at least
        T + max_new_tokens + draft_len positions, reused across calls (bench.py). Returns (tokens
        (1, T + max_new_tokens), {'rounds', 'drafted', 'accepted'})."""
        B, T = idx.shape
        if B != 1:
            raise ValueError(f"self-speculative decoding takes one sequence, not a batch of {B}")
        if not 1 <= exit_layer <= self.config.n_layer or draft_len < 1:
            raise ValueError(f"exit_layer={exit_layer} must be in [1, {self.config.n_layer}] and "
                             f"draft_len={draft_len} >= 1")
        length = T + max_new_tokens + draft_len   # the last round may draft past the end
        if length > self.config.block_size:
            raise ValueError(f"prompt {T} + {max_new_tokens} new + {draft_len} draft tokens exceeds "
                             f"block_size={self.config.block_size}")
        draft, verify = draft or self.draft_step, verify or self.verify_step
        cache = cache if cache is not None else self.new_kv_cache(1, length)
        positions = torch.arange(length, device=idx.device)
        logits, _ = self(idx, kv_cache=cache, pos=0, last_only=True)
        out = [idx, logits[:, -1].float().argmax(dim=-1, keepdim=True)]
        stats, n, pos = {"rounds": 0, "drafted": 0, "accepted": 0}, 1, T   # pos: position of out[-1]
        while n < max_new_tokens:
            tok, drafts, states = out[-1], [], []
            for j in range(draft_len):
                tok, x = draft(tok, positions[pos + j], cache, exit_layer)
                drafts.append(tok)
                states.append(x)
            drafts = torch.cat(drafts, dim=1)
            full = verify(torch.cat(states, dim=1), drafts[:, -1:], positions[pos], cache, exit_layer)
            k = int((drafts == full[:, :-1]).int().cumprod(dim=1).sum())   # the drafts the model agrees with
            out += [drafts[:, :k], full[:, k:k + 1]]
            n, pos = n + k + 1, pos + k + 1
            stats = {"rounds": stats["rounds"] + 1, "drafted": stats["drafted"] + draft_len,
                     "accepted": stats["accepted"] + k}
        return torch.cat(out, dim=1)[:, :T + max_new_tokens], stats

    # ---- accounting ------------------------------------------------------------------------
    def num_params(self, include_embedding=True):
        """Parameters (a tied embedding counted once); without the embedding: less the input embedding,
        which a tied model's LM head still uses, so there it is kept."""
        n = sum(p.numel() for p in self.parameters())
        return n if include_embedding or self.config.tie_embeddings else n - self.tok_emb.weight.numel()

    def layer_flops_per_token(self, seq_len=None):
        """Forward FLOPs per token of each layer (all its repeats; 0 if passed through):
        2 per multiply-add of the Q/K/V/O and SwiGLU matmuls, plus causal attention
        (QK^T and AV: 4 * d_attn per query-key pair, on average (T+1)/2 keys per query)."""
        T = seq_len or self.config.block_size
        d = self.config.d_model
        out = []
        for i, (h, kv, f, r) in enumerate(zip(self.heads, self.kv_heads, self.ffns, self.repeats)):
            d_attn = h * self.config.head_dim
            per_pass = 2 * (2 * d * (h + kv) * self.config.head_dim + 3 * d * f) + 2 * d_attn * (T + 1)
            out.append(0 if i in self.passthrough else r * per_pass)
        return out

    def flops_per_token(self, seq_len=None):
        """Forward FLOPs per token: the layers plus the LM head (embedding lookup is free)."""
        return sum(self.layer_flops_per_token(seq_len)) + 2 * self.config.d_model * self.config.vocab_size

    def train_flops_per_token(self, seq_len=None):
        """Forward FLOPs per token of the training objective (what MFU counts, x3): with deep supervision
        every exit's LM head too (model FLOPs: the plain path's recomputation of the exits is not counted)."""
        exits = sum(i not in self.passthrough for i in range(self.config.n_layer)) if self.config.deep_supervision else 1
        return self.flops_per_token(seq_len) + (exits - 1) * 2 * self.config.d_model * self.config.vocab_size

    def param_groups_by_layer(self, sublayers=False):
        """Stable names for "layer i's parameters": 'embed', 'layer.0' .. 'layer.N-1', 'head'
        (final norm + LM head; a tied LM head's matrix is in 'embed', once). A repeated layer's group
        is its shared parameters. sublayers=True splits each layer into 'layer.i.attn' (its attention
        and the norm before it) and 'layer.i.mlp' (the rest: the FFN and its norm)."""
        groups = {"embed": [self.tok_emb.weight]}
        for i, block in enumerate(self.blocks):
            if not sublayers:
                groups[f"layer.{i}"] = list(block.parameters())
                continue
            attn = list(block.attn_norm.parameters()) + list(block.attn.parameters())
            groups[f"layer.{i}.attn"] = attn
            groups[f"layer.{i}.mlp"] = [p for p in block.parameters() if all(p is not q for q in attn)]
        groups["head"] = [self.norm_f.weight] + ([] if self.config.tie_embeddings else [self.lm_head.weight])
        return groups


def drop_layers(model, drop):
    """A new, physically smaller GPT without layers `drop`, sharing nothing with `model`."""
    cfg = model.config.without_layers(drop)
    keep = model.config.kept_layers(drop)
    new = GPT(cfg).to(model.lm_head.weight.device, model.lm_head.weight.dtype)
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("blocks."):
            _, l, rest = k.split(".", 2)
            if int(l) not in keep:
                continue
            k = f"blocks.{keep.index(int(l))}.{rest}"
        sd[k] = v.clone()
    new.load_state_dict(sd)
    return new


def describe(model):
    """The per-layer table of a model (`python fanin.py --theory config/x.py` prints it)."""
    cfg = model.config
    lines = [f"d_model {cfg.d_model}  head_dim {cfg.head_dim}  vocab {cfg.vocab_size}  block_size {cfg.block_size}"
             f"  deep_supervision {cfg.deep_supervision}"
             + (f"  n_kv_head {cfg.n_kv_head}" if cfg.n_kv_head else "") + ("  tied" if cfg.tie_embeddings else ""),
             f"norm_placement {cfg.norm_placement}" + (f" (Post-LN: the first {cfg.mix_post_fraction:g} of the layers)"
                                                       if cfg.norm_placement == "mix" else "")
             + f"  residual_scale {cfg.residual_scale:g}",
             f"{'layer':>5} {'heads':>5} {'d_attn':>6} {'d_ffn':>6} {'repeats':>7} {'params':>12}  note"]
    for i, (h, f, r, b) in enumerate(zip(model.heads, model.ffns, model.repeats, model.blocks)):
        note = "  ".join(n for n in ("passthrough" if i in model.passthrough else "",
                                     "Post-LN" if b.post_ln else "",
                                     f"norm x{b.norm_scale:.4g}" if b.norm_scale != 1.0 else "") if n)
        lines.append(f"{i:>5} {h:>5} {h * cfg.head_dim:>6} {f:>6} {r:>7} {sum(p.numel() for p in b.parameters()):>12}  {note}")
    lines.append(f"params: {model.num_params()}")
    lines.append(f"params_non_embedding: {model.num_params(include_embedding=False)}")
    lines.append(f"flops_per_token: {model.flops_per_token()}")
    return "\n".join(lines)

