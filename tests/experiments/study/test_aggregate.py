"""experiments/study/aggregate.py over hand-made study folders: runs found per config in seed order (seed 10 after
seed 2, other configs and tags left out), each seed's share and importance as hand-computed, the overview
figure, and a one-line error when no run has been analysed."""
import importlib.util
import json
import os

import numpy as np
import pytest

from gfa import rundir
from helpers import tiny_model, write_run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from experiments.study import aggregate as study_numbers  # noqa: E402


def analysed_run(study, name, layer_norms, importance):
    """A run as study.sh leaves it after fanin.py: per-layer dump rows (every step the same) and importance."""
    model = tiny_model()
    names = list(model.param_groups_by_layer(False))
    row = [layer_norms[int(n.split(".")[1])] if n.startswith("layer.") else 9.0 for n in names]
    run = write_run(os.path.join(study, name), model, rows=[row] * 3)
    rundir.write_importance(run, {"metric": "ppl_increase", "baseline": 30.0, "importance": importance})
    return run


def test_seed_runs_profiles_and_the_overview_figure(tmp_path):
    study = str(tmp_path / "study")
    n = tiny_model().config.n_layer
    norms = {2: [4.0, 3.0, 2.0, 1.0][:n], 10: [1.0] * n}
    for seed, layer_norms in norms.items():
        analysed_run(study, f"small_vanilla_16l_s{seed}", layer_norms, [float(seed)] * n)
    analysed_run(study, "small_vanilla_16l_mixln_s1", [1.0] * n, [5.0] * n)   # another config: not a seed
    os.makedirs(os.path.join(study, "small_vanilla_16l_s3"))                  # not analysed: no importance

    runs = study_numbers.seed_runs("vanilla_16l", study)
    assert [os.path.basename(r) for r in runs] == ["small_vanilla_16l_s2", "small_vanilla_16l_s3",
                                                   "small_vanilla_16l_s10"]
    share, imp = study_numbers.profiles("vanilla_16l", study)
    expected = [100 * np.array(norms[s]) / sum(norms[s]) for s in (2, 10)]   # Eq. 2 of constant rows: norm / sum
    np.testing.assert_allclose(share, expected)
    np.testing.assert_allclose(imp, [[2.0] * n, [10.0] * n])

    fig = tmp_path / "figs" / "overview.png"
    study_numbers.overview_figure(str(fig), configs=(("vanilla_16l", "Pre-LN"), ("vanilla_16l_mixln", "Mix-LN"),
                                                     ("layerskip", "none trained")), study=study)
    assert fig.stat().st_size > 10_000


def test_no_analysed_run_is_a_one_line_error(tmp_path):
    os.makedirs(tmp_path / "study" / "small_vanilla_16l_s1")
    with pytest.raises(study_numbers.UserError, match="run fanin.py on them first"):
        study_numbers.overview_figure(str(tmp_path / "o.png"), study=str(tmp_path / "study"))
    assert not (tmp_path / "o.png").exists()


def test_drift_rows_read_the_share_drift_as_hand_computed(tmp_path):
    """At step t the rho of the last logged step <= t; the first step below zero; the settle step as recorded."""
    summary = tmp_path / "fanin_summary.json"
    drift = {"steps": [0, 100, 150, 400, 1000, 1500], "rho_theory": [1.0, 0.9, 0.5, 0.2, -0.1, -0.3], "settled": 900}
    summary.write_text(json.dumps({"runs": [{"name": "small_vanilla_16l_s1", "drift": drift}]}))
    assert list(study_numbers.drift_rows(str(summary))) == [("small_vanilla_16l_s1", [0.9, 0.5, 0.2, -0.1], 1000, 900)]
