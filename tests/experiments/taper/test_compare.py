"""experiments/taper/compare.py: which held-out perplexity the taper table uses (fanin.py's evaluation when every run
has one, else every run's log), the mean ± std per config over hand-written run directories, one-line errors."""
import importlib.util
import os

import numpy as np
import pytest

from gfa import rundir
from helpers import TINY, one_line_error, tiny_model, write_run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from experiments.taper import compare  # noqa: E402


def run_dir(root, name, log_ppl, fanin_ppl=None):
    """A run as study.sh leaves it: model_config.json, log.txt with its evaluations, importance.json if given."""
    run = os.path.join(root, name)
    os.makedirs(run)
    rundir.write_model_config(run, "gpt", TINY)
    with open(rundir.file(run, rundir.LOG), "w") as f:
        f.write(f"step 0 | val loss 5.5 | val ppl 250.00\nstep 10 | loss 2.0 | lr 1e-3\nstep 20 | val loss 2.0 | "
                f"val ppl {log_ppl:.2f}\n")
    if fanin_ppl is not None:
        rundir.write_importance(run, {"metric": "ppl_increase", "baseline": fanin_ppl, "importance": [1.0] * 4})
    return run


def table_rows(out):
    lines = open(os.path.join(out, "taper_compare.md")).read().splitlines()
    return lines[0], {c[1].strip(): c for c in (line.split("|") for line in lines[2:])}


def test_every_run_with_fanins_evaluation_uses_it(tmp_path):
    runs = [run_dir(tmp_path, "small_gfa_s1", 40.0, 39.0), run_dir(tmp_path, "small_gfa_s2", 41.0, 41.0),
            run_dir(tmp_path, "small_cascade_a2_s1", 38.0, 39.5)]
    compare.main([*runs, "--out", str(tmp_path / "t")])
    header, rows = table_rows(tmp_path / "t")
    assert "fanin.py's evaluation" in header
    assert rows["gfa"][4].strip() == "40.00 ± 1.41" and rows["gfa"][5].strip() == "2"   # (39, 41): std sqrt(2)
    assert rows["cascade_a2"][4].strip() == "39.50 (one seed)"   # no fake spread from a single value
    assert "How each config spreads" not in open(tmp_path / "t" / "taper_compare.md").read()   # no dumps here


def test_a_run_without_it_puts_every_run_on_its_log(tmp_path, capsys):
    runs = [run_dir(tmp_path, "demo_gfa_s1", 7.2, 7.0), run_dir(tmp_path, "demo_gfa_s2", 7.4)]
    compare.main([*runs, "--out", str(tmp_path / "t")])
    header, rows = table_rows(tmp_path / "t")
    assert "train.py's last evaluation" in header and rows["gfa"][4].strip() == "7.30 ± 0.14"
    assert "some runs have no importance.json" in capsys.readouterr().out


@pytest.mark.parametrize("name, make, message", [("gfa_s1", True, "not named <scale>_<config>_s<seed>"),
                                                 ("small_gfa_s1", False, "has no log.txt")])
def test_bad_runs_are_one_line_errors(tmp_path, capsys, name, make, message):
    run = run_dir(tmp_path, name, 7.0) if make else str(tmp_path / name)
    assert message in one_line_error(compare.main, [run, "--out", tmp_path / "t"], capsys)
    assert not os.path.exists(tmp_path / "t")


def test_a_corrupt_dump_is_a_one_line_error(tmp_path, capsys):
    run = write_run(tmp_path / "small_gfa_s1", tiny_model(), dump=False)   # no copy in the checkpoint either
    open(rundir.file(run, rundir.LOG), "w").write("step 20 | val loss 3.0 | val ppl 20.00\n")
    rundir.write_importance(run, {"metric": "ppl_increase", "baseline": 20.0, "importance": [1.0] * 4})
    open(rundir.file(run, rundir.GRAD_DUMP), "w").write("not an npz")
    assert "is corrupt or truncated" in one_line_error(compare.main, [run, "--out", tmp_path / "t"], capsys)


def test_each_config_is_set_against_the_reference(tmp_path):
    # gfa (40, 42) vs vanilla_15l (38, 40): +2.00; each side's variance of the mean 1, df = 2, so Welch's
    # half-width is t(0.975, 2) * sqrt(2) = 4.3027 * 1.4142 = 6.085; of the 6 splits of the pooled four,
    # 4 differ by |2| or more: p = 0.67
    seeds = {"gfa": (40, 42), "vanilla_15l": (38, 40), "linear": (39,)}
    runs = [run_dir(tmp_path, f"small_{c}_s{i + 1}", v, v) for c, vs in seeds.items() for i, v in enumerate(vs)]
    compare.main([*runs, "--out", str(tmp_path / "t")])
    header, rows = table_rows(tmp_path / "t")
    assert "PPL - vanilla_15l" in header
    assert rows["gfa"][6].strip() == "+2.00 (-4.08 to +8.08; p = 0.67)"
    assert rows["vanilla_15l"][6].strip() == "reference" and rows["linear"][6].strip() == "-"   # one seed: no test


def test_the_spread_table_from_dumps_and_importance(tmp_path):
    # 4 layers, linear fan-in 5, 4, 3, 2 (ranks 4 3 2 1); every step's norms the same, so the share is their
    # proportion. Seed 1: share ranks 4 3 2 1 (rho with the fan-in +1), importance (9, 1, 2, 3) ranks 4 1 2 3:
    # sum d^2 = 0 + 4 + 0 + 4 = 8, rho = 1 - 6 * 8 / (4 * 15) = 0.2. Seed 2: share ranks 4 3 1 2: with the
    # fan-in sum d^2 = 2, rho 0.8; importance (9, 1, 2, 5) ranks 4 1 2 3 again: sum d^2 = 0 + 4 + 1 + 1 = 6,
    # rho 0.4. Means: +0.90, +0.30, layer 0's share 4 / 10 = 40 % and importance 9 in both, and the last
    # layer's importance (3 + 5) / 2 = 4.0.
    runs = []
    for seed, norms, imp in ((1, [4, 3, 2, 1], [9, 1, 2, 3]), (2, [4, 3, 1, 2], [9, 1, 2, 5])):
        run = write_run(tmp_path / f"small_gfa_s{seed}", tiny_model(), rows=[[1.0, *norms, 1.0]] * 3)
        open(rundir.file(run, rundir.LOG), "w").write("step 20 | val loss 3.0 | val ppl 20.00\n")
        rundir.write_importance(run, {"metric": "ppl_increase", "baseline": 20.0, "importance": imp})
        runs.append(run)
    compare.main([*runs, "--out", str(tmp_path / "t")])
    text = open(tmp_path / "t" / "taper_compare.md").read()
    assert "| gfa | +0.90 | +0.30 | 40.0 | 9 | 4.0 |" in text.splitlines()


def test_the_layer_figure_averages_each_configs_seeds(tmp_path):
    rng = np.random.default_rng(1)
    runs = [write_run(tmp_path / f"small_gfa_s{i}", tiny_model(), rows=1.0 + rng.random((5, 6))) for i in (1, 2)]
    for run, imp in zip(runs, ([1.0, 2.0, 3.0, 4.0], [3.0, 4.0, 5.0, 6.0])):
        rundir.write_importance(run, {"metric": "ppl_increase", "baseline": 20.0, "importance": imp})
    data = compare.layer_data({"gfa": runs})["gfa"]
    assert compare.seed_mean([imp for _, imp, _ in data]) == [2.0, 3.0, 4.0, 5.0]
    shares = [rundir.read_grad_dump(run)["share"] for run in runs]
    assert not np.allclose(*shares)   # two different seeds, so the mean is not either one
    assert np.allclose(compare.seed_mean([share for share, _, _ in data]), (np.asarray(shares[0]) + shares[1]) / 2)
    assert [list(fanin) for _, _, fanin in data] == [[5, 4, 3, 2]] * 2   # N - l + 1 over the 4 layers
    os.remove(rundir.file(runs[1], rundir.IMPORTANCE))
    assert compare.layer_data({"gfa": runs}) is None   # a seed without it: no layer panels, no second table


def test_the_layer_figure_is_drawn_without_dumps_too(tmp_path):
    runs = [run_dir(tmp_path, "demo_gfa_s1", 7.2), run_dir(tmp_path, "demo_uniform_s1", 7.3)]
    compare.main([*runs, "--out", str(tmp_path / "t")])
    assert os.path.getsize(tmp_path / "t" / "taper_layers.png") > 0
    assert not os.path.exists(tmp_path / "t" / "taper_compare.png")   # no latencies given: no trade-off plot
