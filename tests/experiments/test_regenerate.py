"""experiments/regenerate.py: the committed outputs are what their commands print today (a fast subset: the
study's pooled figures and the recipe arm's Table 1; `python experiments/regenerate.py` checks them all), and
a changed number is caught."""
import os

from experiments import regenerate


def test_committed_outputs_regenerate(capsys):
    assert regenerate.main(["--only", "study_pooled,table1_lr2e-4"]) == 0, capsys.readouterr().out


def test_a_changed_number_is_a_difference(tmp_path, monkeypatch, capsys):
    committed = open(regenerate.output_path("study", "study_pooled")).read()
    assert "39.42 ± 0.30" in committed   # Vanilla-16L's held-out PPL over its 3 seeds
    fake = tmp_path / "experiments" / "study" / "numbers" / "study_pooled.txt"
    fake.parent.mkdir(parents=True)
    fake.write_text(committed.replace("39.42 ± 0.30", "39.43 ± 0.30"))
    monkeypatch.setattr(regenerate, "output_path", lambda study, name: str(tmp_path / "experiments" / study / "numbers"
                                                                         / f"{name}.txt"))
    assert regenerate.main(["--only", "study_pooled"]) == 1
    out = capsys.readouterr().out
    assert "DIFFERS" in out and "-vanilla_16l | 3 | 39.43 ± 0.30" in out and "+vanilla_16l | 3 | 39.42 ± 0.30" in out
