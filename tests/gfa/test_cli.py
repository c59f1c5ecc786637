"""gfa/cli.py: the configurator (types, unknown keys, files composed in order, a variant written
relative to a scale, the default run name), comma lists of integers and the one-line errors, in
process and once end to end."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gfa.cli import UserError, cli, config_name, gpt_config, int_list, read_config
from helpers import one_line_error
from model import GPTConfig

ROOT = Path(__file__).resolve().parents[2]


def test_configurator_types_and_unknown_keys(tmp_path):
    cfg = read_config(["--n_layer=3", "--n_head=(4,4,2)", "--rope_theta=500", "--deep_supervision=True"],
                      GPTConfig.defaults())
    assert cfg["n_head"] == [4, 4, 2] and cfg["rope_theta"] == 500.0 and cfg["deep_supervision"] is True
    with pytest.raises(UserError, match="unknown config key 'n_layers'.*did you mean n_layer"):
        read_config(["--n_layers=3"], GPTConfig.defaults())
    with pytest.raises(UserError, match="expected int"):
        read_config(["--n_layer=3.5"], GPTConfig.defaults())
    with pytest.raises(UserError, match="expected bool"):
        read_config(["--deep_supervision=1"], GPTConfig.defaults())
    with pytest.raises(UserError, match="must look like --key=value"):
        read_config(["--n_layer"], GPTConfig.defaults())
    bad = tmp_path / "bad.py"
    bad.write_text("n_layer = 'four'\n")
    with pytest.raises(UserError, match="n_layer='four'"):
        read_config([str(bad)], GPTConfig.defaults())
    typo = tmp_path / "typo.py"
    typo.write_text("batchsize = 3\n")
    with pytest.raises(UserError, match="unknown config key 'batchsize' set by"):
        read_config([str(typo)], {"batch_size": 1})
    assert gpt_config([str(ROOT / "config/tiny.py")]).d_model == 128   # its batch_size etc. ignored
    broken = tmp_path / "broken.py"
    broken.write_text("n_layer = 1 / 0\n")
    with pytest.raises(UserError, match="failed to run: ZeroDivisionError"):
        read_config([str(broken)], GPTConfig.defaults())


def test_files_compose_in_order_and_see_earlier_values(tmp_path):
    scale, variant = tmp_path / "scale.py", tmp_path / "variant.py"
    scale.write_text("d_ffn0 = 640\nn_layer = 4\n")
    variant.write_text("S_f = d_ffn0 // 64   # relative to whatever scale came first\n")
    cfg = read_config([str(scale), str(variant), "--n_layer=3"], GPTConfig.defaults())
    assert (cfg["d_ffn0"], cfg["S_f"], cfg["n_layer"]) == (640, 10, 3)
    alone = read_config([str(variant)], GPTConfig.defaults())   # after the defaults: the paper's 8192
    assert alone["S_f"] == 128 and alone["n_layer"] == 16
    # the shipped files: F1 at each scale tapers by 1/64 of its FFN width, as the paper's 8192 -> 128
    for s, want in [(None, 128), ("small", 32), ("tiny", 8)]:
        files = ([str(ROOT / f"config/{s}.py")] if s else []) + [str(ROOT / "config/cascade_f1.py")]
        assert gpt_config(files).S_f == want


def test_changing_a_value_a_file_computed_from_is_an_error(tmp_path):
    f1, small = str(ROOT / "config/cascade_f1.py"), str(ROOT / "config/small.py")
    with pytest.raises(UserError, match=f"{small} changes d_ffn0 after {f1} computed from it: give {small} before {f1}"):
        read_config([f1, small], GPTConfig.defaults(), ignore_other_keys=True)
    with pytest.raises(UserError, match=f"--d_ffn0=1024 changes d_ffn0 after {f1} computed from it"):
        gpt_config([f1, "--d_ffn0=1024"])
    assert gpt_config(["--d_ffn0=1024", f1]).S_f == 16 and gpt_config([f1, "--d_ffn0=8192", "--S_f=7"]).S_f == 7
    # reading only the model, later files still see what earlier ones set for other scripts
    scale, variant = tmp_path / "scale.py", tmp_path / "variant.py"
    scale.write_text("max_iters = 100\nd_model = 64\n")
    variant.write_text("warmup_iters = max_iters // 25\nn_layer = d_model // 32\n")
    assert gpt_config([str(scale), str(variant)]).n_layer == 2


def test_config_name_is_the_default_run_name():
    assert config_name(["config/small.py", "config/cascade_a2.py", "--batch_size=8"]) == "small_cascade_a2"
    assert config_name(["config/demo.py"]) == "demo" and config_name(["--n_layer=2"]) == "run"


def test_cli_prints_one_line_for_user_errors(capsys):
    def main(argv):
        raise UserError("bad thing: fix it")
    assert one_line_error(main, [], capsys) == "error: bad thing: fix it"

    def bad_model(argv):
        GPTConfig(n_layer=0)
    assert "n_layer=0" in one_line_error(bad_model, [], capsys)
    assert cli(lambda argv: 7) == 7


def test_closed_stdout_ends_quietly():
    """`python fanin.py --theory ... | head -1`: no BrokenPipeError traceback. 700 layers print far
    more than a pipe buffers, so the script is still writing when the reader goes away."""
    p = subprocess.Popen([sys.executable, "fanin.py", "--theory", "config/tiny.py", "config/vanilla_8l.py",
                          "--n_layer=700"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().startswith("d_model 128")
    p.stdout.close()   # the reader goes away, as head does after its lines
    err = p.stderr.read()
    assert p.wait(timeout=120) == 1 and err == "", err


ENTRY_POINTS = {"train.py": ["--n_layers=3"], "fanin.py": ["--theory", "config/tiny.py", "config/vanilla_8l.py",
                                                            "--n_layr=3"], "prune.py": ["--runs", "no/such/run"],
                "bench.py": ["no_such_config", "--device", "cpu"], "resnet.py": ["--stem=big", "--device=cpu"],
                "taper.py": ["config/tiny.py", "--profile", "cone"],
                "data/prepare_local.py": ["--out_dir", "unused", "no/such/file.txt"],
                "hf.py": ["import", "no/such/folder", "unused"]}


def test_every_entry_point_prints_one_line():
    """Each script as `python <script>` runs it (its __main__ wiring through gfa.cli.cli): a bad
    argument ends with status 2 and one 'error:' line. One interpreter for all, to keep it fast."""
    probe = f"""
import contextlib, io, json, runpy, sys
out = {{}}
for script, argv in {ENTRY_POINTS!r}.items():
    err = io.StringIO()
    sys.argv = [script, *argv]
    try:
        with contextlib.redirect_stderr(err):
            runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    out[script] = [code, err.getvalue()]
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    results = json.loads(r.stdout.strip().splitlines()[-1])
    for script, (code, err) in results.items():
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (script, code, err)
    assert results["fanin.py"][1].strip() == "error: unknown config key 'n_layr' in --n_layr=3 (did you mean n_layer?)"


def test_int_list_keeps_the_order_and_names_the_fix():
    assert int_list("4, 8,2", "--exit_layer", "4,8") == [4, 8, 2] and int_list("", "--exit_layer", "4,8") == []
    assert int_list("0,3", "--k", "1,2", minimum=0) == [0, 3]
    for bad in ("1,,2", "0", "2,x", "-1", "1.5"):
        with pytest.raises(UserError, match=r"--batch '.*': give integers >= 1 separated by commas, e.g. --batch 1,16"):
            int_list(bad, "--batch", "1,16")
