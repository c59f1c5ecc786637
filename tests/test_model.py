"""model.py against independent expectations: the paper's parameter counts and taper rules,
hand-written second implementations (unrolled repeats, naive attention, per-layer CE sums),
and invariants (passthrough == layer removed, KV cache == full forward, the static-shape
decode step == generate)."""
import math
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gfa.cli import gpt_config
from model import GPT, ConfigError, GPTConfig, apply_rope, describe, drop_layers

ROOT = Path(__file__).resolve().parent.parent

# Table 2 (docs/paper_notes.md): parameter counts in billions, both embeddings included
PAPER_PARAMS = {"vanilla_16l": 1.280, "vanilla_15l": 1.213, "vanilla_14l": 1.146, "vanilla_13l": 1.078,
                "vanilla_12l": 1.011, "cascade_a1": 1.255, "cascade_a2": 1.221, "cascade_f1": 1.185,
                "cascade_f2": 1.091, "cascade_c1": 1.160, "cascade_c2": 1.032}
# Table 4 head schedules and FFN end points, written out by hand from the paper's text
A1_HEADS = [32] * 4 + [30] * 4 + [28] * 4 + [26] * 4
A2_HEADS = [h for h in range(32, 17, -2) for _ in range(2)]
FFN = {"f1": (8192, 6272), "f2": (8192, 4352)}


def paper_config(name, scale=None):
    """A variant alone (the paper's 1.2B scale), or after a scale file (config/small.py, config/tiny.py)."""
    files = ([str(ROOT / "config" / f"{scale}.py")] if scale else []) + [str(ROOT / "config" / f"{name}.py")]
    return gpt_config(files)


def meta_model(cfg):
    with torch.device("meta"):
        return GPT(cfg)


def tiny(**kw):
    base = dict(vocab_size=61, block_size=32, d_model=32, n_layer=4, head_dim=8, d_attn0=32, S_d=8,
                d_ffn0=48)
    base.update(kw)
    return GPTConfig(**base)


def build(cfg, seed=0):
    torch.manual_seed(seed)
    m = GPT(cfg).double()
    # make the residual branches large enough that a wrong layer order would show
    for b in m.blocks:
        torch.nn.init.normal_(b.attn.proj.weight, std=0.2)
        torch.nn.init.normal_(b.ffn.down.weight, std=0.2)
    return m.eval()


def test_meta_model_has_the_real_models_tensors():
    """Shapes only (no values drawn, the RoPE tables placeholders): every parameter and buffer of the real
    model, same name, shape and dtype, tied as the real one is."""
    cfg = tiny(tie_embeddings=True, repeats=[1, 2, 1, 1])
    real, meta = GPT(cfg), meta_model(cfg)
    shapes = lambda m: {k: (v.shape, v.dtype) for k, v in [*m.named_parameters(), *m.named_buffers()]}
    assert shapes(meta) == shapes(real) and all(v.is_meta for v in meta.state_dict().values())
    assert meta.lm_head.weight is meta.tok_emb.weight and meta.num_params() == real.num_params()


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_paper_param_counts(name):
    m = meta_model(paper_config(name))
    assert abs(m.num_params() / 1e9 - PAPER_PARAMS[name]) < 0.0005 + 1e-12, m.num_params()


def test_paper_taper_schedules():
    assert paper_config("vanilla_16l").layer_heads() == [32] * 16
    assert paper_config("cascade_a1").layer_heads() == A1_HEADS
    assert paper_config("cascade_a2").layer_heads() == A2_HEADS
    for v in ("f1", "f2"):
        ffn = paper_config(f"cascade_{v}").layer_ffn()
        assert (ffn[0], ffn[-1]) == FFN[v] and len(set(a - b for a, b in zip(ffn, ffn[1:]))) == 1
    assert paper_config("cascade_c1").layer_heads() == A1_HEADS and paper_config("cascade_c1").layer_ffn()[-1] == 6272
    assert paper_config("cascade_c2").layer_heads() == A2_HEADS and paper_config("cascade_c2").layer_ffn()[-1] == 4352
    vd = paper_config("virtual_depth")
    assert vd.n_layer == 8 and vd.layer_repeats() == [1, 1, 1, 1, 2, 3, 3, 5]
    assert paper_config("layerskip").deep_supervision


VARIANTS = sorted(p.stem for p in (ROOT / "config").glob("*.py") if p.stem not in ("small", "tiny", "demo"))


def test_scaled_families_build_and_keep_the_taper_shape():
    assert len(VARIANTS) == 15
    for scale, lo, hi in [("small", 50e6, 150e6), ("tiny", 1e6, 9e6)]:
        for name in VARIANTS:
            n = meta_model(paper_config(name, scale)).num_params()
            assert lo <= n <= hi, (scale, name, n)
        a2 = paper_config("cascade_a2", scale)
        assert [h * 2 for h in a2.layer_heads()] == A2_HEADS   # half the heads, same schedule
        f2 = paper_config("cascade_f2", scale)
        assert f2.layer_ffn()[-1] / f2.layer_ffn()[0] == pytest.approx(4352 / 8192)


def test_config_round_trips_through_a_checkpoint(tmp_path):
    cfg = tiny(n_layer=5, n_head=[4, 3, 2, 4, 1], d_ffn=[48, 40, 32, 24, 16], passthrough=[3])
    m = build(cfg)
    m.set_passthrough([1, 3])   # set at run time: the saved config must record it
    torch.save({"model_config": asdict(m.config), "model": m.state_dict()}, tmp_path / "c.pt")
    ck = torch.load(tmp_path / "c.pt", weights_only=False)
    again = GPT(GPTConfig(**ck["model_config"])).double()
    again.load_state_dict(ck["model"])
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    assert again.passthrough == {1, 3} and torch.equal(again(x)[0], m(x)[0])


def test_drop_layers_keeps_the_run_time_passthrough():
    # a config that skips layer 3, then every layer switched on, then layer 0 removed:
    # the smaller model must skip nothing (it used to inherit the config's stale [3] as [2])
    m = build(tiny(n_layer=5, passthrough=[3]))
    m.set_passthrough([])
    small = drop_layers(m, [0])
    assert small.passthrough == frozenset() and small.config.passthrough == []
    x = torch.randint(0, 61, (2, 12))
    m.set_passthrough([0])
    assert torch.equal(small(x)[0], m(x)[0])


def test_passthrough_equals_model_without_the_layer():
    cfg = tiny(n_layer=5, n_head=[4, 3, 2, 4, 1], d_ffn=[48, 40, 32, 24, 16])
    full = build(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 20))
    for drop in ([2], [0, 4]):
        # independent construction: a fresh smaller model, weights copied block by block
        keep = [l for l in range(5) if l not in drop]
        small = GPT(tiny(n_layer=len(keep), n_head=[cfg.n_head[l] for l in keep],
                         d_ffn=[cfg.d_ffn[l] for l in keep])).double().eval()
        small.tok_emb.load_state_dict(full.tok_emb.state_dict())
        small.norm_f.load_state_dict(full.norm_f.state_dict())
        small.lm_head.load_state_dict(full.lm_head.state_dict())
        for j, l in enumerate(keep):
            small.blocks[j].load_state_dict(full.blocks[l].state_dict())
        full.set_passthrough(drop)
        a, b = full(x)[0], small(x)[0]
        assert torch.equal(a, b)
        assert torch.equal(a, drop_layers(full, drop)(x)[0])
        full.set_passthrough([])
        assert not torch.allclose(full(x)[0], b)


def test_repeats_equal_the_explicitly_unrolled_stack():
    cfg = tiny(n_layer=3, repeats=[1, 3, 2], n_head=[4, 2, 3], d_ffn=[48, 32, 16])
    m = build(cfg)
    # second implementation: 6 distinct blocks, weights copied from the shared ones
    unrolled = GPT(tiny(n_layer=6, n_head=[4, 2, 2, 2, 3, 3], d_ffn=[48, 32, 32, 32, 16, 16])).double().eval()
    sd = {k: v for k, v in m.state_dict().items() if not k.startswith("blocks.")}
    for j, l in enumerate([0, 1, 1, 1, 2, 2]):
        sd.update({f"blocks.{j}.{k}": v for k, v in m.blocks[l].state_dict().items()})
    unrolled.load_state_dict(sd)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    torch.testing.assert_close(m(x)[0], unrolled(x)[0], rtol=0, atol=1e-12)


def naive_block(block, x, cos, sin, post=False, c=1.0, s=1.0):
    """Block forward written out: explicit RMSNorm, masked softmax attention, SwiGLU. Pre-LN
    x + s * f(c * rms(x)), or Post-LN (post=True) rms(x + s * f(x))."""
    def rms(v, w):
        return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    def attn(h):
        a = block.attn
        q, k, v = (h @ a.qkv.weight.T).split(a.n_head * a.head_dim, dim=-1)
        q, k, v = (t.view(B, T, a.n_head, a.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(a.head_dim)
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        return (att @ v).transpose(1, 2).reshape(B, T, -1) @ a.proj.weight.T

    def ffn(h):
        g, u = (h @ block.ffn.gate_up.weight.T).chunk(2, dim=-1)
        return (F.silu(g) * u) @ block.ffn.down.weight.T
    B, T, _ = x.shape
    if post:
        x = rms(x + s * attn(x), block.attn_norm.weight)
        return rms(x + s * ffn(x), block.ffn_norm.weight)
    x = x + s * attn(c * rms(x, block.attn_norm.weight))
    return x + s * ffn(c * rms(x, block.ffn_norm.weight))


def test_forward_matches_a_naive_implementation():
    cfg = tiny(n_layer=2, n_head=[4, 2], d_ffn=[48, 24])
    m = build(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    h = m.tok_emb(x)
    cos, sin = m.rope_cos[:12], m.rope_sin[:12]
    for b in m.blocks:
        h = naive_block(b, h, cos, sin)
    ref = F.linear(F.rms_norm(h, (32,), m.norm_f.weight, 1e-5), m.lm_head.weight)
    torch.testing.assert_close(m(x)[0], ref, rtol=1e-10, atol=1e-10)


# per layer of a 4-layer model, written out by hand: (Post-LN?, norm scale)
NORMS_BY_HAND = {
    "pre": ([False] * 4, [1.0] * 4),
    "post": ([True] * 4, [1.0] * 4),
    "mix": ([True, True, False, False], [1.0] * 4),   # mix_post_fraction 0.5 of 4 layers: layers 0 and 1
    "scaled": ([False] * 4, [1.0, 2 ** -0.5, 3 ** -0.5, 0.5]),
}


@pytest.mark.parametrize("residual_scale", [1.0, 0.5])
@pytest.mark.parametrize("placement", sorted(NORMS_BY_HAND))
def test_norm_placements_match_hand_written_blocks(placement, residual_scale):
    kw = {"mix_post_fraction": 0.5} if placement == "mix" else {}
    cfg = tiny(n_head=[4, 2, 3, 1], d_ffn=[48, 24, 40, 16], norm_placement=placement, residual_scale=residual_scale,
               **kw)
    m = build(cfg)
    for b in m.blocks:   # norm gains away from 1, so a gain applied in the wrong place would show
        torch.nn.init.uniform_(b.attn_norm.weight, 0.5, 1.5)
        torch.nn.init.uniform_(b.ffn_norm.weight, 0.5, 1.5)
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    h, (post, scale) = m.tok_emb(x), NORMS_BY_HAND[placement]
    cos, sin = m.rope_cos[:12], m.rope_sin[:12]
    for l, b in enumerate(m.blocks):
        h = naive_block(b, h, cos, sin, post[l], scale[l], residual_scale)
    ref = F.linear(F.rms_norm(h, (32,), m.norm_f.weight, 1e-5), m.lm_head.weight)
    torch.testing.assert_close(m(x)[0], ref, rtol=1e-10, atol=1e-10)
    # a model pruned of layers 1 and 2 keeps the others' own placement and scale: it equals passthrough
    m.set_passthrough([1, 2])
    torch.testing.assert_close(drop_layers(m, [1, 2])(x)[0], m(x)[0], rtol=0, atol=0)


def test_description_shows_each_layers_normalisation():
    lines = describe(GPT(tiny(norm_placement="mix", mix_post_fraction=0.5, residual_scale=0.5))).splitlines()
    assert "norm_placement mix (Post-LN: the first 0.5 of the layers)  residual_scale 0.5" in lines
    assert [("Post-LN" in line) for line in lines[3:7]] == [True, True, False, False]
    scaled = describe(GPT(tiny(norm_placement="scaled"))).splitlines()
    assert scaled[4].endswith("norm x0.7071") and "norm x" not in scaled[3]


def test_default_block_is_the_plain_pre_ln_block():
    """The defaults run exactly the ops of x + Attn(norm(x)), x + FFN(norm(x)): bit-identical."""
    m = build(tiny())
    x = torch.randn(2, 12, 32, dtype=torch.double)
    cos, sin = m.rope_cos[:12], m.rope_sin[:12]
    for b in m.blocks:
        h = x + b.attn(b.attn_norm(x), cos, sin)
        assert torch.equal(b(x, cos, sin), h + b.ffn(b.ffn_norm(h)))


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.double), torch.randn(1, 1, 1, 8, dtype=torch.double)
    m = GPT(tiny())
    cos, sin = m.rope_cos.double(), m.rope_sin.double()
    score = lambda i, j: (apply_rope(q, cos[i:i + 1], sin[i:i + 1]) * apply_rope(k, cos[j:j + 1], sin[j:j + 1])).sum()
    assert torch.allclose(score(7, 3), score(12, 8)) and torch.allclose(score(5, 5), (q * k).sum())
    assert not torch.allclose(score(7, 3), score(7, 4))


def test_rope_matches_complex_rotation_by_hand():
    # independent reference: pair x[j] with x[j + D/2] as a complex number and rotate it by
    # pos * theta^(-2j/D), theta = rope_theta (Llama's rotate-half convention)
    D, theta = 8, 500.0
    m = GPT(tiny(rope_theta=theta))
    x = torch.randn(2, 3, 11, D, dtype=torch.double)
    got = apply_rope(x, m.rope_cos[:11].double(), m.rope_sin[:11].double())
    freq = theta ** (-torch.arange(0, D, 2, dtype=torch.double) / D)
    rot = torch.polar(torch.ones(11, D // 2, dtype=torch.double), torch.arange(11.0, dtype=torch.double)[:, None] * freq)
    z = torch.complex(x[..., :D // 2], x[..., D // 2:]) * rot
    torch.testing.assert_close(got, torch.cat((z.real, z.imag), -1), rtol=0, atol=1e-6)   # fp32 tables


def test_deep_supervision_loss_is_the_weighted_sum_of_per_layer_ce():
    alphas = [0.5, 0.25, 2.0]
    cfg = tiny(n_layer=3, deep_supervision=True, ds_alpha=alphas, repeats=[1, 2, 1])
    m = build(cfg).train()
    x, y = torch.randint(0, cfg.vocab_size, (2, 16)), torch.randint(0, cfg.vocab_size, (2, 16))
    _, loss = m(x, y)
    ce = lambda h: F.cross_entropy(m.lm_head(m.norm_f(h)).view(-1, cfg.vocab_size), y.view(-1))
    h, expect = m.tok_emb(x), 0.0
    cos, sin = m.rope_cos[:16], m.rope_sin[:16]
    for i, b in enumerate(m.blocks):
        for _ in range(cfg.repeats[i]):
            h = b(h, cos, sin)
        expect = expect + alphas[i] * ce(h)
    expect = expect + ce(h)   # the final exit L_N
    torch.testing.assert_close(loss, expect, rtol=1e-12, atol=1e-12)
    # the recomputed (checkpointed) aux heads give the same gradients as the direct sum
    g1 = torch.autograd.grad(loss, list(m.parameters()))
    g2 = torch.autograd.grad(expect, list(m.parameters()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    m.eval()   # eval reports the final exit only
    torch.testing.assert_close(m(x, y)[1], ce(h), rtol=1e-12, atol=1e-12)
    # the last block's exit is the final exit: one LM-head pass per executed block, not one more
    calls = []
    hook = m.lm_head.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        m.train()(x, y)
    hook.remove()
    assert len(calls) == 3


def test_deep_supervision_with_a_passthrough_last_layer():
    # the last *executed* block's exit is the final one: layer 2 skipped, so alpha_1 weights it
    alphas = [0.5, 0.25, 2.0]
    m = build(tiny(n_layer=3, deep_supervision=True, ds_alpha=alphas, passthrough=[2])).train()
    x, y = torch.randint(0, 61, (2, 16)), torch.randint(0, 61, (2, 16))
    ce = lambda h: F.cross_entropy(m.lm_head(m.norm_f(h)).view(-1, 61), y.view(-1))
    cos, sin = m.rope_cos[:16], m.rope_sin[:16]
    h0 = m.blocks[0](m.tok_emb(x), cos, sin)
    h1 = m.blocks[1](h0, cos, sin)
    torch.testing.assert_close(m(x, y)[1], alphas[0] * ce(h0) + alphas[1] * ce(h1) + ce(h1), rtol=1e-12, atol=1e-12)


# LayerSkip's loss-scale schedules, written out by hand for 4 exits (e_scale 0.5 on the first 3)
LAYERSKIP_BY_HAND = {
    "uniform": [0.5, 0.5, 0.5, 1.0], "linear": [0.5, 1.0, 1.5, 4.0], "sum": [0.5, 1.5, 3.0, 10.0],
    "sqrt": [0.5, 0.5 * 2 ** 0.5, 0.5 * 3 ** 0.5, 2.0], "inv": [0.5, 0.25, 0.5 / 3, 0.25],
    "inv_sqrt": [0.5, 0.5 / 2 ** 0.5, 0.5 / 3 ** 0.5, 0.5]}


@pytest.mark.parametrize("scale", sorted(LAYERSKIP_BY_HAND))
def test_layerskip_scale_schedules_weight_each_exit(scale):
    cfg = tiny(n_layer=4, deep_supervision=True, ds_scale=scale, ds_e_scale=0.5)
    m = build(cfg).train()
    x, y = torch.randint(0, 61, (2, 16)), torch.randint(0, 61, (2, 16))
    ce = lambda h: F.cross_entropy(m.lm_head(m.norm_f(h)).view(-1, 61), y.view(-1))
    cos, sin = m.rope_cos[:16], m.rope_sin[:16]
    w = torch.tensor(LAYERSKIP_BY_HAND[scale], dtype=torch.double)
    w = w / w.sum()
    h, expect = m.tok_emb(x), 0.0
    for i, b in enumerate(m.blocks):
        h = b(h, cos, sin)
        expect = expect + w[i] * ce(h)
    torch.testing.assert_close(m(x, y)[1], expect, rtol=1e-12, atol=1e-12)


def test_init_is_the_papers_normal_and_repeats_do_not_change_it():
    torch.manual_seed(0)
    ref = GPT(tiny(n_layer=4, d_model=256, d_ffn0=512, d_attn0=256, head_dim=16, S_d=16))
    torch.manual_seed(0)
    virt = GPT(tiny(n_layer=4, d_model=256, d_ffn0=512, d_attn0=256, head_dim=16, S_d=16, repeats=[1, 1, 2, 5]))
    for (n, a), (_, b) in zip(ref.state_dict().items(), virt.state_dict().items()):
        assert torch.equal(a, b), n   # an intervention and its reference start from the same weights
    for name in ("blocks.0.attn.proj.weight", "blocks.3.ffn.down.weight", "tok_emb.weight", "lm_head.weight"):
        assert abs(ref.state_dict()[name].std().item() - 0.02) < 0.001, name
    torch.manual_seed(0)
    scaled = GPT(tiny(n_layer=4, d_model=256, d_ffn0=512, d_attn0=256, head_dim=16, S_d=16, init="scaled"))
    assert abs(scaled.blocks[2].attn.proj.weight.std().item() - 0.02 / 8 ** 0.5) < 0.0005   # 0.02 / sqrt(2 * 4)
    assert abs(scaled.blocks[2].attn.qkv.weight.std().item() - 0.02) < 0.001


@pytest.mark.parametrize("kw", [{}, {"repeats": [1, 2, 1, 3], "passthrough": [2]},
                                {"norm_placement": "mix", "mix_post_fraction": 0.5, "residual_scale": 0.5}])
def test_kv_cache_decoding_matches_the_full_forward(kw):
    cfg = tiny(**kw)
    m = build(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 24))
    full = m(x)[0]
    cache = m.new_kv_cache(2, 24)
    chunks = [m(x[:, :10], kv_cache=cache, pos=0)[0]]            # prefill
    chunks.append(m(x[:, 10:15], kv_cache=cache, pos=10)[0])       # a multi-token chunk
    for t in range(15, 24):                                        # one token at a time
        chunks.append(m(x[:, t:t + 1], kv_cache=cache, pos=t)[0])
    torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=1e-10, atol=1e-10)
    # greedy generate() == repeatedly taking the argmax of a full forward
    out = m.generate(x[:, :6], 8, temperature=0)
    ref = x[:, :6]
    for _ in range(8):
        ref = torch.cat([ref, m(ref)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("kw", [dict(n_head=[4, 3, 2, 1], d_ffn=[48, 40, 32, 16]),
                                dict(repeats=[1, 2, 1, 3], passthrough=[2])])
def test_static_decode_step_matches_generate(kw):
    """decode_step (whole-cache masked attention, positions as a tensor: bench.py's compiled decode)
    gives the tokens of generate(), whose cache path slices to the current length."""
    m = build(tiny(**kw))
    prompt = torch.randint(0, 61, (2, 5))
    want = m.generate(prompt, 8, temperature=0)
    cache = m.new_kv_cache(2, 13)
    with torch.no_grad():
        out = [prompt, m(prompt, kv_cache=cache, pos=0, last_only=True)[0][:, -1].argmax(-1, keepdim=True)]
        for s in range(7):
            out.append(m.decode_step(out[-1], torch.tensor(5 + s), cache))
    assert torch.equal(torch.cat(out, 1), want)


def test_generate_sampling_respects_top_k_and_seed():
    cfg = tiny()
    m = build(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 6))
    assert torch.equal(m.generate(x, 8, top_k=1), m.generate(x, 8, temperature=0))   # k=1 leaves the argmax
    draw = lambda seed: m.generate(x, 12, temperature=2.0, top_k=3, generator=torch.Generator().manual_seed(seed))
    out = draw(0)
    assert torch.equal(out, draw(0)) and not torch.equal(out, draw(1))   # the generator decides, and matters
    for t in range(6, 18):   # every sampled token is among the 3 most likely after its prefix
        top3 = m(out[:, :t])[0][:, -1].topk(3).indices
        assert (top3 == out[:, t:t + 1]).any(1).all()


def test_flops_per_token_hand_count():
    cfg = GPTConfig(vocab_size=100, block_size=16, d_model=32, n_layer=2, head_dim=8, n_head=[4, 2],
                    d_ffn=[64, 48], repeats=[1, 3])
    m = GPT(cfg)
    T = 16
    # layer 0: d_attn 32: QKV 3*32*32, O 32*32, FFN 3*32*64 multiply-adds; attention 2*2*32 per key, (T+1)/2 keys
    l0 = 2 * (3 * 32 * 32 + 32 * 32 + 3 * 32 * 64) + 4 * 32 * (T + 1) // 2
    l1 = 2 * (3 * 32 * 16 + 16 * 32 + 3 * 32 * 48) + 4 * 16 * (T + 1) // 2
    assert m.layer_flops_per_token(T) == [l0, 3 * l1]
    assert m.flops_per_token(T) == l0 + 3 * l1 + 2 * 32 * 100
    assert m.train_flops_per_token(T) == m.flops_per_token(T)
    m.set_passthrough([1])
    assert m.flops_per_token(T) == l0 + 2 * 32 * 100
    # deep supervision's objective: one LM head per exit (layers that run), the last one the model's own
    ds = GPT(GPTConfig(**{**cfg.__dict__, "deep_supervision": True}))
    assert ds.train_flops_per_token(T) == ds.flops_per_token(T) + 2 * 32 * 100
    ds.set_passthrough([0])
    assert ds.train_flops_per_token(T) == ds.flops_per_token(T)
    # grouped-query (2 K/V heads): the K and V projections shrink to 2 heads x 8, attention does not
    gqa = GPT(GPTConfig(vocab_size=100, block_size=16, d_model=32, n_layer=1, head_dim=8, n_head=[4], d_ffn=[64],
                        n_kv_head=2))
    assert gqa.layer_flops_per_token(T) == [2 * (32 * (32 + 16 + 16) + 32 * 32 + 3 * 32 * 64) + 4 * 32 * (T + 1) // 2]


def test_every_parameter_gets_a_gradient():
    for kw in ({}, {"deep_supervision": True, "repeats": [2, 1, 1, 3]}):
        m = GPT(tiny(**kw)).train()
        x = torch.randint(0, 61, (2, 16))
        m(x, x)[1].backward()
        missing = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
        assert not missing, missing
        groups = m.param_groups_by_layer()
        assert list(groups) == ["embed"] + [f"layer.{i}" for i in range(4)] + ["head"]
        assert sum(len(v) for v in groups.values()) == len(list(m.parameters()))
        # sub-blocks: the same parameters, each layer split into its attention and its MLP half
        sub = m.param_groups_by_layer(sublayers=True)
        assert list(sub) == ["embed"] + [f"layer.{i}.{p}" for i in range(4) for p in ("attn", "mlp")] + ["head"]
        assert [id(p) for g in sub.values() for p in g] == [id(p) for p in m.parameters()]
        b = m.blocks[2]
        assert sub["layer.2.attn"] == [b.attn_norm.weight, b.attn.qkv.weight, b.attn.proj.weight]


@pytest.mark.parametrize("kw, words", [
    (dict(d_attn0=100), "d_attn0=100"),
    (dict(S_d=12), "S_d=12"),
    (dict(n_layer=16, d_attn0=64, S_d=8, F_d=1), "taper reaches zero"),
    (dict(n_layer=16, S_f=4), "FFN taper reaches zero"),
    (dict(n_head=[4, 4]), "n_head has 2 entries but n_layer=4"),
    (dict(d_ffn=[8] * 5), "d_ffn has 5 entries"),
    (dict(repeats=[1, 0, 1, 1]), "repeats[1]=0"),
    (dict(passthrough=[4]), "passthrough index 4: must be in [0, 3]"),
    (dict(passthrough=[-1]), "passthrough index -1"),
    (dict(n_head=[4, 4, 0, 4]), "n_head[2]=0"),
    (dict(n_head=[4] * 4, F_d=2), "use one or the other"),
    (dict(ds_alpha=[1.0] * 4), "deep_supervision=False"),
    (dict(deep_supervision=True, ds_scale="log"), "ds_scale='log'"),
    (dict(deep_supervision=True, ds_scale="sum", ds_alpha=[1.0] * 4), "ds_alpha weights the 'paper' loss only"),
    (dict(init="xavier"), "init='xavier'"),
    (dict(n_kv_head=3), "n_head[0]=4 is not a multiple of n_kv_head=3"),
    (dict(n_kv_head=-1), "n_kv_head=-1"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope_type='yarn'"),
    (dict(rope_scaling={"rope_type": "linear"}), "factor missing or not positive"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "beta": 1}), "not beta"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                        "original_max_position_embeddings": 16}), "high_freq_factor must be larger"),
    (dict(norm_placement="sandwich"), "norm_placement='sandwich': use one of pre, post, mix, scaled"),
    (dict(norm_placement="mix", mix_post_fraction=1.5), "mix_post_fraction=1.5: must be in [0, 1]"),
    (dict(mix_post_fraction=0.5), "mix_post_fraction is set but norm_placement='pre'"),
    (dict(norm_placement="mix", post_ln=[True] * 4), "post_ln is given explicitly and norm_placement='mix'"),
    (dict(norm_placement="scaled", norm_scale=[1.0] * 4), "norm_scale is given explicitly"),
    (dict(post_ln=[1, 0, 0, 0]), "post_ln[0]=1: must be True or False"),
    (dict(norm_scale=[1.0, 0.0, 1.0, 1.0]), "norm_scale[1]=0.0: must be > 0"),
    (dict(residual_scale=0.0), "residual_scale=0.0: must be > 0"),
])
def test_bad_configs_raise_one_line_errors(kw, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        tiny(**kw)


# ---- Llama-family options: grouped-query attention, tied embeddings, RoPE scaling ------------------
def test_grouped_query_attention_equals_attention_with_each_kv_head_repeated():
    """Second implementation: a multi-head model whose K/V heads are the grouped model's, each
    repeated for the query heads it serves (head h reads K/V head h // (n_head / n_kv_head), HF's
    repeat_kv), gives the same logits; the KV cache holds the n_kv_head heads only."""
    gqa = build(tiny(n_head=[4, 4, 2, 2], d_ffn=[48] * 4, n_kv_head=2))
    mha = build(tiny(n_head=[4, 4, 2, 2], d_ffn=[48] * 4))
    sd = gqa.state_dict()
    for l, h in enumerate([4, 4, 2, 2]):
        q, k, v = sd[f"blocks.{l}.attn.qkv.weight"].split([h * 8, 16, 16])
        rep = lambda w: w.view(2, 8, 32).repeat_interleave(h // 2, dim=0).reshape(h * 8, 32)
        sd[f"blocks.{l}.attn.qkv.weight"] = torch.cat([q, rep(k), rep(v)])
    mha.load_state_dict(sd)
    x = torch.randint(0, 61, (2, 12))
    torch.testing.assert_close(gqa(x)[0], mha(x)[0], rtol=0, atol=1e-12)
    assert [kv[0].size(1) for kv in gqa.new_kv_cache(1, 4)] == [2] * 4
    assert torch.equal(gqa.generate(x[:, :4], 6, temperature=0), mha.generate(x[:, :4], 6, temperature=0))
    assert gqa.num_params() == mha.num_params() - sum(2 * (h - 2) * 8 * 32 for h in [4, 4, 2, 2])


def test_tied_embeddings_share_one_matrix():
    tied, untied = GPT(tiny(tie_embeddings=True)), GPT(tiny())
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert tied.num_params() == untied.num_params() - 61 * 32
    assert tied.num_params(include_embedding=False) == tied.num_params()   # the matrix is the LM head too
    groups = tied.param_groups_by_layer()   # every parameter in one group: the gradient dump counts it once
    assert sum(len(g) for g in groups.values()) == len(list(tied.parameters()))
    assert groups["head"] == [tied.norm_f.weight]
    x = torch.randint(0, 61, (2, 8))
    with torch.no_grad():
        tied.tok_emb.weight[3] += 1.0   # one matrix: the head sees the change
    h = tied.run_blocks(tied.tok_emb(x), tied.rope_cos[:8], tied.rope_sin[:8])
    torch.testing.assert_close(tied(x)[0], F.linear(tied.norm_f(h), tied.tok_emb.weight))


def test_rope_scaling_by_hand():
    D, theta, T = 16, 10000.0, 32
    plain = GPT(tiny(head_dim=D, d_attn0=64, S_d=16, rope_theta=theta))
    linear = GPT(tiny(head_dim=D, d_attn0=64, S_d=16, rope_theta=theta,
                      rope_scaling={"rope_type": "linear", "factor": 4}))
    # linear: position 4p of the scaled model is position p of the plain one
    torch.testing.assert_close(linear.rope_cos[::4][:T // 4], plain.rope_cos[:T // 4], rtol=0, atol=1e-6)
    # llama3, one frequency at a time in plain Python (Llama 3.1's reference code): wavelengths under
    # old/high kept, over old/low divided by factor, smooth in between
    s = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64}
    ll3 = GPT(tiny(head_dim=D, d_attn0=64, S_d=16, rope_theta=theta, rope_scaling=s))
    want = []
    for j in range(D // 2):
        f = theta ** (-2 * j / D)
        wl = 2 * math.pi / f
        if wl < 64 / 4.0:
            want.append(f)
        elif wl > 64 / 1.0:
            want.append(f / 8.0)
        else:
            a = (64 / wl - 1.0) / (4.0 - 1.0)
            want.append((1 - a) * f / 8.0 + a * f)
    assert want[0] == 1.0 and want[-1] < want[0] / 8 and len({w / f for w, f in zip(want, [theta ** (-2 * j / D)
                                                                                         for j in range(D // 2)])}) > 2
    got = torch.atan2(ll3.rope_sin[1], ll3.rope_cos[1]).double()   # the angle at position 1 is the frequency
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.double), rtol=1e-6, atol=1e-7)


# ---- early exit and self-speculative decoding --------------------------------------------------------
def test_exit_states_equal_the_model_without_the_layers_above():
    """The exit after block i (one pass) == the model with every block above i passed through."""
    m = build(tiny(repeats=[1, 2, 1, 1], passthrough=[2]))
    x = torch.randint(0, 61, (2, 12))
    states = m.exit_states(x)
    assert [i for i, _ in states] == [0, 1, 3]
    torch.testing.assert_close(m.head(states[-1][1]), m(x)[0], rtol=0, atol=0)
    for i, h in states:
        m.set_passthrough(sorted({2} | set(range(i + 1, 4))))
        torch.testing.assert_close(m.head(h), m(x)[0], rtol=0, atol=1e-12)


def self_speculative_cases():
    tapered = dict(n_head=[4, 3, 2, 1], d_ffn=[48, 40, 32, 16])
    return [(tapered, 1, 3), (tapered, 2, 1), (dict(repeats=[1, 2, 1, 3], passthrough=[2]), 3, 4),
            (dict(n_kv_head=2, n_layer=6), 3, 2), (dict(n_kv_head=2, n_layer=6), 6, 5)]


@pytest.mark.parametrize("kw, E, d", self_speculative_cases())
def test_self_speculative_decoding_gives_greedy_generate_tokens(kw, E, d):
    m = build(tiny(**kw))
    for seed in range(3):
        prompt = torch.randint(0, 61, (1, 3 + 2 * seed), generator=torch.Generator().manual_seed(seed))
        want = m.generate(prompt, 12, temperature=0)
        got, stats = m.generate_self_speculative(prompt, 12, exit_layer=E, draft_len=d)
        assert torch.equal(got, want), (seed, got, want)
        assert stats["drafted"] == d * stats["rounds"] and 0 <= stats["accepted"] <= stats["drafted"]
        assert stats["rounds"] + stats["accepted"] >= 11   # every round gives accepted + 1 tokens
        if E == m.config.n_layer:   # the draft is the model itself: all accepted
            assert stats["accepted"] == stats["drafted"]


def test_self_speculative_acceptance_follows_the_layers_above_the_exit():
    """Blocks above the exit that do nothing: every draft is accepted; that do much: few are; a
    float32 model (the scripts' dtype) still gives generate()'s tokens."""
    m = build(tiny(n_layer=4))
    prompt = torch.randint(0, 61, (1, 4))
    for i in (2, 3):
        zero_branch = [m.blocks[i].attn.proj.weight, m.blocks[i].ffn.down.weight]
        with torch.no_grad():
            for w in zero_branch:
                w.zero_()
    got, stats = m.generate_self_speculative(prompt, 16, exit_layer=2, draft_len=4)
    assert torch.equal(got, m.generate(prompt, 16, temperature=0))
    assert stats["accepted"] == stats["drafted"] and stats["rounds"] == 3   # 1 + 3 x (4 + 1) tokens
    busy = build(tiny(n_layer=4), seed=1).float()
    got, stats = busy.generate_self_speculative(prompt, 16, exit_layer=1, draft_len=3)
    assert torch.equal(got, busy.generate(prompt, 16, temperature=0))
    assert stats["accepted"] < stats["drafted"] / 2


def test_self_speculative_refuses_what_it_cannot_do():
    m = build(tiny())
    with pytest.raises(ValueError, match="one sequence"):
        m.generate_self_speculative(torch.zeros(2, 3, dtype=torch.long), 4, 2, 2)
    with pytest.raises(ValueError, match="exit_layer=5"):
        m.generate_self_speculative(torch.zeros(1, 3, dtype=torch.long), 4, 5, 2)
    with pytest.raises(ValueError, match="exceeds block_size"):
        m.generate_self_speculative(torch.zeros(1, 20, dtype=torch.long), 10, 2, 4)


# ---- the fused, chunked LM head + cross-entropy (set_fused_ce) ---------------------------------------
@pytest.mark.parametrize("chunk", [1, 7, 37, 100])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy_equals_the_head_and_cross_entropy(chunk, reduction):
    """Second implementation: F.cross_entropy of the whole logits matrix; chunks that do not divide N,
    one token per chunk, one chunk; ignored targets (-1) count for nothing, in the loss nor in its mean."""
    from model import LinearCrossEntropy
    torch.manual_seed(0)
    x, w = torch.randn(37, 16, requires_grad=True), torch.randn(50, 16, requires_grad=True)
    y = torch.randint(0, 50, (37,))
    y[[0, 9, 36]] = -1
    got = LinearCrossEntropy.apply(x, w, y, chunk, reduction)
    want = F.cross_entropy(x @ w.t(), y, ignore_index=-1, reduction=reduction)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for a, b in zip(torch.autograd.grad(2.5 * got, [x, w]), torch.autograd.grad(2.5 * want, [x, w])):
        assert (a - b).abs().max() <= 1e-6 * b.abs().max()   # fp32 rounding, relative to the gradient's scale
    assert (torch.autograd.grad(LinearCrossEntropy.apply(x, w, y, chunk, reduction), x)[0][[0, 9, 36]] == 0).all()


FUSED_CASES = [dict(), dict(tie_embeddings=True), dict(passthrough=[1]),
               dict(deep_supervision=True, ds_alpha=[0.5, 0.25, 2.0, 1.0], repeats=[1, 2, 1, 1]),
               dict(deep_supervision=True, passthrough=[3], tie_embeddings=True),
               dict(deep_supervision=True, ds_scale="sum", ds_e_scale=0.5),
               dict(deep_supervision=True, ds_scale="inv_sqrt")]


def fused_and_plain(m, x, y, ctx=None):
    """(loss, {name: grad}) of the plain and of the fused path, from the same weights."""
    out = []
    for chunk in (0, 5):
        m.zero_grad(set_to_none=True)
        m.set_fused_ce(chunk)
        with ctx or torch.autocast("cpu", enabled=False):
            logits, loss = m(x, y)
        assert (logits is None) == bool(chunk)
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    m.set_fused_ce(0)
    return out


@pytest.mark.parametrize("kw", FUSED_CASES)
def test_fused_ce_model_equals_the_plain_head(kw):
    """fp32: the loss and every parameter's gradient equal the plain path's (checkpointed exits, logits
    and cross_entropy) to rounding: tied and untied heads, passthrough, every deep-supervision weighting;
    18 tokens in chunks of 5, some targets ignored. bf16 autocast: the same to bf16's rounding."""
    torch.manual_seed(1)
    m = GPT(tiny(**kw)).train()
    x, y = torch.randint(0, 61, (2, 9)), torch.randint(0, 61, (2, 9))
    y[0, :3] = -1
    (plain, gp), (fused, gf) = fused_and_plain(m, x, y)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=0)
    assert gf.keys() == gp.keys()   # the same parameters get gradients (a passthrough layer's none)
    for n in gp:
        assert (gf[n] - gp[n]).abs().max() <= 1e-6 * gp[n].abs().max(), n
    (plain, gp), (fused, gf) = fused_and_plain(m, x, y, torch.autocast("cpu", dtype=torch.bfloat16))
    torch.testing.assert_close(fused, plain, rtol=1e-2, atol=0)
    for n in gp:
        scale = gp[n].abs().max()
        assert (gf[n] - gp[n]).abs().max() <= 0.05 * scale, n
    with torch.no_grad():   # without gradients (evaluation) the fused switch changes nothing: logits come back
        m.set_fused_ce(5)
        logits, loss = m.eval()(x, y)
        torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 61), y.view(-1), ignore_index=-1))


def test_fused_ce_compiles_as_one_graph():
    """torch.compile(fullgraph=True) traces the fused loss, deep supervision's exits included (which the
    plain path's checkpoint keeps out of one graph), through AOTAutograd as inductor would: the compiled
    loss and gradients are the eager ones exactly (aot_eager runs the same kernels)."""
    torch.manual_seed(0)
    m = GPT(tiny(n_layer=2, deep_supervision=True, tie_embeddings=True)).train()
    m.set_fused_ce(5)
    x, y = torch.randint(0, 61, (2, 9)), torch.randint(0, 61, (2, 9))
    y[0, :2] = -1
    runs = []
    for model in (m, torch.compile(m, fullgraph=True, backend="aot_eager")):
        m.zero_grad(set_to_none=True)
        loss = model(x, y)[1]
        loss.backward()
        runs.append([loss.detach()] + [p.grad.clone() for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.gpu
def test_fused_ce_compiled_bf16_on_a_gpu_equals_the_plain_head():
    """What CPUs cannot check: inductor's kernels on CUDA, bf16 autocast, a 50k vocabulary in 3 uneven chunks,
    deep supervision (LayerSkip weights): loss and gradients close to the plain compiled path, and less memory."""
    torch.manual_seed(0)
    cfg = tiny(n_layer=4, vocab_size=50257, d_model=256, d_attn0=256, head_dim=32, S_d=32, d_ffn0=512,
               block_size=1024, deep_supervision=True, ds_scale="linear")
    m = GPT(cfg).cuda().train()
    x, y = torch.randint(0, cfg.vocab_size, (4, 1024), device="cuda"), torch.randint(0, cfg.vocab_size, (4, 1024), device="cuda")
    out = []
    for chunk in (0, 1500):
        m.zero_grad(set_to_none=True)
        m.set_fused_ce(chunk)
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.compile(m, fullgraph=bool(chunk))(x, y)[1]
        loss.backward()
        out.append((loss.item(), {n: p.grad.clone() for n, p in m.named_parameters()}, torch.cuda.max_memory_allocated()))
        torch._dynamo.reset()
    (plain, gp, mem_plain), (fused, gf, mem_fused) = out
    assert fused == pytest.approx(plain, rel=1e-2)
    for n in gp:
        err, scale = (gf[n] - gp[n]).abs().max().item(), gp[n].abs().max().item()
        assert err <= 0.05 * scale, f"{n}: max |fused - plain| {err:.3g} vs max |plain| {scale:.3g}"
    assert mem_fused < mem_plain, f"peak memory fused {mem_fused / 2**20:.0f} MiB vs plain {mem_plain / 2**20:.0f} MiB"
