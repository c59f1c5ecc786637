"""experiments/regenerate.py: the committed outputs are what their commands print today (a fast subset: the
study's pooled figures; `python experiments/regenerate.py` checks them all), a changed number is caught, and
--write writes what the command printed."""
import sys

from experiments import regenerate


def test_committed_outputs_regenerate(capsys):
    committed = open(regenerate.output_path("study", "study_pooled")).read()
    assert "vanilla_16l | 3 | 39.42 ± 0.30" in committed   # Vanilla-16L's held-out PPL over its 3 seeds
    assert regenerate.main(["--only", "study_pooled"]) == 0, capsys.readouterr().out


def test_a_changed_number_is_a_difference_and_write_fixes_it(tmp_path, monkeypatch, capsys):
    printing = [sys.executable, "-c", "print('vanilla_16l | 3 | 39.42 ± 0.30')"]   # a command's output, cheaply
    monkeypatch.setattr(regenerate, "OUTPUTS", [("study", "toy", ["python", "-c", printing[2]])])
    monkeypatch.setattr(regenerate, "output_path", lambda study, name: str(tmp_path / study / f"{name}.txt"))
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "toy.txt").write_text("vanilla_16l | 3 | 39.43 ± 0.30\n")
    assert regenerate.main([]) == 1
    out = capsys.readouterr().out
    assert "DIFFERS" in out and "-vanilla_16l | 3 | 39.43 ± 0.30" in out and "+vanilla_16l | 3 | 39.42 ± 0.30" in out
    assert regenerate.main(["--write"]) == 0 and regenerate.main([]) == 0
    assert (tmp_path / "study" / "toy.txt").read_text() == "vanilla_16l | 3 | 39.42 ± 0.30\n"
