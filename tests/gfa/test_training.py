"""gfa/training.py: the optimizer step equals torch's own clip_grad_norm_ then a single-tensor
AdamW (fused and foreach, CPU and CUDA), norm equalisation, the LR schedule, the parameter
groups, and the non-finite guard."""
import math
import re
import statistics

import pytest
import torch

from gfa.benchmark import load_config
from gfa.cli import UserError
from gfa.training import (FiniteGuard, GradStep, LayerGradNorms, adamw, check_weights, clip_coef, cosine_lr,
                          optimizer_for, scaled_step)
from helpers import tiny_model
from model import GPT


def _clip_step_pair(device, fused):
    """train.py's step (the clip's total from the per-layer norms, applied by scaled_step)
    and torch's own clip_grad_norm_ then a single-tensor AdamW step, on copies of one state."""
    torch.manual_seed(0)
    model = GPT(load_config("tiny/cascade_a2")).to(device)
    x = torch.randint(1, model.config.vocab_size, (2, 16), device=device)
    model(x, x)[1].backward()
    params = list(model.parameters())
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for c, p in zip(copies, params):
        c.grad = p.grad.clone()
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    total = torch.nn.utils.clip_grad_norm_(copies, 0.05)
    torch.optim.AdamW(copies, foreach=False, **hyper).step()
    norms = LayerGradNorms(model.param_groups_by_layer())()
    got_total = norms.square().sum().sqrt()
    opt = torch.optim.AdamW(params, fused=fused, foreach=None if fused else True, **hyper)
    scaled_step(opt, [p.grad for p in params], clip_coef(got_total, 0.05))
    assert not hasattr(opt, "grad_scale")   # the next step is not scaled again
    assert got_total.item() == pytest.approx(total.item(), rel=1e-5) and total.item() > 0.05   # clipping happened
    for p, c in zip(params, copies):
        torch.testing.assert_close(p.grad, c.grad, rtol=1e-5, atol=1e-8)   # left clipped, as clip_grad_norm_ leaves them
        torch.testing.assert_close(p.detach(), c.detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fused", [True, False])
def test_clipped_step_equals_clip_grad_norm_then_adamw(fused):
    _clip_step_pair("cpu", fused)


@pytest.mark.gpu
def test_clipped_step_equals_clip_grad_norm_then_adamw_gpu():
    _clip_step_pair("cuda", True)


def test_grad_step_is_train_pys_step():
    """GradStep (train.py's and bench's 'dump' path) == per-layer norms by hand, then clip_grad_norm_
    and AdamW; it returns the norms before clipping."""
    a, b = tiny_model(2).train(), tiny_model(2).train()
    x = torch.randint(0, 256, (2, 16))
    for m in (a, b):
        m(x, x)[1].backward()
    groups = a.param_groups_by_layer()
    hand = torch.stack([torch.cat([p.grad.flatten() for p in g]).norm() for g in groups.values()])
    norms, norms_eq, total = GradStep(groups, adamw(a.parameters(), 1e-2, (0.9, 0.95), 0.1, fused=False), 0.05)()
    torch.testing.assert_close(norms, hand)
    torch.testing.assert_close(total, hand.square().sum().sqrt())
    assert norms_eq is None and all(p.grad is None for p in a.parameters())   # zero_grad(set_to_none)
    torch.nn.utils.clip_grad_norm_(list(b.parameters()), 0.05)
    adamw(b.parameters(), 1e-2, (0.9, 0.95), 0.1, fused=False).step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("sublayers", [False, True])
def test_equalisation_rescales_layers_to_the_largest(sublayers):
    """Whole layers are rescaled, also when the groups are sub-blocks: a layer's attention and MLP get
    one factor, so the layers' norms come out equal and each layer's attention:MLP ratio stays."""
    m = tiny_model(0).train()
    x = torch.randint(0, 256, (2, 16))
    m(x, x)[1].backward()
    groups = m.param_groups_by_layer(sublayers)
    norms, eq, total = GradStep(groups, torch.optim.SGD(m.parameters(), lr=0.0), equalize=True)()
    per_layer = lambda n: n[1:-1].view(4, -1).square().sum(1).sqrt()   # [embed, (attn, mlp) x 4 or layer x 4, head]
    assert per_layer(norms).std() > 0
    torch.testing.assert_close(per_layer(eq), per_layer(norms).max().expand(4))
    torch.testing.assert_close(eq[1:-1].view(4, -1) / per_layer(eq)[:, None], norms[1:-1].view(4, -1)
                               / per_layer(norms)[:, None])
    assert eq[0] == norms[0] and eq[-1] == norms[-1]   # embed and head untouched
    torch.testing.assert_close(total, eq.square().sum().sqrt())


def _sgd_steps_as_written_by_hand(device, fused):
    """optimizer='sgd' through train.py's clipped step: two steps of heavy-ball momentum, written out,
    with the L2 weight decay on matrices only and the gradients scaled by the clip factor."""
    lr, mu, wd, clip = 0.1, 0.9, 0.01, 0.05
    cfg = {"optimizer": "sgd", "learning_rate": lr, "momentum": mu, "weight_decay": wd, "beta1": 0.9, "beta2": 0.95}
    m = tiny_model(3).train().to(device)
    start = [p.detach().clone() for p in m.parameters()]
    opt = optimizer_for(cfg, m.parameters(), fused=fused)
    x = torch.randint(0, 256, (2, 16), device=device)
    want, buf = [p.clone() for p in start], None
    for _ in range(2):
        for p, w in zip(m.parameters(), want):   # the model sits at the hand-computed point: same gradients
            p.data.copy_(w)
        m(x, x)[1].backward()
        grads = [p.grad.clone() for p in m.parameters()]
        total = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        coef = min(1.0, clip / (total.item() + 1e-6))
        d = [coef * g + (wd * w if w.dim() >= 2 else 0) for g, w in zip(grads, want)]
        buf = d if buf is None else [mu * b + di for b, di in zip(buf, d)]
        want = [w - lr * b for w, b in zip(want, buf)]
        scaled_step(opt, [p.grad for p in m.parameters()], clip_coef(total.float(), clip))
        opt.zero_grad(set_to_none=True)
    assert total.item() > clip   # the clip acted
    for p, w, s in zip(m.parameters(), want, start):
        torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-7)
        assert not torch.equal(p.detach(), s)


@pytest.mark.parametrize("fused", [True, False])
def test_sgd_steps_as_written_by_hand(fused):
    _sgd_steps_as_written_by_hand("cpu", fused)


@pytest.mark.gpu
def test_sgd_steps_as_written_by_hand_gpu():
    """The fused CUDA kernel, with the clip folded in through grad_scale (gfa.training.scaled_step)."""
    _sgd_steps_as_written_by_hand("cuda", True)


def test_cosine_schedule_by_hand():
    lr = lambda it: cosine_lr(it, 1.0, 0.1, warmup=4, total=14)
    assert [lr(i) for i in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert lr(4) == 1.0 and lr(9) == pytest.approx(0.55) and lr(14) == pytest.approx(0.1) and lr(99) == pytest.approx(0.1)


def test_adamw_decays_matrices_only():
    opt = adamw(tiny_model().parameters(), 1e-3, (0.9, 0.95), 0.1, fused=False)
    decay, rest = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert rest["weight_decay"] == 0.0 and rest["params"] and all(p.dim() == 1 for p in rest["params"])


def test_finite_guard_names_the_first_bad_step():
    g = FiniteGuard()
    g.watch(3, torch.tensor(1.0), torch.tensor(2.0))
    g.check("kept")   # all finite: nothing
    g.watch(4, torch.tensor(1.0), torch.tensor(float("inf")))
    g.watch(5, torch.tensor(float("nan")))
    with pytest.raises(UserError, match=r"non-finite loss or gradient at step 4: stopped \(kept\)"):
        g.check("kept")
    m = tiny_model()
    check_weights(m, 7, "kept")
    for bad, shown in [(math.inf, "inf"), (math.nan, "nan"), (3e11, "3e+11")]:
        with torch.no_grad():
            m.blocks[1].ffn.down.weight[0, 0] = bad
        with pytest.raises(UserError, match=rf"non-finite or has exploded after step 7 \(max \|w\| {re.escape(shown)} in "
                                            rf"blocks.1.ffn.down.weight\)"):
            check_weights(m, 7, "kept")
    with torch.no_grad():
        m.blocks[1].ffn.down.weight[0, 0] = 9e9   # large, but below the line
    check_weights(m, 7, "kept")


@pytest.mark.parametrize("sublayers, via", [(False, "lr"), (True, "lr"), (False, "lr_mean")])
def test_equalisation_via_lr_is_adamw_per_layer_at_scaled_lrs(sublayers, via):
    """equalize_via='lr': two steps equal, per layer, a single-tensor AdamW whose lr is the schedule's
    times that step's factor (the largest layer norm over the layer's own, computed here by hand);
    'lr_mean': times the factor over the layers' mean factor. The embedding and head keep the schedule's
    lr, the gradients and the clip are not equalised, and set_lr starts each step from the schedule
    again (the factors do not compound)."""
    from gfa.training import set_lr
    a, b = tiny_model(5).train(), tiny_model(5).train()
    cfg = {"optimizer": "adamw", "learning_rate": 1e-2, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95}
    opt = optimizer_for(cfg, a.parameters(), fused=False, by_layer=a.param_groups_by_layer())
    step = GradStep(a.param_groups_by_layer(sublayers), opt, 0.0, equalize=True, equalize_via=via)
    hand = {n: adamw(g, 1.0, (0.9, 0.95), 0.1, fused=False) for n, g in b.param_groups_by_layer().items()}
    factors = []
    for it, lr in enumerate((1e-2, 4e-3)):
        x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(it))
        for m in (a, b):
            m(x, x)[1].backward()
        layer_norm = {n: torch.cat([p.grad.flatten() for p in g]).norm().item()
                      for n, g in b.param_groups_by_layer().items()}
        top = max(v for n, v in layer_norm.items() if n.startswith("layer."))
        factor = {n: top / v if n.startswith("layer.") else 1.0 for n, v in layer_norm.items()}
        if via == "lr_mean":
            mean = statistics.fmean(f for n, f in factor.items() if n.startswith("layer."))
            factor = {n: f / mean if n.startswith("layer.") else 1.0 for n, f in factor.items()}
        factors.append(factor)
        set_lr(opt, lr)
        norms, norms_eq, total = step()
        assert norms_eq is None
        torch.testing.assert_close(total.item(), math.sqrt(sum(v * v for v in layer_norm.values())), rtol=1e-5, atol=0)
        for n, o in hand.items():
            set_lr(o, lr * factor[n])
            o.step()
            o.zero_grad(set_to_none=True)
    layer_factors = [f for n, f in factors[0].items() if n.startswith("layer.")]
    assert max(layer_factors) > 1.2 * min(layer_factors)   # the layers' norms differed: the factors did something
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)


def test_equalisation_via_lr_needs_per_layer_groups():
    m = tiny_model(0)
    for via in ("lr", "lr_mean"):   # the message names the mode asked for
        with pytest.raises(ValueError, match=f"equalize_via='{via}' needs an optimizer with a group per layer"):
            GradStep(m.param_groups_by_layer(), adamw(m.parameters(), 1e-3, (0.9, 0.95), 0.1, fused=False),
                     equalize=True, equalize_via=via)
    with pytest.raises(UserError, match="equalize_via='sgd'"):
        GradStep(m.param_groups_by_layer(), adamw(m.parameters(), 1e-3, (0.9, 0.95), 0.1, fused=False),
                 equalize=True, equalize_via="sgd")
