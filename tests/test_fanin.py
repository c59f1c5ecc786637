"""fanin.py: the theory table of a config, the passthrough importance against an independent
hand-written forward, and the CLI + figures on tiny run directories written as train.py and
resnet.py write them (the share over the steps the checkpoint saw, the importance cache)."""
import json
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fanin
from gfa import rundir
from gfa.cli import UserError
from gfa.data import eval_batches
from gfa.theory import accumulated_share, fanin_deep_supervision
from helpers import one_line_error, tiny_model, write_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(capsys, *args):
    capsys.readouterr()
    fanin.main([str(a) for a in args])
    return capsys.readouterr().out


def fanin_column(out):
    """The 'this run' fan-in column of --theory's fan-in table (after model.describe's table)."""
    lines = out.split("gradient fan-in")[1].splitlines()
    return [int(line.split()[5]) for line in lines if line.split() and line.split()[0].isdigit()]


def test_theory_cli_reads_configs_and_overrides(capsys):
    out = _main(capsys, "--theory", f"{ROOT}/config/tiny.py", f"{ROOT}/config/virtual_depth.py")
    assert "virtual depth" in out and "[1,1,1,1,2,3,3,5]" in out   # the paper's inconsistency, shown to the user
    assert fanin_column(out) == [18, 17, 16, 15, 27, 33, 24, 20]
    out = _main(capsys, "--theory", f"{ROOT}/config/tiny.py", f"{ROOT}/config/layerskip.py", "--n_layer=4")
    assert fanin_column(out) == [15, 10, 6, 3]
    # the architecture comes first (model.describe): the paper's A2 heads and parameter count
    out = _main(capsys, "--theory", f"{ROOT}/config/cascade_a2.py")
    arch = out.split("gradient fan-in")[0]
    heads = [int(line.split()[1]) for line in arch.splitlines() if line.split() and line.split()[0].isdigit()]
    assert heads == [h for h in range(32, 17, -2) for _ in range(2)] and "params: 1221036032" in arch


def test_theory_cli_errors(capsys):
    assert "passthrough index 16" in one_line_error(
        fanin.main, ["--theory", f"{ROOT}/config/cascade_a2.py", "--passthrough=[16]"], capsys)
    assert "does not exist" in one_line_error(fanin.main, ["--theory", f"{ROOT}/config/nope.py"], capsys)


# ---- importance and the CLI on tiny runs --------------------------------------------------------
TINY = dict(vocab_size=64, block_size=16)


def make_run(tmp, name="run", n_steps=30, seed=0, iter_num=100, **over):
    """A run directory as train.py writes it (front-loaded norms with noise), plus a val.bin beside it."""
    model = tiny_model(seed, **TINY, **over)
    data = tmp / "val.bin"
    if not data.exists():
        np.random.default_rng(0).integers(0, 64, 4000).astype(np.uint16).tofile(data)
    N = model.config.n_layer
    rows = [[1.0] + [(N - l + 1) * (1 + 0.1 * math.sin(s + l)) for l in range(N)] + [1.0] for s in range(n_steps)]
    write_run(tmp / name, model, rows=rows, iter_num=iter_num, train_config={"dataset": "fake"})
    return tmp / name, data


def hand_ppl(model, data, skip, T=16, B=4, nb=3):
    """Perplexity with block `skip` (an index or a set of them) removed, by a forward written
    out here (not GPT.forward)."""
    skip = {skip} if isinstance(skip, int) else set(skip or ())
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for x, y in eval_batches(data, T, B, nb):
            h = model.tok_emb(x)
            cos, sin = model.rope_cos[:T], model.rope_sin[:T]
            for i, blk in enumerate(model.blocks):
                if i not in skip:
                    for _ in range(model.repeats[i]):
                        h = blk(h, cos, sin)
            logits = model.lm_head(model.norm_f(h))
            tot += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
            cnt += y.numel()
    return math.exp(tot / cnt)


@pytest.mark.parametrize("repeats", [[], [1, 2, 1, 3]])
def test_importance_equals_hand_passthrough(tmp_path, repeats):
    torch.manual_seed(0)
    model = tiny_model(0, **TINY, repeats=repeats)
    data = np.random.default_rng(0).integers(0, 64, 3000).astype(np.uint16)
    base, ablated = fanin.compute_importance(model, data, 16, 4, 3, "cpu", log=lambda *a: None)
    assert base == pytest.approx(hand_ppl(model, data, None), rel=1e-5)
    for i in range(4):
        assert ablated[i] - base == pytest.approx(hand_ppl(model, data, i) - hand_ppl(model, data, None),
                                                  rel=1e-4, abs=1e-5)
    assert model.passthrough == frozenset()   # restored


def test_importance_adds_to_the_runs_passthrough(monkeypatch):
    # a run configured with layer 1 passed through: ablating layer 0 skips {0, 1}, not just {0}
    evaluated = []
    real = fanin.evaluate
    monkeypatch.setattr(fanin, "evaluate", lambda m, *a: evaluated.append(m.passthrough) or real(m, *a))
    model = tiny_model(0, **TINY, passthrough=[1])
    data = np.random.default_rng(0).integers(0, 64, 3000).astype(np.uint16)
    base, ablated = fanin.compute_importance(model, data, 16, 4, 3, "cpu", log=lambda *a: None)
    assert base == pytest.approx(hand_ppl(model, data, {1}), rel=1e-5)
    for i in (0, 2, 3):
        assert ablated[i] - base == pytest.approx(hand_ppl(model, data, {i, 1}) - hand_ppl(model, data, {1}),
                                                  rel=1e-4, abs=1e-5)
    assert ablated[1] == base   # already skipped: importance 0 ...
    assert evaluated == [{1}, {0, 1}, {1, 2}, {1, 3}]   # ... and not evaluated again
    assert model.passthrough == frozenset({1})   # the run's own set restored


def test_cli_full_analysis_figures_and_cache(tmp_path, capsys):
    run, data = make_run(tmp_path, "vanilla")
    out = _main(capsys, run, "--data", data, "--eval_batches", 2)
    for f in ("importance.json", "fig3_share_vs_fanin.png", "fig4_share_vs_importance.png",
              "fig678_layerwise.png", "fanin_summary.json"):
        assert (run / f).stat().st_size > 0, f
    imp = json.loads((run / "importance.json").read_text())
    assert imp["metric"] == "ppl_increase" and len(imp["importance"]) == 4
    assert imp["layer_names"] == [f"layer.{i}" for i in range(4)] and imp["settings"]["iter_num"] == 100
    assert "rho" in out and "linear R^2" in out and "dPPL" in out
    summary = json.loads((run / "fanin_summary.json").read_text())
    assert summary["runs"][0]["importance"] == imp["importance"] and summary["baseline"] is None
    # independent check of the cached numbers
    model, _ = rundir.load_gpt(run)
    data_arr = np.fromfile(data, dtype=np.uint16)
    assert imp["baseline"] == pytest.approx(hand_ppl(model, data_arr, None, nb=2), rel=1e-5)
    # the cache is reused with the same settings, recomputed when they change
    assert "from cache" in _main(capsys, run, "--data", data, "--eval_batches", 2, "--fig_dir", tmp_path / "figs")
    assert "stale" in _main(capsys, run, "--data", data, "--eval_batches", 3, "--fig_dir", tmp_path / "figs")
    assert json.loads((run / "importance.json").read_text())["settings"]["eval_batches"] == 3


def test_seeds_summary_is_mean_and_sample_std_over_the_runs(tmp_path, capsys):
    runs = [make_run(tmp_path, f"s{i}", seed=i, n_steps=20 + 5 * i)[0] for i in range(3)]
    data = tmp_path / "val.bin"
    out = fanin.main([str(r) for r in runs] + ["--seeds", "--data", str(data), "--eval_batches", "1",
                                                 "--fig_dir", str(tmp_path / "figs")])
    per_run, seeds = out["runs"], out["seeds"]
    for key, got in (("rho_theory", seeds["stats"]["rho_theory"]), ("rho", seeds["stats"]["rho_importance"])):
        v = np.array([r[key] for r in per_run])
        assert got[0] == pytest.approx(v.mean()) and got[1] == pytest.approx(v.std(ddof=1))
    share = np.array([r["share"] for r in per_run])
    assert [m for m, _ in seeds["share"]] == pytest.approx(share.mean(0).tolist())
    assert [s for _, s in seeds["share"]] == pytest.approx(share.std(0, ddof=1).tolist())
    assert (tmp_path / "figs" / "fig3_seeds.png").stat().st_size > 0
    other = make_run(tmp_path, "deep", deep_supervision=True)[0]
    with pytest.raises(UserError, match="different architectures"):
        fanin.main([str(runs[0]), str(other), "--seeds", "--no_importance"])


def test_cli_baseline_virtual_depth_and_resnet(tmp_path, capsys):
    base, data = make_run(tmp_path, "vanilla")
    virt, _ = make_run(tmp_path, "virtual", repeats=[1, 1, 2, 3], seed=1)
    ls, _ = make_run(tmp_path, "layerskip", deep_supervision=True, seed=2)
    figs = tmp_path / "figs"
    out = _main(capsys, virt, ls, "--baseline", base, "--data", data, "--eval_batches", 1, "--fig_dir", figs)
    assert "[1,1,1,1,2,3,3,5]" in out   # the note is printed for the virtual-depth run
    names = sorted(os.listdir(figs))
    assert "fig3_share_vs_fanin.png" in names and "virtual_fig5_vs_vanilla.png" in names
    assert "layerskip_fig4_share_vs_importance.png" in names
    summary = json.loads((figs / "fanin_summary.json").read_text())
    assert summary["runs"][0]["theory"] == [8, 7, 11, 9]   # virtual depth [1, 1, 2, 3], by hand above
    assert summary["runs"][1]["theory"] == fanin_deep_supervision(4)
    assert summary["baseline"]["name"] == "vanilla" and len(summary["baseline"]["importance"]) == 4
    # a ResNet run (resnet.py): its own importance.json (its checkpoint is not needed)
    rn = tmp_path / "resnet"
    rundir.write_model_config(str(rn), "resnet", {"num_classes": 10, "in_channels": 1, "small_stem": True, "width": 4})
    names16 = ["stem"] + [f"layer.{i}" for i in range(16)] + ["head"]
    dump = rundir.GradNormDump(names16, str(rn / "grad_norms.npz"))
    for s in range(5):
        dump.record(s, torch.tensor([1.0] + [17.0 - l for l in range(16)] + [1.0]))
    dump.flush()
    (rn / "importance.json").write_text(json.dumps({"metric": "top1_drop", "baseline": 0.9,
                                                    "importance": [0.2 - 0.01 * l for l in range(16)],
                                                    "layer_names": names16[1:-1]}))
    out = _main(capsys, rn)
    assert "rho = 1.000" in out and (rn / "fig678_layerwise.png").exists()


def test_cli_user_errors(tmp_path):
    with pytest.raises(UserError, match="not a run directory"):
        fanin.main([str(tmp_path / "nope")])
    run, _ = make_run(tmp_path, "x")
    with pytest.raises(UserError, match="--data"):
        fanin.main([str(run), "--data", str(tmp_path / "missing.bin")])
    with pytest.raises(UserError, match="unknown argument"):
        fanin.main([str(run), "--n_layer=3"])
    # a baseline with a model_config.json but nothing to take importance from (no ckpt.pt, no importance.json)
    nb, data = make_run(tmp_path, "no_importance")
    os.remove(os.path.join(nb, "ckpt.pt"))   # a run before its first checkpoint
    other, _ = make_run(tmp_path, "y")
    with pytest.raises(UserError, match=re.escape(f"baseline {nb} has no importance")):
        fanin.main([str(other), "--baseline", str(nb), "--data", str(data), "--eval_batches", "1"])
    assert not os.path.exists(os.path.join(other, "importance.json"))   # it failed before measuring anything


def test_share_covers_the_steps_the_checkpoint_saw(tmp_path, capsys):
    """The dump runs ahead of the checkpoint (it is flushed at every log interval): the share is
    taken over the steps before the checkpoint's iter_num only, and the report says which."""
    run, _ = make_run(tmp_path, "ahead", n_steps=30, iter_num=20)
    out = _main(capsys, run, "--no_importance")
    summary = json.loads((run / "fanin_summary.json").read_text())["runs"][0]
    rows = np.load(run / "grad_norms.npz")["norms"]
    assert rows.shape[0] == 30 and summary["steps"] == 20 and summary["step_range"] == [0, 19]
    names = ["embed"] + [f"layer.{i}" for i in range(4)] + ["head"]
    np.testing.assert_allclose(summary["share"], accumulated_share(rows[:20], names))
    assert not np.allclose(summary["share"], accumulated_share(rows, names))
    assert "share over 20 logged steps (0-19)" in out
    os.remove(run / "ckpt.pt")   # before its first checkpoint: every logged step
    assert fanin.main([str(run), "--no_importance"])["runs"][0]["steps"] == 30


def test_sub_block_shares_and_drift_of_a_run(tmp_path, capsys):
    """A dump with attention and MLP apart: attention norms planted falling 4:3:2:1, MLP rising 1:2:3:4
    (whole layers: sqrt(17), sqrt(13), sqrt(13), sqrt(17)). The report shows each kind's share and that
    they disagree (rho -1)."""
    model = tiny_model(0, **TINY)
    rows = [[1.0] + [v for l in range(4) for v in (4.0 - l, 1.0 + l)] + [1.0] for _ in range(12)]
    run = write_run(tmp_path / "sub", model, rows=rows, iter_num=12, sublayers=True)
    out = _main(capsys, run, "--no_importance")
    r = json.loads((tmp_path / "sub" / "fanin_summary.json").read_text())["runs"][0]
    assert r["sub_share"]["attn"] == pytest.approx([0.4, 0.3, 0.2, 0.1])
    assert r["sub_share"]["mlp"] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    layers = np.sqrt([17, 13, 13, 17])
    assert r["share"] == pytest.approx(layers / layers.sum()) and r["rho_attn_mlp"][0] == pytest.approx(-1.0)
    assert "attn %" in out and "Spearman attn share vs mlp share: rho = -1.000" in out
    assert "share drift" in out and r["drift"]["steps"][-1] == 11
    for f in ("fig_subblocks.png", "fig_share_drift.png"):
        assert (tmp_path / "sub" / f).stat().st_size > 0


def test_importance_cache_belongs_to_the_weights(tmp_path, capsys):
    """Another model in the same folder at the same step (a retrain, a copied checkpoint) must not
    be served the first model's importance: the cache is keyed on a hash of the weights."""
    run, data = make_run(tmp_path, "r", iter_num=50)
    first = fanin.main([str(run), "--data", str(data), "--eval_batches", "1"])
    other = tiny_model(7, **TINY)
    ckpt = rundir.read_checkpoint(str(run))
    rundir.save_gpt(str(run), other, ckpt["train_config"], ckpt["iter_num"])   # same step, other weights
    capsys.readouterr()
    again = fanin.main([str(run), "--data", str(data), "--eval_batches", "1"])
    assert "stale" in capsys.readouterr().out
    assert again["runs"][0]["importance"] != first["runs"][0]["importance"]
    assert again["runs"][0]["baseline"] == pytest.approx(hand_ppl(other, np.fromfile(data, np.uint16), None, nb=1),
                                                         rel=1e-5)


def test_layerwise_figure_gives_each_quantity_its_own_axis(tmp_path, monkeypatch):
    """fig678: two panels on one layer axis, no twin axis: the share beside the fan-in normalised to sum 1 (linear,
    from 0) above, the importance alone below (log when it spans > 50x, linear otherwise)."""
    figs = []
    monkeypatch.setattr(fanin, "_save", lambda fig, path: figs.append(fig))
    r = {"name": "toy", "n_layer": 4, "share": [0.4, 0.1, 0.2, 0.3], "theory": [4, 3, 2, 1], "kind": "linear",
         "rho_theory": -0.2, "p_theory": 0.9, "importance": [100.0, 0.5, 1.0, 2.0], "rho": 1.0, "p": 0.08,
         "metric": "ppl_increase"}
    fanin.fig678(r, str(tmp_path / "f.png"))
    fanin.fig678(dict(r, importance=[3.0, -0.1, 1.0, 2.0]), str(tmp_path / "g.png"))
    for fig, scale in zip(figs, ("log", "linear")):
        top, bottom = fig.axes   # two axes, no twin
        assert top.get_shared_x_axes().joined(top, bottom) and top.get_ylim()[0] == 0
        share, theory = (line.get_ydata() for line in top.get_lines())
        np.testing.assert_allclose(share, r["share"])
        np.testing.assert_allclose(theory, [0.4, 0.3, 0.2, 0.1])
        assert len(bottom.get_lines()) == 1 and bottom.get_yscale() == scale
    np.testing.assert_allclose(figs[0].axes[1].get_lines()[0].get_ydata(), r["importance"])
    for fig in figs:
        fanin._plt().close(fig)
