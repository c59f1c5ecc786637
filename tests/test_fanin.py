"""fanin.py against the paper's numbers (Appendix B.1), hand-computed Spearman cases, an
independent hand-written forward for the passthrough importance, and the CLI + figures on a
tiny fake run (checkpoint + gradient dump written here, as train.py would)."""
import itertools
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fanin
from common import GradNormDump, UserError, eval_batches
from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent.parent


# ---- theory -----------------------------------------------------------------------------------
def test_plain_fanin_paper():
    assert fanin.fanin_plain(8) == [9, 8, 7, 6, 5, 4, 3, 2]
    assert fanin.fanin_plain(16)[0] == 17 and fanin.fanin_plain(16)[-1] == 2


def test_virtual_fanin_paper():
    assert fanin.fanin_general([1, 1, 1, 1, 2, 3, 3, 5], False) == [18, 17, 16, 15, 27, 33, 24, 20]
    # by hand: N_virt = 7, positions 1 | 2 | 3,4 | 5,6,7 -> 8 | 7 | 6+5 | 4+3+2
    assert fanin.fanin_general([1, 1, 2, 3], False) == [8, 7, 11, 9]


def test_deep_supervision_triangular():
    tri = lambda m: m * (m + 1) // 2
    ds = fanin.fanin_deep_supervision(16)
    assert ds[0] == 153 and ds[-1] == 3
    assert ds == [tri(16 - l + 1) for l in range(16)]
    # Eq. 5: phi_l plus the auxiliary heads after blocks k = l..N-1, each adding (k - l) + 1
    for N in (1, 4, 8):
        assert fanin.fanin_deep_supervision(N) == [(N - l + 1) + sum(k - l + 1 for k in range(l, N)) for l in range(N)]


def test_general_reduces_and_theory_for():
    assert fanin.fanin_general([1] * 8, False) == fanin.fanin_plain(8)
    assert fanin.fanin_general([1] * 16, True) == fanin.fanin_deep_supervision(16)
    assert fanin.theory_for({"n_layer": 8, "repeats": [1, 1, 1, 1, 2, 3, 3, 5]})[0] == "virtual depth"
    assert fanin.theory_for({"n_layer": 16, "deep_supervision": True})[1][0] == 153


def _main(capsys, *args):
    capsys.readouterr()
    fanin.main([str(a) for a in args])
    return capsys.readouterr().out


def test_theory_cli_reads_config_and_overrides(capsys):
    out = _main(capsys, "--theory", ROOT / "config/tiny/virtual_depth.py")
    assert "virtual depth" in out and "[1,1,1,1,2,3,3,5]" in out   # SPEC's note shown to the user
    nums = [int(line.split()[5]) for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert nums == [18, 17, 16, 15, 27, 33, 24, 20]
    out = _main(capsys, "--theory", ROOT / "config/tiny/layerskip.py", "--n_layer=4")
    assert [int(line.split()[5]) for line in out.splitlines() if line.split() and line.split()[0].isdigit()] \
        == [15, 10, 6, 3]
    bad = subprocess.run([sys.executable, "fanin.py", "--theory", "config/tiny/vanilla_8l.py", "--n_layr=3"],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "n_layer" in bad.stderr and "Traceback" not in bad.stderr


# ---- Spearman ----------------------------------------------------------------------------------
def _brute(x, y):
    """Independent reference: Pearson of average ranks, exact p by itertools over all n!."""
    def ranks(a):
        return np.array([sum(b < v for b in a) + (sum(b == v for b in a) + 1) / 2 for v in a])
    rx, ry = ranks(x), ranks(y)
    r = lambda a, b: float(np.corrcoef(a, b)[0, 1])
    rho = r(rx, ry)
    perms = list(itertools.permutations(ry))
    return rho, sum(abs(r(rx, p)) >= abs(rho) - 1e-12 for p in perms) / len(perms)


def test_rankdata_ties():
    assert fanin.rankdata([5, 6, 7, 8, 7]).tolist() == [1, 2, 3.5, 5, 3.5]
    assert fanin.rankdata([2, 2, 2]).tolist() == [2, 2, 2]


def test_spearman_hand_cases():
    # scipy.stats.spearmanr([1,2,3,4,5], [5,6,7,8,7]) = 0.8207826816681233: the Pearson correlation
    # of average ranks, 8 / sqrt(10 * 9.5). (1 - 6 sum d^2 / (n(n^2-1)) = 0.825 ignores the tie.)
    rho, p = fanin.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7])
    assert rho == pytest.approx(8 / math.sqrt(95), abs=1e-12) == pytest.approx(0.8207826816681233)
    assert p == pytest.approx(_brute([1, 2, 3, 4, 5], [5, 6, 7, 8, 7])[1])
    assert p == pytest.approx(16 / 120)   # 16 of the 120 rank orderings reach |rho| >= 0.8208
    rho, p = fanin.spearman([1, 2, 3, 4], [10, 20, 30, 40])
    assert rho == 1.0 and p == pytest.approx(2 / 24)   # identity and reversal, two-sided
    rho, p = fanin.spearman([1, 2, 3, 4], [4, 3, 2, 1])
    assert rho == -1.0 and p == pytest.approx(2 / 24)
    assert all(math.isnan(v) for v in fanin.spearman([1, 2, 3], [7, 7, 7]))


def test_spearman_matches_bruteforce_with_ties():
    rng = np.random.default_rng(1)
    for n in (5, 6, 7):
        x, y = rng.integers(0, 4, n), rng.integers(0, 5, n)
        if len(set(x)) > 1 and len(set(y)) > 1:
            assert fanin.spearman(x, y) == pytest.approx(_brute(x, y))


def test_spearman_monte_carlo_deterministic_and_close_to_exact():
    x = np.arange(10)
    y = np.array([1, 0, 3, 2, 6, 4, 5, 9, 7, 8]) * 1.0 + np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 0.5])
    rho, p_exact = fanin.spearman(x, y)                       # n = 10: all 10! permutations
    a = fanin.spearman(x, y, exact_max_n=0, n_perm=100_000)   # forced Monte Carlo
    assert a == fanin.spearman(x, y, exact_max_n=0, n_perm=100_000)   # fixed seed: deterministic
    assert a[0] == rho and abs(a[1] - p_exact) < 4 * math.sqrt(p_exact / 100_000) + 1e-5
    rho16, p16 = fanin.spearman(np.arange(16), np.arange(16) ** 2)
    assert rho16 == 1.0 and p16 == pytest.approx(1 / 200_001)   # no random permutation reaches it


def test_fit_decay_verdict():
    assert fanin.fit_decay(fanin.fanin_plain(16), 16)["verdict"] == "linear"
    assert fanin.fit_decay(fanin.fanin_deep_supervision(16), 16)["verdict"] == "quadratic"
    assert fanin.fit_decay(fanin.fanin_plain(8)[::-1], 8)["verdict"].startswith("neither")


# ---- importance and the CLI on a tiny fake run -----------------------------------------------------
TINY = dict(vocab_size=64, block_size=16, d_model=32, n_layer=4, head_dim=8, d_attn0=32, S_d=8, d_ffn0=64)


def make_run(tmp, name="run", n_steps=30, seed=0, iter_num=100, **over):
    """A run directory as train.py writes it: ckpt.pt (CONTRACT format) + grad_norms.npz; plus val.bin."""
    torch.manual_seed(seed)
    cfg = GPTConfig(**(TINY | over))
    model = GPT(cfg)
    run = tmp / name
    run.mkdir()
    data = tmp / "val.bin"
    if not data.exists():
        np.random.default_rng(0).integers(0, 64, 4000).astype(np.uint16).tofile(data)
    torch.save({"model": model.state_dict(), "model_config": asdict(cfg), "iter_num": iter_num,
                "train_config": {"dataset": "fake", "block_size": 16, "batch_size": 4, "seed": 1}}, run / "ckpt.pt")
    groups = list(model.param_groups_by_layer())
    dump = GradNormDump(groups, str(run / "grad_norms.npz"))
    N = cfg.n_layer
    for s in range(n_steps):   # a front-loaded profile with noise
        dump.record(s, torch.tensor([1.0] + [(N - l + 1) * (1 + 0.1 * math.sin(s + l)) for l in range(N)] + [1.0]))
    dump.flush()
    return run, data


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
    model = GPT(GPTConfig(**TINY, repeats=repeats)).eval()
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
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, passthrough=[1])).eval()
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
    model = GPT(GPTConfig(**TINY))
    model.load_state_dict(torch.load(run / "ckpt.pt")["model"])
    data_arr = np.fromfile(data, dtype=np.uint16)
    assert imp["baseline"] == pytest.approx(hand_ppl(model, data_arr, None, nb=2), rel=1e-5)
    # the cache is reused with the same settings, recomputed when they change
    assert "from cache" in _main(capsys, run, "--data", data, "--eval_batches", 2, "--fig_dir", tmp_path / "figs")
    assert "stale" in _main(capsys, run, "--data", data, "--eval_batches", 3, "--fig_dir", tmp_path / "figs")
    assert json.loads((run / "importance.json").read_text())["settings"]["eval_batches"] == 3


def test_cli_baseline_virtual_depth_and_resnet(tmp_path, capsys):
    base, data = make_run(tmp_path, "vanilla")
    virt, _ = make_run(tmp_path, "virtual", repeats=[1, 1, 2, 3], seed=1)
    ls, _ = make_run(tmp_path, "layerskip", deep_supervision=True, seed=2)
    figs = tmp_path / "figs"
    out = _main(capsys, virt, ls, "--baseline", base, "--data", data, "--eval_batches", 1, "--fig_dir", figs)
    assert "[1,1,1,1,2,3,3,5]" in out   # SPEC's note is printed for the virtual-depth run
    names = sorted(os.listdir(figs))
    assert "fig3_share_vs_fanin.png" in names and "virtual_fig5_vs_vanilla.png" in names
    assert "layerskip_fig4_share_vs_importance.png" in names
    summary = json.loads((figs / "fanin_summary.json").read_text())
    assert summary["runs"][0]["theory"] == [8, 7, 11, 9]   # virtual depth [1, 1, 2, 3], by hand above
    assert summary["runs"][1]["theory"] == fanin.fanin_deep_supervision(4)
    assert summary["baseline"]["name"] == "vanilla" and len(summary["baseline"]["importance"]) == 4
    # a ResNet run (resnet.py): no ckpt.pt, its own importance.json
    rn = tmp_path / "resnet"
    rn.mkdir()
    names16 = ["stem"] + [f"layer.{i}" for i in range(16)] + ["head"]
    dump = GradNormDump(names16, str(rn / "grad_norms.npz"))
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
    (nb / "ckpt.pt").unlink()
    (nb / "model_config.json").write_text(json.dumps(TINY))
    other, _ = make_run(tmp_path, "y")
    with pytest.raises(UserError, match=re.escape(f"baseline {nb} has no importance")):
        fanin.main([str(other), "--baseline", str(nb), "--data", str(data), "--eval_batches", "1"])
    assert not (other / "importance.json").exists()   # it failed before measuring anything
