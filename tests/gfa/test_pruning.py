"""gfa/pruning.py: each method's layer scores on a planted answer (an identity layer, a starved layer)
and against a hand computation (numpy row norms, |W * grad| by autograd, angular distance and Block
Influence from hooks, SLEB against a brute-force greedy search, the share over a prefix of training)."""
import math
import os
import warnings
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gfa import pruning, rundir
from gfa.cli import UserError
from gfa.data import get_batch, load_tokens
from gfa.theory import accumulated_share
from helpers import tiny_model, write_run, zero_branch

N = 4


def batches(data_dir, n=2, B=4, T=32, seed=0):
    train = load_tokens(str(data_dir / "train.bin"), 256)
    return [get_batch(train, B, T, s, seed) for s in range(n)]


# ---- planted answers -----------------------------------------------------------------------------
def test_magnitude_picks_zeroed_branch():
    m = tiny_model()
    zero_branch(m, 2)
    for reading in pruning.MAGNITUDE_READINGS:
        assert pruning.lowest(pruning.magnitude_scores(m, reading), 1) == [2]
    # 'sum': sum of |W| over the block; 'row_l2' (the default): numpy's row norms of each matrix, summed
    s = pruning.magnitude_scores(m, "sum")
    assert s[1] == pytest.approx(sum(p.abs().sum().item() for p in m.blocks[1].parameters()), rel=1e-6)
    weights = [p.detach().numpy() for p in m.blocks[1].parameters()]
    by_hand = sum(np.linalg.norm(w, axis=1).sum() if w.ndim == 2 else np.abs(w).sum() for w in weights)
    assert pruning.magnitude_scores(m)[1] == pytest.approx(by_hand, rel=1e-6)


def test_magnitude_readings_rank_differently_where_the_reduction_matters():
    # layer 0's weights are spread thinly over each row, layer 1's concentrated in one entry per row:
    # sum |W| ranks layer 1 lower, the per-output L2 norms rank layer 0 lower
    m = tiny_model()
    with torch.no_grad():
        for i, p in enumerate(m.blocks[0].parameters()):
            if p.dim() == 2:
                p.fill_(0.1)
        for p in m.blocks[1].parameters():
            if p.dim() == 2:
                p.zero_()
                p[:, 0] = 0.1 * p.size(1) ** 0.75   # L1 of a row: 0.1 * n^0.75 < 0.1 * n; L2: more than 0.1 * sqrt(n)
    by_sum, by_row = pruning.magnitude_scores(m, "sum"), pruning.magnitude_scores(m, "row_l2")
    assert by_sum[1] < by_sum[0] and by_row[0] < by_row[1]


def test_similarity_picks_zeroed_branch(byte_data):
    m = tiny_model()
    zero_branch(m, 1)
    D = pruning.angular_distances(m, batches(byte_data), "cpu", torch.autocast("cpu", enabled=False))
    l, cand = pruning.similarity_block(D, 1)
    assert l == 1 and cand[1] < 1e-3 < cand.min(initial=1, where=np.arange(len(cand)) != 1)
    # k=2: the blocks [0,2) and [1,3) contain the identity layer; the one chosen must be one of them
    l2, _ = pruning.similarity_block(D, 2)
    assert l2 in (0, 1)
    # distance by hand for one pair on one batch: the last token (default) or all tokens, arccos(cos)/pi
    x, _ = batches(byte_data, n=1)[0]
    h = {}
    hooks = [m.blocks[0].register_forward_pre_hook(lambda mod, a: h.update({0: a[0]}) if 0 not in h else None),
             m.norm_f.register_forward_pre_hook(lambda mod, a: h.update({N: a[0]}))]
    with torch.no_grad():
        m(x)
    for hk in hooks:
        hk.remove()
    angle = torch.arccos(F.cosine_similarity(h[0], h[N], dim=-1).clamp(-1, 1)) / math.pi   # [B, T]
    no_autocast = torch.autocast("cpu", enabled=False)
    assert pruning.angular_distances(m, [(x, None)], "cpu", no_autocast)[0, N] == pytest.approx(
        angle[:, -1].mean().item(), rel=1e-4)
    assert pruning.angular_distances(m, [(x, None)], "cpu", no_autocast, "all")[0, N] == pytest.approx(
        angle.mean().item(), rel=1e-4)
    assert abs(angle[:, -1].mean() - angle.mean()) > 1e-3   # the two readings differ here


def test_cfp_picks_smallest_share_over_the_checkpoints_steps(tmp_path, byte_data):
    m = tiny_model()
    names = list(m.param_groups_by_layer())
    rows = 1.0 + np.random.default_rng(0).random((8, len(names)))
    rows[:4, names.index("layer.3")] = 0.1    # the checkpoint (iter_num 4) saw layer 3 starve ...
    rows[4:, names.index("layer.3")] = 50.0   # ... the dump, flushed later, ran on
    run = write_run(tmp_path / "run", m, byte_data, rows=rows, iter_num=4)
    share = pruning.cfp_share(run, N, rundir.read_checkpoint(run))
    assert pruning.lowest(share, 1) == [3] and share.sum() == pytest.approx(1.0)
    os.remove(os.path.join(run, "grad_norms.npz"))   # falls back to the dump inside the checkpoint
    assert np.allclose(pruning.cfp_share(run, N, rundir.read_checkpoint(run)), share)


def test_block_influence_picks_zeroed_branch_and_matches_hand(byte_data):
    m = tiny_model()
    zero_branch(m, 2)
    calib = batches(byte_data)
    bi = pruning.block_influence(m, calib, "cpu", nullcontext())
    assert pruning.lowest(bi, 1) == [2] and bi[2] < 1e-6 < np.delete(bi, 2).min()
    # by hand: block 1's own input and output (a forward hook), 1 - cos averaged over every token
    io = []
    hook = m.blocks[1].register_forward_hook(lambda mod, a, out: io.append((a[0], out)))
    with torch.no_grad():
        for x, _ in calib:
            m(x)
    hook.remove()
    cos = torch.cat([F.cosine_similarity(i.double(), o.double(), dim=-1).flatten() for i, o in io])
    assert bi[1] == pytest.approx(1 - cos.mean().item(), rel=1e-6)


def calibration_loss(m, removed, calib):
    """Mean CE over the calibration batches with `removed` passed through, one batch at a time."""
    m.set_passthrough(removed)
    with torch.no_grad():
        losses = [F.cross_entropy(m(x)[0].flatten(0, 1).double(), y.flatten(), reduction="sum") for x, y in calib]
    m.set_passthrough([])
    return (sum(losses) / sum(y.numel() for _, y in calib)).item()


def trained_with_identity_layers(data_dir, layers, steps=12):
    """A tiny model trained a little with `layers` held at identity (zero branches, frozen): removing one of
    them changes nothing, removing any other layer of the trained model hurts."""
    m = tiny_model().train()
    for l in layers:
        zero_branch(m, l)
        m.blocks[l].requires_grad_(False)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for x, y in batches(data_dir, n=steps, B=8):
        m(x, y)[1].backward()
        opt.step()
        opt.zero_grad()
    return m.eval().requires_grad_(True)


def test_sleb_removes_planted_layers_in_greedy_order(byte_data):
    m = trained_with_identity_layers(byte_data, [1, 3])
    calib = batches(byte_data)
    order, after, first = pruning.sleb_order(m, calib, "cpu", nullcontext(), 3)
    assert sorted(order[:2]) == [1, 3] and not m.passthrough   # the identity layers go first; model restored
    removed = []   # brute force: every round, every remaining layer's calibration loss, the lowest removed
    for r in range(3):
        losses = {l: calibration_loss(m, removed + [l], calib) for l in range(N) if l not in removed}
        best = min(losses, key=losses.get)
        assert order[r] == best and after[r] == pytest.approx(losses[best], rel=1e-6)
        if r == 0:
            assert np.allclose(first, [losses[l] for l in range(N)], rtol=1e-6)
        removed.append(best)


def test_anytime_cfp_ranks_on_a_prefix_of_training(tmp_path, byte_data):
    """--cfp_steps 2: layer 1 starved over the first two steps only, so the share over them removes it,
    while the share over every step the checkpoint saw removes layer 3."""
    m = tiny_model()
    names = list(m.param_groups_by_layer())
    rows = 1.0 + np.random.default_rng(0).random((4, len(names)))
    rows[:, names.index("layer.3")] = 0.1
    rows[:2, names.index("layer.1")] = 0.01
    run = write_run(tmp_path / "run", m, byte_data, rows=rows, iter_num=4)
    ckpt = rundir.read_checkpoint(run)
    early = pruning.cfp_share(run, N, ckpt, steps=2)
    np.testing.assert_allclose(early, accumulated_share(rows[:2], names), rtol=1e-6)
    assert pruning.lowest(early, 1) == [1] and pruning.lowest(pruning.cfp_share(run, N, ckpt), 1) == [3]
    with pytest.raises(UserError, match="--cfp_steps 5: the checkpoint of .* has seen 4 steps"):
        pruning.cfp_share(run, N, ckpt, steps=5)


def test_taylor_matches_hand_computation(byte_data):
    m = tiny_model()
    (x, y), = batches(byte_data, n=1)
    got = pruning.taylor_scores(m, [(x, y)], "cpu", torch.autocast("cpu", enabled=False))
    logits, _ = m(x)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
    for i, b in enumerate(m.blocks):
        ps = list(b.parameters())
        gs = torch.autograd.grad(loss, ps, retain_graph=True)
        want = sum((p * g).abs().sum().item() for p, g in zip(ps, gs))
        assert got[i] == pytest.approx(want, rel=1e-5)
    # two batches: the elementwise |W*g| are summed over batches
    two = batches(byte_data, n=2)
    got2 = pruning.taylor_scores(m, two, "cpu", torch.autocast("cpu", enabled=False))
    parts = sum(pruning.taylor_scores(m, [b], "cpu", torch.autocast("cpu", enabled=False)) for b in two)
    assert np.allclose(got2, parts, rtol=1e-5)
    assert all(p.requires_grad for p in m.parameters())   # flags restored


def test_taylor_restores_the_model_after_an_error(byte_data):
    m = tiny_model().train()
    m.tok_emb.weight.requires_grad_(False)
    (x, y), = batches(byte_data, n=1)
    with pytest.raises(IndexError):   # token ids past the vocabulary: the forward fails mid-way
        pruning.taylor_scores(m, [(x, y), (x + 1000, y)], "cpu", torch.autocast("cpu", enabled=False))
    assert m.training and not m.tok_emb.weight.requires_grad
    assert all(p.requires_grad for n, p in m.named_parameters() if n != "tok_emb.weight")


@pytest.mark.gpu
def test_calibrated_methods_do_not_wait_on_the_host_per_layer(byte_data):
    """Block Influence syncs once (its result), SLEB once per round, whatever the number of layers."""
    m = tiny_model(n_layer=6).cuda()
    calib = [(x.cuda(), y.cuda()) for x, y in batches(byte_data)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pruning.block_influence(m, calib, "cuda", nullcontext())
            n_bi = len(caught)
            pruning.sleb_order(m, calib, "cuda", nullcontext(), 2)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = lambda ws: sum("synchroniz" in str(w.message) for w in ws)
    assert syncs(caught[:n_bi]) <= 1 and syncs(caught[n_bi:]) <= 2   # 6 layers: not one per layer


# ---- the 2025-2026 baselines ------------------------------------------------------------------------
def opts(**kw):
    from types import SimpleNamespace
    return SimpleNamespace(**({"early_lr": 0.0, "early_steps": 0} | kw))


def test_reverse_order_drops_the_last_layers():
    r = pruning.METHODS["reverse"].rank(tiny_model(), [1, 3], pruning.PruneInput(None, "cpu", nullcontext()))
    assert r.choice == {1: [3], 3: [1, 2, 3]}


@pytest.mark.parametrize("bias", [False, True])
def test_least_squares_map_equals_numpy_lstsq_on_planted_activations(bias):
    rng = np.random.default_rng(0)
    A = rng.standard_normal((300, 6))
    T, b = rng.standard_normal((6, 5)), rng.standard_normal(5)
    B = A @ T + (b if bias else 0) + 0.1 * rng.standard_normal((300, 5))   # planted map, plus noise
    chunks = [(torch.tensor(A[i:i + 100]), torch.tensor(B[i:i + 100])) for i in range(0, 300, 100)]
    ours, ours_b = pruning.least_squares_map(chunks, bias=bias)
    design = np.hstack([A, np.ones((300, 1))]) if bias else A
    theirs = np.linalg.lstsq(design, B, rcond=None)[0]
    np.testing.assert_allclose(ours.numpy(), theirs[:6], rtol=1e-8, atol=1e-10)
    if bias:
        np.testing.assert_allclose(ours_b.numpy(), theirs[6], rtol=1e-8, atol=1e-10)
    assert np.abs(ours.numpy() - T).max() < 0.05   # and it finds the planted map


def test_replaceme_folds_its_least_squares_map_into_the_preceding_down_projection(byte_data):
    m, calib = tiny_model(seed=2), batches(byte_data)
    inp = pruning.PruneInput(calib, "cpu", nullcontext(), options=opts())
    r = pruning.METHODS["replaceme"].rank(m, [2], inp)
    D = pruning.angular_distances(m, calib, "cpu", nullcontext(), tokens="all", reading="cosine")
    l = min(range(1, N - 1), key=lambda i: D[i, i + 2])   # the closest run [l, l+2), l >= 1
    assert r.choice[2] == [l, l + 1] and list(r.edits[2]) == [f"blocks.{l - 1}.ffn.down.weight"]
    # by hand: h_l = Y + M (M = block l-1's MLP output); T from numpy's lstsq of M T ~ h_{l+2} - Y
    grab = {}
    hook = m.blocks[l - 1].ffn.register_forward_hook(lambda mod, a, out: grab.__setitem__("M", out))
    with pruning.layer_inputs(m) as run, torch.no_grad():
        hs, Ms = [], []
        for x, _ in calib:
            hs.append(run(x).flatten(0, 1).double())
            Ms.append(grab["M"].flatten(0, 1).double())
    hook.remove()
    h, M = torch.cat(hs), torch.cat(Ms)
    Y, target = h[:, l] - M, h[:, l + 2]
    T = np.linalg.lstsq(M.numpy(), (target - Y).numpy(), rcond=None)[0]
    down = m.blocks[l - 1].ffn.down.weight.detach().double().numpy()
    np.testing.assert_allclose(r.edits[2][f"blocks.{l - 1}.ffn.down.weight"].double().numpy(), T.T @ down,
                               rtol=1e-4, atol=1e-6)
    # the folded, pruned model hands block l+2 (here the final norm / next block) Y + M T, and fits the
    # target at least as well as plain removal (T = I: Y + M = h_l)
    after = m.blocks[l + 2] if l + 2 < N else m.norm_f
    seen = []
    hook = after.register_forward_pre_hook(lambda mod, a: seen.append(a[0].flatten(0, 1).double()))
    with pruning.edited(m, r.edits[2]), torch.no_grad():
        m.set_passthrough([l, l + 1])
        for x, _ in calib:
            m(x)
        m.set_passthrough([])
    hook.remove()
    out = torch.cat(seen)
    np.testing.assert_allclose(out.numpy(), (Y + M @ torch.tensor(T)).numpy(), rtol=1e-4, atol=1e-4)
    assert ((out - target) ** 2).sum() <= ((h[:, l] - target) ** 2).sum()
    assert torch.equal(m.blocks[l - 1].ffn.down.weight, torch.tensor(down, dtype=torch.float32))   # restored


def block_grad_norms(model, x, y):
    model.zero_grad()
    model(x, y)[1].backward()
    return np.array([math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in b.parameters())) for b in model.blocks])


def test_gradient_share_by_hand_and_early_fine_tuning_restores_the_weights(byte_data):
    m, calib = tiny_model(seed=4), batches(byte_data, n=3)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    # lr = 0: Eq. 2 over the calibration batches at the model's own weights
    share = pruning.gradient_share(m, calib, "cpu", nullcontext())
    ref = tiny_model(seed=4)
    acc = sum(block_grad_norms(ref, x, y) for x, y in calib)
    np.testing.assert_allclose(share, acc / acc.sum(), rtol=1e-6)
    # lr > 0: each gradient before its AdamW step (here 4 steps over 3 batches: the first batch twice)
    early = pruning.gradient_share(m, calib, "cpu", nullcontext(), lr=1e-2, steps=4)
    ref = tiny_model(seed=4)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    acc = 0
    for s in range(4):
        acc = acc + block_grad_norms(ref, *calib[s % 3])
        opt.step()
    np.testing.assert_allclose(early, acc / acc.sum(), rtol=1e-5)
    assert not np.allclose(early, share, rtol=1e-3)   # the steps moved the weights the gradients were taken at
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k   # restored bit for bit
    assert all(p.requires_grad for p in m.parameters()) and all(p.grad is None for p in m.parameters())
