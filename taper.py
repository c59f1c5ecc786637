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
Vanilla-15L: the paper's comparison at equal cost), or --target outright.

Profiles (`python taper.py --help` lists them): GFA's fan-in, a run's measured share, OpenELM's
increasing widths, a narrow middle, fewer layers, the paper's linear and step tapers. Each is one
function in the registry PROFILES below (name -> function and a one-line description, which --help and
the error for an unknown name show): a new profile is one decorated function and nothing else.
A proportional profile (@proportional: gfa, measured, increasing, narrow_middle) gives a shape s per
width, which is divided by its mean and scaled by one factor c for the budget:
w(l) = c w0 (1 - strength + strength s(l)); strength 0 is uniform. Any other (@profile) fits the budget
itself. --parts picks the widths that follow the profile (the others keep the base's; by default the
attention for step and the FFN for linear, as in the paper, both for the rest). Widths are rounded to
multiples of --head_multiple heads and --ffn_multiple FFN units; the schedule is the one closest to the
budget from below (never over it).
"""
import os
import re
import shlex
from dataclasses import asdict, dataclass, fields
from typing import Callable

import numpy as np
import torch

from gfa import rundir
from gfa.cli import ArgumentParser, UserError, cli, gpt_config
from gfa.theory import theory_for
from model import GPT, GPTConfig, describe

OPENELM = {"attn": (0.5, 1.0), "ffn": (0.5, 4.0)}   # OpenELM's alpha (heads) and beta (FFN) ranges
PER_LAYER = ("repeats", "ds_alpha", "post_ln", "norm_scale")   # GPTConfig lists that belong to given layers


# ---- the profile registry ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    fit: Callable    # fit(cfg, args, target, measure) -> the GPTConfig that spends the budget target
    help: str        # one line: --help and the unknown-profile error show it
    parts: str       # the widths that follow it unless --parts says: "both", "attn" or "ffn"
    strength: bool   # whether --strength applies (the proportional profiles)
    run: bool        # whether it reads a run (--run)


PROFILES = {}   # name -> Profile, in --help's order


def profile(name, help, parts="both", run=False):
    """Registers fit(cfg, args, target, measure) -> GPTConfig as profile `name`."""
    def register(fit):
        PROFILES[name] = Profile(fit, help, parts, strength=False, run=run)
        return fit
    return register


def proportional(name, help, run=False):
    """Registers shape(cfg, args) -> {'attn': [N], 'ffn': [N]} (relative widths, any scale) as profile
    `name`: widths in proportion to the shape (blended with uniform by --strength), scaled to the budget."""
    def register(shape):
        fit = lambda cfg, args, target, measure: fit_shape(shape(cfg, args), cfg, args, target, measure)
        PROFILES[name] = Profile(fit, help, "both", strength=True, run=run)
        return shape
    return register


def profile_list():
    width = max(map(len, PROFILES))
    return "\n".join(f"  {name:<{width}}  {p.help}" for name, p in PROFILES.items())


# ---- the profiles ------------------------------------------------------------------------------------
@proportional("gfa", "widths in proportion to the base's theoretical fan-in: capacity where the gradient is")
def fan_in_shape(cfg, args):
    """gfa.theory's fan-in of the base: plain N - l + 1, quadratic under deep supervision, virtual depth's own."""
    phi = theory_for(asdict(cfg))[1]
    return {"attn": phi, "ffn": phi}


@proportional("measured", "widths in proportion to a run's (--run) measured gradient share", run=True)
def measured_shapes(cfg, args):
    """{'attn': [N], 'ffn': [N]}: a run's accumulated gradient share over the steps its weights saw, the
    attention from its attention sub-blocks' share and the FFN from its MLP's when its dump records them
    apart, else both from the layer share."""
    run, n_layer = args.run, cfg.n_layer
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


def depth(n_layer):
    """Each layer's relative depth, 0 (first) to 1 (last)."""
    return np.linspace(0, 1, n_layer) if n_layer > 1 else np.zeros(1)


@proportional("increasing", "OpenELM's layer-wise scaling: widths rising linearly with depth")
def openelm_shape(cfg, args):
    """OpenELM (Mehta et al. 2024): attention 0.5 -> 1 and FFN 0.5 -> 4 times the base in their ratios."""
    return {part: lo + (hi - lo) * depth(cfg.n_layer) for part, (lo, hi) in OPENELM.items()}


@proportional("narrow_middle", "a '><' shape: widths falling linearly to half at the middle layer, then rising")
def narrow_middle_shape(cfg, args):
    v = 0.5 + 0.5 * np.abs(2 * depth(cfg.n_layer) - 1)   # 1 at both ends, 1/2 in the middle
    return {"attn": v, "ffn": v}


@profile("uniform", "fewer layers: the base widths in as many layers as fit (Vanilla-15L at 15 layers' budget)")
def as_many_layers_as_fit(cfg, args, target, measure):
    fitting = [n for n in range(1, 4 * cfg.n_layer + 1) if measure(uniform(cfg, n)) <= target]
    if not fitting:
        raise UserError(f"the budget {target:.4g} is too small for even one layer of the base widths")
    return uniform(cfg, max(fitting))


@profile("linear", "the paper's linear taper w(l) = w0 (1 - g l), slope g solved (default: the FFN)", parts="ffn")
def linear_taper(cfg, args, target, measure):
    return anchored_taper(np.arange(cfg.n_layer), cfg, args, target, measure)


@profile("step", "the paper's step taper w(l) = w0 (1 - g floor(l / step_every)) (default: the attention)",
         parts="attn")
def step_taper(cfg, args, target, measure):
    return anchored_taper(np.arange(cfg.n_layer) // args.step_every, cfg, args, target, measure)


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


def tapered(cfg, args, attn_rel, ffn_rel):
    """The base config with the relative widths of the parts that follow the profile (--parts, else the
    profile's own), the other part at the base's."""
    parts = args.parts or PROFILES[args.profile].parts
    follow = lambda part, rel: rel if parts in ("both", part) else np.ones(cfg.n_layer)
    return with_widths(cfg, *schedule(cfg, follow("attn", attn_rel), follow("ffn", ffn_rel), args))


def fit_shape(shape, cfg, args, target, measure):
    """A proportional profile's config: its shape (divided by its mean, blended by --strength) times the
    largest factor c within the budget."""
    rel = {k: 1 - args.strength + args.strength * np.asarray(v, dtype=np.float64) / np.mean(v)
           for k, v in shape.items()}
    make = lambda c: tapered(cfg, args, c * rel["attn"], c * rel["ffn"])
    hi = 1.0
    while measure(make(hi)) <= target and hi < 1024:
        hi *= 2
    return largest_within(make, 0.0, hi, measure, target, args.profile)


def anchored_taper(x, cfg, args, target, measure):
    """Widths 1 + t x times the base's (layer 0's x is 0: at the base width), the slope t = -g in
    [-1 / max x, 0] the least negative within the budget."""
    make = lambda t: tapered(cfg, args, 1 + t * x, 1 + t * x)
    return largest_within(make, -1 / max(1, x.max()), 0.0, measure, target, args.profile)


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
    ap = ArgumentParser(description=__doc__.split("\n\n")[0].strip(), epilog="profiles:\n" + profile_list())
    ap.add_argument("configs", nargs="*", help="the base config files and --key=value model overrides")
    ap.add_argument("--profile", default="gfa", help="the width profile: one of those listed below")
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
    if args.profile not in PROFILES:
        raise UserError(f"--profile {args.profile}: no such profile; give one of: "
                        + "; ".join(f"{name} - {p.help}" for name, p in PROFILES.items()))
    if PROFILES[args.profile].run != bool(args.run):
        readers = " / ".join(f"--profile {name}" for name, p in PROFILES.items() if p.run)
        raise UserError(f"--run goes with {readers} (and it needs one): the run whose share shapes the widths")
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
    cfg = PROFILES[args.profile].fit(base, args, target, measure)
    got = measure(cfg)
    unit = f"FLOPs/token forward at {seq} tokens" if args.budget == "flops" else "parameters"
    summary = (f"profile {args.profile}" + (f" ({args.run})" if args.run else "")
               + f", parts {args.parts or PROFILES[args.profile].parts}"
               + (f", strength {args.strength:g}" if PROFILES[args.profile].strength else ""))
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
