"""experiments/taper/: every committed schedule is what its header's taper.py command writes today, so the study's
configs cannot drift from the code that claims to make them (a change to taper.py's fit or rounding fails here)."""
import glob
import os
import shlex

import pytest

import taper

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
SCHEDULES = sorted(glob.glob(os.path.join(ROOT, "experiments", "taper", "*", "*.py")))


def header_argv(path):
    """The taper.py arguments on the file's '# python taper.py ...' line."""
    for line in open(path):
        if line.startswith("# python taper.py "):
            return shlex.split(line[len("# python taper.py "):])
    raise AssertionError(f"{path}: no '# python taper.py' line in its header")


def test_the_study_has_its_schedules():
    names = {os.path.relpath(p, os.path.join(ROOT, "experiments", "taper")) for p in SCHEDULES}
    for scale in ("small", "1b", "demo"):
        assert {f"{scale}/{p}.py" for p in ("gfa", "increasing", "linear", "measured", "narrow_middle")} <= names


@pytest.mark.parametrize("path", SCHEDULES, ids=lambda p: os.path.relpath(p, ROOT))
def test_schedule_regenerates_from_its_header(path, tmp_path, monkeypatch, capsys):
    argv = header_argv(path)
    committed = os.path.relpath(path, ROOT)
    assert argv[argv.index("--out") + 1] == committed, "the header's --out names another file"
    out = str(tmp_path / "schedule.py")
    argv[argv.index("--out") + 1] = out
    monkeypatch.chdir(ROOT)   # the header's paths are relative to the repository root
    taper.main(argv)
    capsys.readouterr()
    assert open(out).read().replace(out, committed) == open(path).read()
