"""
Width schedules from a profile: per-layer attention heads and FFN sizes that spend a budget
(forward FLOPs per token at a sequence length, or parameters) the way the profile says, written
as a config file that train.py and bench.py take (and prune.py, through the run trained from it).

    python taper.py config/small.py config/vanilla_16l.py --profile gfa --target_layers 15 --out out/taper/small_gfa.py
    python train.py config/small.py out/taper/small_gfa.py          # -> out/small_small_gfa
    python taper.py config/vanilla_16l.py --profile gfa --target_layers 15 --out out/taper/gfa.py   # the paper's size
    python bench.py out/taper/gfa.py vanilla_15l cascade_a2
    python taper.py config/small.py config/vanilla_16l.py --profile measured --run out/small_vanilla_16l

The base config (files and --key=value, as everywhere) gives the layers and the widths a profile
starts from; the budget is the base's own, the base with --target_layers uniform layers (that of
Vanilla-15L: the paper's comparison at equal cost), or --target outright. Profiles:

  gfa            widths proportional to the base's theoretical fan-in (gfa.theory: plain N - l + 1,
                 quadratic under deep supervision, virtual depth's own): capacity where the gradient is
  measured       widths proportional to a run's measured accumulated gradient share (--run): the
                 attention from its attention sub-blocks' share and the FFN from its MLP's when its
                 dump records them apart, else both from the layer share
  increasing     OpenELM's layer-wise scaling (Mehta et al. 2024): widths rising linearly with depth,
                 attention 0.5 -> 1 and FFN 0.5 -> 4 times the base in their ratios
  narrow_middle  a "><"-shaped model: widths falling linearly to half at the middle layer, then rising
  uniform        the base widths, and as many layers as fit (fewer layers: Vanilla-15L at 15 layers' budget)
  linear         the paper's linear taper, w(l) = w0 (1 - g l): layer 0 at the base width, slope g solved
  step           the paper's step taper (CascadeFormer-A), w(l) = w0 (1 - g floor(l / step_every)), g solved

The proportional profiles (gfa, measured, increasing, narrow_middle) scale their shape s (divided by
its mean) by one factor c for the budget: w(l) = c w0 (1 - strength + strength s(l)); strength 0 is
uniform. --parts picks the widths that follow the profile (the others keep the base's; by default
the attention for step and the FFN for linear, as in the paper, both for the rest). Widths are
rounded to multiples of --head_multiple heads and --ffn_multiple FFN units; the schedule is the one
closest to the budget from below (never over it).
"""
import os
import re
import shlex
from dataclasses import asdict, fields

import numpy as np
import torch

from gfa import rundir
from gfa.cli import ArgumentParser, UserError, cli, gpt_config
from gfa.theory import theory_for
from model import GPT, GPTConfig, describe

PROFILES = ("gfa", "measured", "increasing", "narrow_middle", "uniform", "linear", "step")
PROPORTIONAL = ("gfa", "measured", "increasing", "narrow_middle")
OPENELM = {"attn": (0.5, 1.0), "ffn": (0.5, 4.0)}   # OpenELM's alpha (heads) and beta (FFN) ranges
PAPER_PARTS = {"step": "attn", "linear": "ffn"}      # the paper's A (attention, steps) and F (FFN, linear) tapers
PER_LAYER = ("repeats", "ds_alpha", "post_ln", "norm_scale")   # GPTConfig lists that belong to given layers


# ---- profiles: the per-layer shape of each width ----------------------------------------------------
def measured_shapes(run, n_layer):
    """{'attn': [N], 'ffn': [N]}: a run's accumulated gradient share over the steps its weights saw."""
    kind, _ = rundir.read_model_config(run)
    if kind != "gpt":
        raise UserError(f"--run {run} is a {kind} run: give a language-model run")
    ckpt = rundir.read_checkpoint(run) if rundir.has_checkpoint(run) else None
    dump = rundir.read_grad_dump(run, before_step=ckpt["iter_num"] if ckpt else None, ckpt=ckpt)
    if len(dump["share"]) != n_layer:
        raise UserError(f"--run {run} has {len(dump['share'])} layers, the base config {n_layer}: give a run of the "
                        f"base config (or set --n_layer)")
    sub = dump.get("sub_share")
    print(f"measured profile: {run}, steps {dump['step_range'][0]}-{dump['step_range'][1]}, "
          + ("attention and MLP sub-block shares" if sub else "layer share (the run records no sub-blocks)"))
    return {"attn": sub["attn"] if sub else dump["share"], "ffn": sub["mlp"] if sub else dump["share"]}


def shapes(profile, cfg, run):
    """{'attn': [N], 'ffn': [N]}: the relative widths of a proportional profile."""
    N = cfg.n_layer
    if profile == "gfa":
        phi = theory_for(asdict(cfg))[1]
        return {"attn": phi, "ffn": phi}
    if profile == "measured":
        return measured_shapes(run, N)
    depth = np.linspace(0, 1, N) if N > 1 else np.zeros(1)
    if profile == "increasing":
        return {part: lo + (hi - lo) * depth for part, (lo, hi) in OPENELM.items()}
    v = 0.5 + 0.5 * np.abs(2 * depth - 1)   # narrow_middle: 1 at both ends, 1/2 in the middle
    return {"attn": v, "ffn": v}


# ---- widths ---------------------------------------------------------------------------------------
def round_to(x, multiple):
    return max(multiple, int(round(x / multiple)) * multiple)


def schedule(cfg, attn_rel, ffn_rel, args):
    """(heads, d_ffn) per layer: the base widths times the relative widths, rounded."""
    h0, f0 = cfg.layer_heads()[0], cfg.layer_ffn()[0]
    return ([round_to(h0 * r, args.head_multiple) for r in attn_rel],
            [round_to(f0 * r, args.ffn_multiple) for r in ffn_rel])


def with_widths(cfg, heads, ffns):
    """The base config with explicit per-layer widths, its other settings kept."""
    d = asdict(cfg)
    if len(heads) != cfg.n_layer and any(d[k] for k in PER_LAYER):
        raise UserError(f"the base config gives per-layer {', '.join(k for k in PER_LAYER if d[k])} for its "
                        f"{cfg.n_layer} layers: a model of {len(heads)} layers cannot keep them; drop them from the base")
    # the taper rules' keys, off and consistent with the widths, so no scale file's values linger
    d.update(n_layer=len(heads), n_head=list(heads), d_ffn=list(ffns), F_d=0, S_f=0, S_d=0,
             d_attn0=heads[0] * cfg.head_dim, d_ffn0=ffns[0], passthrough=[])
    return GPTConfig(**d)


def uniform(cfg, n):
    """The base's layer-0 widths in n layers."""
    return with_widths(cfg, cfg.layer_heads()[:1] * n, cfg.layer_ffn()[:1] * n)


def coster(budget, seq_len):
    """cost(cfg): forward FLOPs per token at seq_len, or parameters (both embeddings), from model.py's own
    counts on a shapes-only model; remembered per width schedule (the bisection revisits them)."""
    seen = {}

    def cost(cfg):
        key = (tuple(cfg.layer_heads()), tuple(cfg.layer_ffn()))
        if key not in seen:
            with torch.device("meta"):
                model = GPT(cfg)
            seen[key] = model.flops_per_token(seq_len) if budget == "flops" else model.num_params()
        return seen[key]
    return cost


def largest_within(make, lo, hi, measure, target, what):
    """The largest t in [lo, hi] whose schedule make(t) costs at most target (cost rises with t), by
    bisection; its config. A one-line error when even make(lo) is over the budget."""
    if measure(make(lo)) > target:
        raise UserError(f"the budget is too small for the {what} profile: its narrowest schedule costs "
                        f"{measure(make(lo)):.4g} > {target:.4g}; give a larger budget (--target, --target_layers)")
    if measure(make(hi)) <= target:
        return make(hi)
    for _ in range(40):   # to 1e-12 of the range: far finer than one rounding step
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if measure(make(mid)) <= target else (lo, mid)
    return make(lo)


def fit(cfg, args, target, measure):
    """The config of the profile that spends the budget."""
    N, p = cfg.n_layer, args.profile
    parts = args.parts or PAPER_PARTS.get(p, "both")
    follow = lambda part, rel: rel if parts in ("both", part) else np.ones(N)
    if p == "uniform":   # the base widths, as many layers as fit
        fitting = [n for n in range(1, 4 * N + 1) if measure(uniform(cfg, n)) <= target]
        if not fitting:
            raise UserError(f"the budget {target:.4g} is too small for even one layer of the base widths")
        return uniform(cfg, max(fitting))
    if p in ("linear", "step"):   # anchored at the base width, narrowing by g per step; t = -g
        x = np.arange(N) if p == "linear" else np.arange(N) // args.step_every
        rel = lambda t: 1 + t * x
        make = lambda t: with_widths(cfg, *schedule(cfg, follow("attn", rel(t)), follow("ffn", rel(t)), args))
        return largest_within(make, -1 / max(1, x.max()), 0.0, measure, target, p)
    s = shapes(p, cfg, args.run)
    rel = {k: 1 - args.strength + args.strength * np.asarray(v, dtype=np.float64) / np.mean(v) for k, v in s.items()}
    make = lambda c: with_widths(cfg, *schedule(cfg, follow("attn", c * rel["attn"]), follow("ffn", c * rel["ffn"]),
                                                args))
    hi = 1.0
    while measure(make(hi)) <= target and hi < 1024:
        hi *= 2
    return largest_within(make, 0.0, hi, measure, target, p)


# ---- the config file --------------------------------------------------------------------------------
def config_text(cfg, header):
    """A config file setting the model's keys: its shape and widths always (so it means the same model
    after any scale file), every other GPTConfig field that is off its default."""
    defaults = GPTConfig.defaults()
    always = ("vocab_size", "block_size", "d_model", "n_layer", "head_dim", "n_head", "d_ffn", "d_attn0", "S_d", "F_d",
              "d_ffn0", "S_f")
    lines = ["# " + line for line in header] + [""]
    for f in fields(GPTConfig):
        v = getattr(cfg, f.name)
        if f.name in always or v != defaults[f.name]:
            lines.append(f"{f.name} = {v!r}")
    return "\n".join(lines) + "\n"


def scale_file(configs):
    """The base's scale file (the first config file that sets max_iters, the training budget), for the written
    file's training hint; config/small.py, the one-GPU scale, when the base has none (the paper's size)."""
    for c in configs:
        if c.endswith(".py") and os.path.isfile(c) and re.search(r"^max_iters\s*=", open(c).read(), re.M):
            return c
    return "config/small.py"


def main(argv):
    ap = ArgumentParser(description=__doc__.split("\n\n")[0].strip(), epilog="Profiles: " + ", ".join(PROFILES))
    ap.add_argument("configs", nargs="*", help="the base config files and --key=value model overrides")
    ap.add_argument("--profile", default="gfa", choices=PROFILES, help="the width profile")
    ap.add_argument("--run", help="measured: the run directory whose gradient share shapes the widths")
    ap.add_argument("--budget", default="flops", choices=("flops", "params"),
                    help="what to match: forward FLOPs per token at --seq_len (training cost at equal tokens), or "
                    "parameters")
    ap.add_argument("--seq_len", type=int, help="FLOPs at this sequence length (default the base's block_size)")
    ap.add_argument("--target_layers", type=int, help="the budget of the base with this many uniform layers "
                    "(15: Vanilla-15L's; default: the base's own)")
    ap.add_argument("--target", type=float, help="the budget outright (FLOPs per token, or parameters)")
    ap.add_argument("--parts", choices=("both", "attn", "ffn"), help="the widths that follow the profile; the others "
                    "keep the base's (default: attn for step and ffn for linear, as the paper's A and F tapers; both "
                    "for the rest)")
    ap.add_argument("--strength", type=float, default=1.0, help="proportional profiles: 1 = widths in proportion "
                    "to the profile, 0 = uniform, between = blended")
    ap.add_argument("--step_every", type=int, default=2, help="step: layers per step (F_d; CascadeFormer-A2's 2)")
    ap.add_argument("--head_multiple", type=int, default=1, help="heads per layer are a multiple of this")
    ap.add_argument("--ffn_multiple", type=int, default=64, help="FFN sizes are a multiple of this")
    ap.add_argument("--out", help="the config file to write (default out/taper_<profile>.py)")
    args, extra = ap.parse_known_args(argv)
    base = gpt_config(args.configs + extra)
    if (args.profile == "measured") != bool(args.run):
        raise UserError("--run goes with --profile measured (and it needs one): the run whose share shapes the widths")
    if args.target is not None and args.target_layers is not None:
        raise UserError("give --target or --target_layers, not both")
    for name in ("seq_len", "target_layers", "step_every", "head_multiple", "ffn_multiple"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)}: must be >= 1")
    if not 0 <= args.strength <= 1:
        raise UserError(f"--strength {args.strength}: must be in [0, 1]")
    if base.passthrough:
        raise UserError("the base config passes layers through: a taper is designed for the layers that run")
    if base.n_kv_head and args.head_multiple % base.n_kv_head:
        raise UserError(f"--head_multiple {args.head_multiple}: the base shares K/V heads among n_kv_head="
                        f"{base.n_kv_head} groups, so every layer's heads must be a multiple of it: give --head_multiple "
                        f"{base.n_kv_head} (or a multiple)")
    seq = args.seq_len or base.block_size
    measure = coster(args.budget, seq)
    if args.target is not None:
        if not args.target > 0:
            raise UserError(f"--target {args.target}: a budget must be > 0 (FLOPs per token, or parameters)")
        target, against = args.target, "given"
    else:
        k = args.target_layers or base.n_layer
        ref = uniform(base, k) if args.target_layers else base
        target, against = measure(ref), f"the base with {k} uniform layers" if args.target_layers else "the base's own"
    cfg = fit(base, args, target, measure)
    got = measure(cfg)
    unit = f"FLOPs/token forward at {seq} tokens" if args.budget == "flops" else "parameters"
    summary = (f"profile {args.profile}" + (f" ({args.run})" if args.run else "")
               + f", parts {args.parts or PAPER_PARTS.get(args.profile, 'both')}"
               + (f", strength {args.strength:g}" if args.profile in PROPORTIONAL else ""))
    budget = f"budget {target:,.0f} {unit} ({against}); this model {got:,.0f} ({100 * (got / target - 1):+.2f} %)"
    with torch.device("meta"):
        print(describe(GPT(cfg)))
    print(f"\n{summary}\n{budget}")
    out = args.out or os.path.join("out", f"taper_{args.profile}.py")
    command = "python " + " ".join(shlex.quote(a) for a in ["taper.py", *argv])
    header = [f"Made by taper.py: {summary}", budget, command,
              f"Every width is set here; a scale file before it sets the training budget: python train.py "
              f"{scale_file(args.configs)} {out}"]
    rundir.atomic_write_text(config_text(cfg, header), out)
    print(f"wrote {out}")
    return cfg


if __name__ == "__main__":
    cli(main)
