"""experiments/recipe/aggregate.py's decision rules, on hand-made values: rule 1 (keeps / overturns / mixed),
rule 3's interpolation of the step at a held-out PPL, rule 7 (restores / lowers / does not restore), the
equalisation factor from dumped norms, rule 6's sweep pick from train.py-style logs, and the SGD arms'
settings at the pick (`--sgd_args`)."""
import math

import numpy as np
import pytest

from experiments.recipe import aggregate as recipe
from gfa import rundir
from helpers import one_line_error


def test_rule_1_keeps_overturns_mixed():
    keep = [{"rho": 0.9, "p": 1e-4}, {"rho": 0.5, "p": 0.01}]
    assert recipe.arm_verdict(keep) == "keeps"
    assert recipe.arm_verdict(keep + [{"rho": 0.3, "p": 0.2}]) == "mixed"   # positive but not significant
    assert recipe.arm_verdict([{"rho": -0.2, "p": 0.4}, {"rho": -0.6, "p": 0.01}]) == "overturns"


def test_rule_3_step_at_ppl_interpolates_log_ppl():
    r = {"eval_steps": np.array([0, 250, 500]), "eval_ppl": np.array([1000.0, 100.0, 10.0])}
    assert recipe.step_at_ppl(r, 100.0) == 250
    assert recipe.step_at_ppl(r, 10 ** 1.5) == 375   # halfway in log-PPL between 100 and 10
    assert recipe.step_at_ppl(r, 5.0) is None


@pytest.mark.parametrize("equalised, verdict", [([0.50, 0.45], "restores"), ([0.10, 0.12], "lowers"),
                                                ([0.25, 0.27], "does not restore"), ([0.25, 0.40], "inconclusive")])
def test_rule_7(equalised, verdict):
    assert recipe.restore_verdict(equalised, [0.20, 0.27, 0.34]) == verdict   # baseline mean 0.27, range 0.20-0.34


def test_an_arm_whose_runs_all_stopped_non_finite_gets_a_row_from_its_logs(tmp_path):
    """Rule 7 reads a diverged arm from its console logs: the stop step per seed, no verdict; a log that ended
    normally, or one of an arm that is not an equalisation, is not a divergence."""
    (tmp_path / "eq_lr2e-4_s1.txt").write_text("step 250 | val loss 7.25 | val ppl 1409.21\nerror: non-finite loss "
                                               "or gradient at step 275: stopped (the last good checkpoint ...)\n")
    (tmp_path / "eq_lr2e-4_s2.txt").write_text("error: non-finite loss or gradient at step 943: stopped\n")
    (tmp_path / "eq_mean_lr2e-4_s1.txt").write_text("step 3000 | val loss 4.08 | val ppl 59.1\n")
    (tmp_path / "lr2e-4_s1.txt").write_text("error: non-finite loss or gradient at step 5: stopped\n")
    diverged = recipe.diverged_runs(tmp_path)
    assert diverged == {"eq_lr2e-4": [(1, 275), (2, 943)]}
    base = [{"late": 0.2, "ppl": 59.0, "late_factor": 4.0}, {"late": 0.3, "ppl": 60.0, "late_factor": 5.0}]
    rows = recipe.equalisation_table({"lr2e-4": base}, diverged)
    assert rows[-1] == ("| eq_lr2e-4 | lr2e-4 | none: non-finite (seed 1 at step 275, seed 2 at step 943) | 20 / 30 % | "
                        "no verdict (diverged) | - | 59.50 | - | - / 4.50 |")


def test_late_factor():
    """Layers 2-3 (the late half of 4) at norms 1 and 4 against the largest 4: factors 4 and 1, mean 2.5; a zero
    norm has factor 1, as gfa.training.GradStep gives it."""
    assert recipe.late_factor(np.array([[4.0, 2.0, 1.0, 4.0]] * 3)) == pytest.approx(2.5)
    assert recipe.late_factor(np.array([[4.0, 2.0, 0.0, 4.0]])) == pytest.approx(1.0)


def test_rule_6_sweep_picks_the_lowest_ppl_at_step_500_once_the_grid_is_complete(tmp_path):
    def log(lr, ppls):
        d = tmp_path / f"small_vanilla_16l_sgd_lr{lr}_s1"
        d.mkdir()
        rundir.write_identity(str(d), {"recipe": {"weight_decay": 2e-5 / float(lr)}})
        lines = [f"step {s} | val loss {math.log(p):.4f} | val ppl {p:.2f}" for s, p in zip((0, 250, 500), ppls)]
        (d / rundir.LOG).write_text("\n".join(lines + ["step 10 | loss 5.0 | lr 1.00e-01 | grad norm 1.0"]) + "\n")
    def mark(lr):
        return next(r for r in recipe.sweep_table(str(tmp_path)) if r.startswith(f"| {lr} |")).split(" | ")[-1][:-2]
    log("0.01", [1000, 300, 200])
    log("0.1", [1000, 250, 120])
    assert mark("0.1") == "best so far (not run: 0.03, 0.3, 1)"   # no pick before the grid is complete
    log("0.03", [1000, 260, 150])
    log("0.3", [1000, 240, 110])
    log("1", [1000, 400])   # stopped (non-finite) before step 500: out, but it bounds the grid
    rows = recipe.sweep_table(str(tmp_path))
    picked = [r for r in rows if r.endswith("| picked |")]
    assert len(picked) == 1 and picked[0].startswith("| 0.3 | 6.66667e-05 | 240.00 | 110.00")
    assert any(r.startswith("| 1 | 2e-05 | 400.00 | - |") for r in rows)
    assert recipe.picked_lr(str(tmp_path)) == 0.3
    log("3", [1000, 200, 100])   # the best at the largest lr that ran: the grid grows that way first
    assert mark("3") == "at the grid's end: extend it ~3x that way"
    with pytest.raises(recipe.UserError, match="picked no lr yet .best 3: at the grid's end"):
        recipe.picked_lr(str(tmp_path))


def test_sgd_args_are_the_settings_the_sweep_ran_with(tmp_path, capsys):
    """--sgd_args=<lr> gives what the committed sweep run at that lr recorded (its identity); 'picked' takes
    the sweep's pick or says in one line why there is none; a bad lr is one line too."""
    run = recipe.HERE + "/runs/sgd_sweep/small_vanilla_16l_sgd_lr0.3_s1"
    ran = rundir.read_identity(run)["recipe"]
    recipe.main(["--sgd_args=0.3"])
    args = dict(a[2:].split("=") for a in capsys.readouterr().out.split())
    assert {k: float(v) for k, v in args.items()} == {k: ran[k] for k in ("learning_rate", "min_lr", "weight_decay")}
    assert "--sgd_args=0: give a peak lr > 0" in one_line_error(recipe.main, ["--sgd_args=0"], capsys)
    assert "no SGD sweep under" in one_line_error(recipe.main, [f"--runs={tmp_path}", "--sgd_args=picked"], capsys)
