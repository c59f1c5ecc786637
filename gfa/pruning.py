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
    params = [list(b.parameters()) for b in model.blocks]
    flat = [p for ps in params for p in ps]
    acc = torch.zeros(len(params), device=device, dtype=torch.float64)
    with gradients_of(model):
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with ctx:
                _, loss = model(x, y)
            grads = iter(torch.autograd.grad(loss, flat))
            for b, ps in enumerate(params):
                acc[b] += _abs_sum(p.detach() * next(grads) for p in ps)
    return acc.cpu().numpy()


@contextmanager
def gradients_of(model, every_weight=False):
    """Eval mode (no deep-supervision aux losses: L is the final LM loss) with gradients for the blocks'
    weights only (every_weight: for all of them); the flags and the mode come back on exit, also after an
    error mid-way."""
    was_training, flags = model.training, {p: p.requires_grad for p in model.parameters()}
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(every_weight)
        for p in model.blocks.parameters():
            p.requires_grad_(True)
        yield
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
        model.train(was_training)


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
def angular_distances(model, batches, device, ctx, tokens="last", reading="angular"):
    """D[l, m] (l < m, m <= N): mean of arccos(cos(h_l, h_m)) / pi over the last token of every
    sequence (tokens='last', Gromov et al.) or over all tokens ('all'), where h_l is the input of
    block l (its first application if repeated) and h_N the input of the final norm; reading='cosine':
    the mean of 1 - cos(h_l, h_m) instead (ReplaceMe's cosine distance)."""
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
            D += (torch.arccos(cos) / math.pi if reading == "angular" else 1 - cos).sum(0)
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


# ---- 2025-2026 baselines: reverse order, ReplaceMe, early-gradient importance ----------------------------
@method("reverse", "Reverse order", """"Reassessing Layer Pruning in LLMs" (ICLR 2026): the last k layers go
        (layers 0..N-k-1 kept), no scores; pair it with --heal_mode=partial (the LM head and the last
        --heal_last_layers remaining layers trained), the paper's recipe.""")
def _reverse(model, ks, inp):
    N = model.config.n_layer
    return by_lowest(np.arange(N, 0, -1.0), ks, "N - l (earlier = kept)")


def gradient_share(model, batches, device, ctx, lr=0.0, steps=0):
    """Eq. 2 on calibration data: per block, the sum over batches of the L2 norm of dL/d(block's weights),
    normalised over the blocks (L = the final LM loss, eval mode). lr = 0: every gradient at the model's
    own weights (CFP's gradient-share score on a calibration set instead of a training history). lr > 0:
    early fine-tuning (GradPruner-like): `steps` AdamW steps (default one per batch, cycling through
    them) on every weight, each gradient taken before its step; the weights (kept on the host) and
    requires_grad flags are restored afterwards. Accumulated on the device, one host copy at the end."""
    steps = steps or len(batches)
    saved = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()} if lr > 0 else None
    params = [list(b.parameters()) for b in model.blocks]
    acc = torch.zeros(len(params), device=device, dtype=torch.float64)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0) if lr > 0 else None
    try:
        with gradients_of(model, every_weight=lr > 0):   # lr = 0: gradients of the blocks only
            for step in range(steps):
                x, y = batches[step % len(batches)]
                with ctx:
                    _, loss = model(x.to(device), y.to(device))
                model.zero_grad(set_to_none=True)
                loss.backward()
                for b, ps in enumerate(params):
                    acc[b] += torch.sqrt(sum(p.grad.double().pow(2).sum() for p in ps if p.grad is not None))
                if opt is not None:
                    opt.step()
    finally:   # the model comes back as it was: weights and no gradients (flags and mode: gradients_of)
        model.zero_grad(set_to_none=True)
        if saved is not None:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(saved[n])
    share = acc.cpu().numpy()
    return share / share.sum() if share.sum() > 0 else share


def early_lr(inp):
    """The early fine-tuning's learning rate: --early_lr, else the run's training rate / 10 (healing's)."""
    return inp.options.early_lr or (inp.ckpt.get("train_config") or {}).get("learning_rate", 2e-4) / 10


@method("cfp_calib", "CFP (calibration)", """CFP's gradient share computed on calibration data instead of a
        training history: per layer, the sum over the calibration batches of ||dL/dW_layer||_2 at the checkpoint's
        weights, normalised (Eq. 2's form); the k lowest go. For a model whose training was not recorded
        (an imported open-weight checkpoint).""", calibration=True, gradients=True)
def _cfp_calib(model, ks, inp):
    share = gradient_share(model, inp.calib, inp.device, inp.amp)
    T = sum(y.numel() for _, y in inp.calib)
    return by_lowest(share, ks, f"gradient share over {len(inp.calib)} calibration batches ({T:,} tokens)")


@method("early_grad", "Early gradient", """GradPruner-like early-gradient importance (ICLR 2026): the gradient
        share (Eq. 2) accumulated over the first steps of fine-tuning on the calibration data (AdamW,
        --early_lr, --early_steps steps, each gradient before its step; the weights are restored after): the
        k lowest go. Any-time CFP (--cfp_steps) reads the same share from the first steps of the model's own
        training.""", calibration=True, gradients=True)
def _early_grad(model, ks, inp):
    lr, steps = early_lr(inp), inp.options.early_steps or len(inp.calib)
    share = gradient_share(model, inp.calib, inp.device, inp.amp, lr=lr, steps=steps)
    return by_lowest(share, ks, f"gradient share over {steps} fine-tuning steps at lr {lr:.3g}")


def least_squares_map(chunks, bias=False, ridge=0.0):
    """T (and b) minimising ||A T (+ b) - B||_F over the rows of the (A, B) chunks ([n, d] and [n, d'] each,
    e.g. one per calibration batch), from the normal equations accumulated in float64 (the activations are
    never all in memory). Returns (T [d, d'], b [d'] or None); ridge adds ridge x the mean diagonal to A^T A."""
    AtA = AtB = None
    for a, b in chunks:
        a, b = a.reshape(-1, a.shape[-1]).double(), b.reshape(-1, b.shape[-1]).double()
        if bias:
            a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype, device=a.device)], dim=1)
        AtA, AtB = (a.T @ a, a.T @ b) if AtA is None else (AtA + a.T @ a, AtB + a.T @ b)
    if ridge:
        AtA = AtA + ridge * AtA.diagonal().mean() * torch.eye(len(AtA), dtype=AtA.dtype, device=AtA.device)
    X = torch.linalg.lstsq(AtA.cpu(), AtB.cpu()).solution   # lstsq: a rank-deficient A^T A still solves
    return (X[:-1], X[-1]) if bias else (X, None)


@torch.no_grad()
def replaceme_activations(model, batches, device, ctx, start, k):
    """Per calibration batch, ReplaceMe's regression of the run [start, start+k): (M, R) where M is the
    MLP contribution of block start-1 to the residual stream (residual_scale x its output) and R = (output
    of block start+k-1) - (the rest of block start-1's output), both [tokens, d_model]."""
    block, grab = model.blocks[start - 1], {}
    s = model.config.residual_scale
    hook = block.ffn.register_forward_hook(lambda mod, args, out: grab.__setitem__("mlp", out.detach()))
    try:
        with layer_inputs(model) as run:
            for x, _ in batches:
                with ctx:
                    h = run(x.to(device))   # [B, T, N+1, C]
                M = (grab["mlp"] * s).flatten(0, 1).double()
                yield M, (h[:, :, start + k] - h[:, :, start]).flatten(0, 1).double() + M
    finally:
        hook.remove()


def replaceme_starts(model, k):
    """Where a run of k layers may start for ReplaceMe: after a Pre-LN block applied once (the map folds
    into its MLP's down projection)."""
    cfg = model.config
    return [l for l in range(1, cfg.n_layer - k + 1)
            if not cfg.layer_post_ln()[l - 1] and cfg.layer_repeats()[l - 1] == 1]


@method("replaceme", "ReplaceMe", """ReplaceMe (Shopkhoev et al. 2025), training-free: the contiguous run
        [l, l+k) whose input and output are closest in cosine distance (mean 1 - cos over every calibration token;
        l >= 1) is removed and replaced by one d_model x d_model linear map T, fitted by least squares on the
        calibration activations: (output of the last removed block) ~ Y + M T, where M is the MLP output of block
        l-1 and Y the rest of its output (their sum is the run's input). T folds exactly into block l-1's MLP
        down projection (W_down <- T^T W_down), so the pruned model keeps the Llama architecture (hf.py export,
        bench.py). Its per-layer ranking is the k=1 cosine distance.""", calibration=True)
def _replaceme(model, ks, inp):
    D = angular_distances(model, inp.calib, inp.device, inp.amp, tokens="all", reading="cosine")
    N = model.config.n_layer
    choice, edits, notes = {}, {}, []
    for k in ks:
        starts = replaceme_starts(model, k)
        if not starts:
            raise UserError(f"replaceme k={k}: no run of {k} layers follows a Pre-LN block applied once; leave "
                            f"replaceme out of --methods")
        l = min(starts, key=lambda i: D[i, i + k])
        T, _ = least_squares_map(replaceme_activations(model, inp.calib, inp.device, inp.amp, l, k))
        down = model.blocks[l - 1].ffn.down.weight
        choice[k] = list(range(l, l + k))
        edits[k] = {f"blocks.{l - 1}.ffn.down.weight": (T.T.to(down.device) @ down.detach().double()).to(down.dtype)}
        notes.append(f"  replaceme k={k}: run [l, l+{k}) by cosine distance: "
                     + "  ".join(f"{i}:{D[i, i + k]:.4f}" for i in sorted(starts, key=lambda i: D[i, i + k]))
                     + f"; T folded into layer {l - 1}'s down projection")
    return Ranking(np.array([D[l, l + 1] for l in range(N)]), choice, "cosine distance 1 - cos(h_l, h_l+1), "
                   "every token", notes, edits)


@contextmanager
def edited(model, edits):
    """The model with some parameters replaced ({name: tensor}, a Ranking's edits for one k), restored on exit."""
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in edits}
    try:
        with torch.no_grad():
            for n, t in edits.items():
                params[n].copy_(t)
        yield model
    finally:
        with torch.no_grad():
            for n, t in saved.items():
                params[n].copy_(t)
