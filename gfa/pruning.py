"""
The layer scores of the pruning methods and the choices they make: CascadeFlow Pruning's accumulated
gradient share (from a run's dump), the paper's baselines (Magnitude, Taylor, Similarity) and
Block Influence (ShortGPT) and SLEB. Each takes a model (and calibration batches) and returns one
score per block as a numpy array, computed on the model's device with one host copy at the end (SLEB:
one per round); prune.py ranks, prunes and evaluates with them (its docstring defines each method).

    from gfa.pruning import block_influence, lowest
    drop = lowest(block_influence(model, batches, "cuda", torch.autocast("cuda", torch.bfloat16)), k=4)
"""
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from gfa import rundir
from gfa.cli import UserError
from gfa.evaluation import mean_loss


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


@contextmanager
def layer_inputs(model):
    """x -> [B, T, N+1, C]: the input of every block (its first application if repeated) and, last,
    the input of the final norm (the last block's output), from one forward in eval mode. The hooks
    come off and the mode is restored on exit."""
    N = model.config.n_layer
    hidden = {}   # i -> input of block i (i = N: of the final norm), one forward's worth

    def grab(i):
        def hook(module, args):
            hidden.setdefault(i, args[0].detach())   # first application only (virtual depth)
        return hook

    def run(x):
        hidden.clear()
        model(x)
        return torch.stack([hidden[i] for i in range(N + 1)], dim=2)
    hooks = [b.register_forward_pre_hook(grab(i)) for i, b in enumerate(model.blocks)]
    hooks.append(model.norm_f.register_forward_pre_hook(grab(N)))
    was_training = model.training
    model.eval()
    try:
        yield run
    finally:
        for hk in hooks:
            hk.remove()
        model.train(was_training)


@torch.no_grad()
def angular_distances(model, batches, device, ctx, tokens="last"):
    """D[l, m] (l < m, m <= N): mean of arccos(cos(h_l, h_m)) / pi over the last token of every
    sequence (tokens='last', Gromov et al.) or over all tokens ('all'), where h_l is the input of
    block l (its first application if repeated) and h_N the input of the final norm."""
    N = model.config.n_layer
    D, count = torch.zeros(N + 1, N + 1, device=device, dtype=torch.float64), 0
    with layer_inputs(model) as run:
        for x, _ in batches:
            with ctx:
                h = run(x.to(device))   # [B, T, N+1, C]
            # [tokens, N+1, C], unit rows; float64 so the cosines near 1 (where arccos is steep)
            # keep their digits and no TF32 matmul touches them
            h = (h[:, -1] if tokens == "last" else h.flatten(0, 1)).double()
            h.div_(h.norm(dim=-1, keepdim=True).clamp_min(1e-12))   # in place: h is the big tensor here
            cos = torch.bmm(h, h.transpose(1, 2)).clamp(-1.0, 1.0)   # all pairs (l, m) of every token at once
            D += torch.arccos(cos).sum(0) / math.pi
            count += h.size(0)
    return (D.triu(1) / count).cpu().numpy()   # l < m only, as before; the diagonal is 0


@torch.no_grad()
def block_influence(model, batches, device, ctx):
    """ShortGPT's Block Influence (Men et al. 2024): BI_l = 1 - cos(input of block l, its output),
    averaged over every token of the calibration batches (the output is the next block's input,
    after all repeats). Accumulated in float64 on the device, one host copy at the end."""
    N = model.config.n_layer
    total, count = torch.zeros(N, device=device, dtype=torch.float64), 0
    with layer_inputs(model) as run:
        for x, _ in batches:
            with ctx:
                h = run(x.to(device)).flatten(0, 1).double()   # [tokens, N+1, C]
            total += (1 - F.cosine_similarity(h[:, :-1], h[:, 1:], dim=-1)).sum(0)
            count += h.size(0)
    return (total / count).cpu().numpy()


def sleb_order(model, batches, device, ctx, k):
    """SLEB (Song et al. 2024): remove one block at a time, each round the block whose removal (on top
    of the ones already removed) gives the lowest calibration perplexity. Returns (the k blocks in
    removal order, the calibration loss after each removal, the loss with each block removed alone:
    the first round). A round queues every candidate's loss on the device and reads them at once."""
    N = model.config.n_layer
    removed, after, first = [], [], None
    try:
        for _ in range(k):
            cand = [l for l in range(N) if l not in removed]
            losses = []
            for l in cand:
                model.set_passthrough(removed + [l])
                losses.append(mean_loss(model, batches, device, ctx))
            losses = torch.stack(losses).cpu().numpy()   # the one host sync of the round
            first = losses if first is None else first
            best = int(np.argmin(losses))
            removed.append(cand[best])
            after.append(float(losses[best]))
    finally:
        model.set_passthrough([])
    return removed, after, first


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


# ---- the registry: every method prune.py knows, one record each ---------------------------------------
# A method is one function rank(model, ks, inp) -> Ranking, registered with @method(...): prune.py reads
# its name, label, needs and description from here, so a new method is a function (and its test).
@dataclass
class PruneInput:
    """What a method may read besides the model: calibration batches (on the device, or None when no
    chosen method needs them), the device and autocast context, the run and its checkpoint (CFP's
    dump), and prune.py's options (args: magnitude, similarity_tokens, cfp_steps, ...)."""
    calib: list
    device: str
    amp: object
    run: str = ""
    ckpt: dict = field(default_factory=dict)
    options: object = None


@dataclass
class Ranking:
    """A method's answer: per-layer scores (higher = more important; printed as a ranking and compared
    across seeds), the layers it removes for each k, what the scores are (one line), lines to print
    after the ranking, and for methods that also change weights, {k: {parameter name: new tensor}}."""
    scores: np.ndarray
    choice: dict
    what: str
    notes: list = field(default_factory=list)
    edits: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    name: str
    label: str                    # the table's column
    rank: callable
    description: str              # prune.py --help
    calibration: bool = False     # reads calibration batches of training data
    gradients: bool = False       # runs backward passes
    training_dump: bool = False   # needs the run's gradient dump (its training history)
    default: bool = False         # among prune.py's default --methods (the paper's four)


METHODS = {}   # name -> Method, in the table's column order


def method(name, label, description, **needs):
    def register(rank):
        if name in METHODS:
            raise ValueError(f"pruning method {name!r} registered twice")
        METHODS[name] = Method(name, label, rank, " ".join(description.split()), **needs)
        return rank
    return register


def by_lowest(scores, ks, what, notes=()):
    """The Ranking of a method that removes the k lowest-scored layers."""
    return Ranking(np.asarray(scores, dtype=np.float64), {k: lowest(scores, k) for k in ks}, what, list(notes))


@method("cfp", "CFP (ours)", """the k layers with the lowest accumulated training-gradient share (Eq. 2, from
        <run>/grad_norms.npz, over the steps the checkpoint's weights have seen; --cfp_steps N: over the first N
        only, any-time CFP), at any positions.""", training_dump=True, default=True)
def _cfp(model, ks, inp):
    share = cfp_share(inp.run, model.config.n_layer, inp.ckpt, inp.options.cfp_steps)
    return by_lowest(share, ks, "accumulated gradient share")


@method("similarity", "Similarity", """Gromov et al.: angular distance arccos(cos(h_l, h_{l+k})) / pi between the
        input of layer l and the input of layer l+k (h_N = the last block's output), of the LAST token of each
        calibration sequence (--similarity_tokens=all: every position). The contiguous block [l, l+k) with the
        smallest distance goes; its per-layer ranking (cross-seed stability) is the k=1 distance.""",
        calibration=True, default=True)
def _similarity(model, ks, inp):
    tokens = inp.options.similarity_tokens
    D = angular_distances(model, inp.calib, inp.device, inp.amp, tokens)
    scores = np.array([D[l, l + 1] for l in range(model.config.n_layer)])
    choice, notes = {}, []
    for k in ks:
        l, cand = similarity_block(D, k)
        choice[k] = list(range(l, l + k))
        notes.append(f"  similarity k={k}: blocks [l, l+{k}) by distance: "
                     + "  ".join(f"{i}:{cand[i]:.4f}" for i in np.argsort(cand, kind="stable")))
    return Ranking(scores, choice, f"angular distance d(h_l, h_l+1), {tokens} token(s)", notes)


@method("taylor", "Taylor", """on the calibration batches of TRAINING data: block score = sum over batches and
        over the block's weights of |W * dL/dW| (one backward per batch, L = the final LM loss). k lowest go.""",
        calibration=True, gradients=True, default=True)
def _taylor(model, ks, inp):
    return by_lowest(taylor_scores(model, inp.calib, inp.device, inp.amp), ks,
                     f"sum |W*dL/dW| over {len(inp.calib)} calibration batches")


@method("magnitude", "Magnitude", """A.4: per-output scores of each matrix, aggregated within the block:
        --magnitude=row_l2 (default) = sum over the block's matrices of ||W[o, :]||_2 over outputs o, plus sum |g|
        of its norm gains; --magnitude=sum = sum |W|. Summed, so a narrower (tapered) layer counts as the smaller
        mass it is. k lowest go.""", default=True)
def _magnitude(model, ks, inp):
    reading = inp.options.magnitude
    return by_lowest(magnitude_scores(model, reading), ks,
                     "sum of |W|" if reading == "sum" else "sum of per-output-row L2 norms")


@method("block_influence", "Block Influence", """ShortGPT (Men et al. 2024): BI = 1 - cos(input, output) of each
        block, averaged over every token of the calibration batches; the k lowest go.""", calibration=True)
def _block_influence(model, ks, inp):
    return by_lowest(block_influence(model, inp.calib, inp.device, inp.amp), ks,
                     f"1 - cos(block input, output), every token of {len(inp.calib)} calibration batches")


@method("sleb", "SLEB", """SLEB (Song et al. 2024): remove one block at a time, each round the one whose removal
        gives the lowest calibration perplexity; k = the first k removed. Its per-layer ranking is the first
        round's (each block removed alone).""", calibration=True)
def _sleb(model, ks, inp):
    order, after, first = sleb_order(model, inp.calib, inp.device, inp.amp, max(ks))
    note = "  sleb removal order: " + " -> ".join(f"L{l} (ppl {math.exp(a):.4g})" for l, a in zip(order, after))
    return Ranking(first, {k: sorted(order[:k]) for k in ks},
                   f"calibration loss with the block removed alone, {len(inp.calib)} batches", [note])
