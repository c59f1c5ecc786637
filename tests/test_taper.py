"""taper.py: each profile's widths against hand-computed schedules and shapes, the budget against a
FLOP count written out here, the config file it writes read back by the configurator (train.py's)
and bench.py, and one-line errors."""
import os

import numpy as np
import pytest

import taper
from gfa.benchmark import load_config
from gfa.cli import UserError, gpt_config
from helpers import one_line_error, tiny_model, write_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a 4-layer base at the tiny scale: 16 heads of 8, FFN 512, d_model 128, 128 tokens
BASE = [f"{ROOT}/config/tiny.py", f"{ROOT}/config/vanilla_16l.py", "--n_layer=4"]


def flops_by_hand(cfg, T=128):
    """Forward FLOPs per token: 2 per multiply-add of Q, K, V, O and the three FFN matrices, causal attention
    4 d_attn per key over (T + 1) / 2 keys, the LM head."""
    d = cfg.d_model
    return sum(2 * (4 * d * h * cfg.head_dim + 3 * d * f) + 2 * h * cfg.head_dim * (T + 1)
               for h, f in zip(cfg.layer_heads(), cfg.layer_ffn())) + 2 * d * cfg.vocab_size


def make(tmp_path, *args):
    out = str(tmp_path / "taper.py")
    return taper.main([*BASE, *map(str, args), "--out", out]), out


def test_gfa_widths_follow_the_fan_in_at_the_bases_own_budget(tmp_path):
    """Fan-in 5, 4, 3, 2 (mean 3.5) times 16 heads and 512 FFN, rounded to 1 head and 64: by hand
    22.9, 18.3, 13.7, 9.1 -> 23, 18, 14, 9 heads; 731, 585, 439, 293 -> 704, 576, 448, 320. They sum to the
    base's 64 heads and 2048 FFN units, so the model costs exactly the base's FLOPs."""
    cfg, out = make(tmp_path, "--profile", "gfa")
    assert cfg.layer_heads() == [23, 18, 14, 9] and cfg.layer_ffn() == [704, 576, 448, 320]
    assert flops_by_hand(cfg) == flops_by_hand(gpt_config(BASE))
    # the file is a config: alone, after its scale, and as bench.py's item it gives this model
    assert gpt_config([out]) == cfg and gpt_config([f"{ROOT}/config/tiny.py", out]) == cfg
    assert load_config(out) == cfg
    text = open(out).read()
    assert "profile gfa" in text and "n_head = [23, 18, 14, 9]" in text and "F_d = 0" in text


@pytest.mark.parametrize("profile", ["gfa", "increasing", "narrow_middle", "linear", "step"])
def test_every_profile_spends_the_budget_of_fewer_layers(tmp_path, profile):
    """At the 3-layer budget (FLOPs, by hand) each 4-layer schedule costs at most that, and no more than
    one rounding step below it; its shape is the profile's."""
    extra = ["--parts", "both"] if profile == "step" else []   # attention alone cannot give up a layer's cost
    cfg, _ = make(tmp_path, "--profile", profile, "--target_layers", 3, "--ffn_multiple", 8, *extra)
    target = flops_by_hand(gpt_config(BASE + ["--n_layer=3"]))
    got = flops_by_hand(cfg)
    assert 0 <= target - got <= 2 * (2 * 4 * 128 * 8 + 2 * 8 * 129), (target, got)   # a head of slack, at most
    h, f = np.array(cfg.layer_heads()), np.array(cfg.layer_ffn())
    if profile == "gfa":
        assert (np.diff(h) < 0).all() and (np.diff(f) < 0).all()
    elif profile == "increasing":   # OpenELM: attention 0.5 -> 1, FFN 0.5 -> 4 times
        assert (np.diff(h) > 0).all() and (np.diff(f) > 0).all() and f[-1] / f[0] == pytest.approx(8, rel=0.1)
        assert h[-1] / h[0] == pytest.approx(2, rel=0.15)
    elif profile == "narrow_middle":
        assert h[0] == h[-1] > h[1] == h[2] and f[0] == f[-1] > f[1] == f[2]
    elif profile == "linear":   # the paper's F taper: FFN from the base width down, attention untouched
        assert list(h) == [16] * 4 and f[0] == 512 and (np.diff(f) < 0).all()
    else:   # the paper's A taper (here on both widths): steps of 2 layers from the base width
        assert h[0] == h[1] == 16 and h[2] == h[3] < 16 and f[0] == f[1] == 512 and f[2] == f[3] < 512


def test_uniform_is_fewer_layers_and_budgets_count_params_too(tmp_path):
    cfg, _ = make(tmp_path, "--profile", "uniform", "--target_layers", 3)
    assert cfg.n_layer == 3 and cfg.layer_heads() == [16] * 3 and cfg.layer_ffn() == [512] * 3
    # a parameter budget: d_model 128, 16 heads of 8, FFN 512: 2 * 128 + 4 * 128 * 128 + 3 * 128 * 512 a layer
    layer = 2 * 128 + 4 * 128 * 128 + 3 * 128 * 512
    target = 2 * 256 * 128 + 128 + 2.5 * layer   # embeddings, final norm, two and a half layers
    assert make(tmp_path, "--profile", "uniform", "--budget", "params", "--target", target)[0].n_layer == 2
    half, _ = make(tmp_path, "--profile", "gfa", "--strength", 0, "--budget", "params", "--target", target)
    assert half.n_layer == 4 and len(set(half.layer_heads())) == 1 and half.layer_heads()[0] < 16


def test_measured_profile_takes_attention_and_mlp_from_their_own_shares(tmp_path):
    """A run whose attention gradient falls with depth and whose MLP gradient rises: heads fall, FFN sizes rise."""
    model = tiny_model(0, vocab_size=256, block_size=128, d_model=128, head_dim=8, d_attn0=128, d_ffn0=512)
    rows = [[1.0] + [v for l in range(4) for v in (4.0 - l, 1.0 + l)] + [1.0]] * 5
    run = write_run(tmp_path / "run", model, rows=rows, sublayers=True)
    cfg, _ = make(tmp_path, "--profile", "measured", "--run", run)
    # shares 0.4 .. 0.1 and 0.1 .. 0.4 (mean 0.25): 16 x 1.6, 1.2, 0.8, 0.4 heads; 512 x 0.4 .. 1.6 FFN
    assert cfg.layer_heads() == [26, 19, 13, 6] and cfg.layer_ffn() == [192, 384, 640, 832]
    other = write_run(tmp_path / "other", tiny_model(0, n_layer=3))
    with pytest.raises(UserError, match="has 3 layers, the base config 4"):
        make(tmp_path, "--profile", "measured", "--run", other)


@pytest.mark.parametrize("args, words", [
    (["--profile", "measured"], "--run goes with --profile measured"),
    (["--run", "out/x"], "--run goes with --profile measured"),
    (["--target", "1e6", "--target_layers", "3"], "not both"),
    (["--strength", "2"], "--strength 2.0: must be in [0, 1]"),
    (["--target", "1e5"], "the budget is too small for the gfa profile"),
    (["--profile", "uniform", "--target", "1e5"], "too small for even one layer"),
    (["--profile", "cone"], "--profile cone: no such profile; give one of: gfa - widths in proportion"),
    (["--step_every", "0"], "--step_every 0: must be >= 1"),
    (["--repeats=[1,1,1,2]", "--profile", "uniform", "--target_layers", "3"], "per-layer repeats"),
    (["--n_kv_head=4"], "give --head_multiple 4"),
])
def test_bad_input(tmp_path, capsys, args, words):
    out = tmp_path / "never.py"
    assert words in one_line_error(taper.main, [*BASE, *args, "--out", out], capsys)
    assert not out.exists()


def test_a_profile_registered_elsewhere_works_through_main_with_no_other_edit(tmp_path, monkeypatch, capsys):
    """A toy proportional profile with gfa's shape at another scale (10, 8, 6, 4) gives gfa's hand-computed widths
    above; a toy fitting profile is used as it fits; --help and the unknown-profile error list both."""
    monkeypatch.setattr(taper, "PROFILES", dict(taper.PROFILES))   # registered here, gone after the test
    taper.proportional("toy_fan_in", "a toy: the fan-in 5, 4, 3, 2 doubled")(
        lambda cfg, args: {"attn": [10, 8, 6, 4], "ffn": np.array([10.0, 8, 6, 4])})
    taper.profile("toy_fixed", "a toy: 8 heads and 256 FFN in two layers", parts="ffn")(
        lambda cfg, args, target, measure: taper.with_widths(cfg, [8, 8], [256, 256]))
    cfg, out = make(tmp_path, "--profile", "toy_fan_in")
    assert cfg.layer_heads() == [23, 18, 14, 9] and cfg.layer_ffn() == [704, 576, 448, 320]
    assert "# Made by taper.py: profile toy_fan_in, parts both, strength 1\n" in open(out).read()
    cfg, out = make(tmp_path, "--profile", "toy_fixed")
    assert cfg.layer_heads() == [8, 8] and cfg.layer_ffn() == [256, 256] and gpt_config([out]) == cfg
    assert "profile toy_fixed, parts ffn\n" in open(out).read()
    with pytest.raises(SystemExit):
        taper.main(["--help"])
    assert "toy_fixed      a toy: 8 heads and 256 FFN in two layers" in capsys.readouterr().out
    error = one_line_error(taper.main, [*BASE, "--profile", "cone", "--out", tmp_path / "never.py"], capsys)
    assert "toy_fan_in - a toy: the fan-in 5, 4, 3, 2 doubled; toy_fixed - a toy" in error
