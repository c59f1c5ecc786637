"""Every entry point against the bad input a user gives it: a one-line message that names the
problem and the fix, a non-zero exit, and no file of an existing run directory changed (hashes
before and after). In process; tests/gfa/test_cli.py runs the entry points once end to end."""
import hashlib
import importlib.util
import os
import shutil
import sys

import numpy as np
import pytest
import torch

import bench
import fanin
import hf
import prune
import resnet
import taper
import train
from gfa.cli import cli
from gfa.data import DATA
from helpers import one_line_error

sys.path.insert(0, DATA)
import prepare_local  # noqa: E402

TINY = ["--dataset=shakespeare", "--n_layer=2", "--d_model=32", "--head_dim=8", "--d_attn0=32", "--S_d=8",
        "--d_ffn0=64", "--vocab_size=256", "--block_size=32", "--batch_size=4", "--eval_iters=2",
        "--eval_batch_size=4", "--warmup_iters=1", "--log_interval=1", "--device=cpu", "--eval_interval=2",
        "--max_iters=2"]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for a machine without CUDA")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained tiny run (2 steps), shared: every test checks that it never changes."""
    out = str(tmp_path_factory.mktemp("runs") / "good")
    train.main(TINY + [f"--out_dir={out}"])
    return out


def digest(folder):
    return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest()
            for f in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, f))}


def corrupt_copy(run, tmp_path, name, truncate):
    """A copy of the run with one file cut to half its size."""
    bad = str(tmp_path / f"corrupt_{truncate}")
    shutil.copytree(run, bad)
    path = os.path.join(bad, name)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return bad


@pytest.mark.parametrize("argv, words", [
    (["--init_from=resume", "--max_iters=4", "--allow_changes=max_iters"], None),   # the good case: it resumes
    (["--n_layer=3"], "already holds a run"),
    (["--compile=yes"], "compile='yes': use True or False"),
    (["--learning_rate=-1.0"], "learning_rate=-1.0: must be >= 0"),
    (["--beta1=1.5"], "beta1=1.5: must be in [0, 1)"),
    (["--seed=-3"], "seed=-3: must be >= 0"),
    (["--optimizer=adam"], "optimizer='adam': use 'adamw' (the paper) or 'sgd'"),
    (["--momentum=1.0"], "momentum=1.0: must be in [0, 1)"),
    (["--norm_placement=sandwich"], "norm_placement='sandwich': use one of pre, post, mix, scaled"),
    (["--residual_scale=-1.0"], "residual_scale=-1.0: must be > 0"),
    (["--init_from=resume", "--optimizer=sgd"], "resuming would change the run: optimizer"),
    (["--init_from=resume", "--learning_rate=0.5"], "resuming would change the run: learning_rate"),
    (["--init_from=again"], "init_from='again'"),
    (["--bogus=1"], "unknown config key 'bogus'"),
    (["--help=yes"], "unknown config key 'help'"),
    pytest.param(["--device=cuda"], "no CUDA GPU is visible", marks=NO_CUDA),
])
def test_train(run, tmp_path, capsys, argv, words):
    target = str(tmp_path / "copy")
    shutil.copytree(run, target)
    before = digest(target)
    if words is None:
        train.main(TINY + [f"--out_dir={target}", *argv])
        return
    assert words in one_line_error(train.main, TINY + [f"--out_dir={target}", *argv], capsys)
    assert digest(target) == before


def test_train_files_it_cannot_use(run, tmp_path, capsys):
    bad = corrupt_copy(run, tmp_path, "ckpt.pt", "ckpt")
    msg = one_line_error(train.main, TINY + [f"--out_dir={bad}", "--init_from=resume"], capsys)
    assert "ckpt.pt is corrupt or truncated" in msg and "restore it" in msg
    (tmp_path / "a_file").write_text("not a folder")
    msg = one_line_error(train.main, TINY + [f"--out_dir={tmp_path / 'a_file'}"], capsys)
    assert "cannot write" in msg and (tmp_path / "a_file").read_text() == "not a folder"
    assert "does not exist" in one_line_error(train.main, TINY + [f"--out_dir={tmp_path / 'x'}",
                                                                  f"--data_dir={tmp_path / 'none'}"], capsys)
    assert not os.path.exists(tmp_path / "x")   # a run that failed to start leaves no folder behind


def test_fanin(run, tmp_path, capsys):
    before = digest(run)
    for argv, words in [([run, "--block_size", "10000"], "--block_size 10000: must be in [1, 32]"),
                        ([run, "--eval_batches", "0"], "--eval_batches 0: must be >= 1"),
                        ([run, "--dtype", "fp8"], "--dtype fp8"),
                        ([run, "--bogus"], "unknown argument(s) --bogus"),
                        ([run, "--device", "cuda"] if not torch.cuda.is_available() else [tmp_path / "nope"],
                         "no CUDA GPU is visible" if not torch.cuda.is_available() else "not a run directory")]:
        assert words in one_line_error(fanin.main, argv, capsys)
    assert digest(run) == before
    bad = corrupt_copy(run, tmp_path, "ckpt.pt", "ckpt")
    assert "ckpt.pt is corrupt or truncated" in one_line_error(fanin.main, [bad, "--no_importance"], capsys)
    bad = corrupt_copy(run, tmp_path, "grad_norms.npz", "dump")   # the checkpoint's copy stands in, with a note
    capsys.readouterr()
    summary = fanin.main([bad, "--no_importance"])
    assert "using the copy in the checkpoint" in capsys.readouterr().out
    good = fanin.main([run, "--no_importance", "--fig_dir", str(tmp_path / "figs")])
    assert summary["runs"][0]["share"] == good["runs"][0]["share"]


def test_prune(run, tmp_path, capsys, monkeypatch):
    before = digest(run)
    monkeypatch.setattr(prune, "prune_run", lambda *a: pytest.fail("a check came after the work"))
    fixed = ["--device", "cpu", "--hellaswag", "none", "--eval_batches", "1", "--batch_size", "2"]
    err = lambda *argv: one_line_error(prune.main, [*fixed, *argv], capsys)
    assert "--k '1,,2'" in err("--runs", run, "--k", "1,,2")
    assert "is the run being pruned" in err("--runs", run, "--k", "1", "--methods", "cfp", "--save_pruned", run)
    other = str(tmp_path / "wide")
    train.main([*TINY, "--d_model=64", f"--out_dir={other}"])
    msg = err("--runs", run, other, "--k", "1")
    assert "different architectures (d_model 32 vs 64)" in msg and "seeds of one config" in msg
    assert "already holds a run" in err("--runs", run, "--k", "1", "--methods", "cfp", "--save_pruned", other)
    (tmp_path / "a_file").write_text("x")
    assert "cannot write" in err("--runs", run, "--k", "1", "--out", tmp_path / "a_file" / "table")
    assert err("--runs", run, "--k", "1", "--calib_seed", "-1").endswith("--calib_seed and --hs_items must be >= 0")
    if not torch.cuda.is_available():
        assert "no CUDA GPU is visible" in one_line_error(prune.main, ["--runs", run, "--device", "cuda"], capsys)
    assert digest(run) == before and not os.path.exists(os.path.join(run, "prune"))
    bad = corrupt_copy(run, tmp_path, "ckpt.pt", "ckpt")
    assert "corrupt or truncated" in err("--runs", bad, "--k", "1")


def test_bench(tmp_path, capsys, monkeypatch):
    if not torch.cuda.is_available():
        msg = one_line_error(bench.main, [], capsys)   # no GPU: the 1.2B defaults would take hours
        assert "1,280M parameters: too big to time on the CPU" in msg and "tiny/vanilla_16l" in msg
        assert "no CUDA GPU is visible" in one_line_error(bench.main, ["tiny/vanilla_8l", "--device", "cuda"], capsys)

    def broken(*a):
        raise RuntimeError("out of memory")
    monkeypatch.setattr(bench, "bench_forward", broken)   # a model failing mid-table: its traceback, then one line
    out = tmp_path / "t.json"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli(lambda _: bench.main(["tiny/vanilla_8l", "--device", "cpu", "--seq", "16", "--runs", "1", "--out", str(out)]))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and last.startswith("error: 1 of 1 rows failed, e.g. tiny/Vanilla-8L (bfloat16): "
                                                 "RuntimeError: out of memory")
    assert "out of memory" in out.with_suffix(".md").read_text()   # the table is still written


def test_resnet(tmp_path, capsys):
    base = ["--dataset=synthetic", "--width=4", "--image_size=8", "--n_synthetic=32", "--batch_size=16",
            "--eval_batch_size=32", "--epochs=1", "--warmup_epochs=0.5", "--device=cpu", "--importance=False"]
    out = str(tmp_path / "rn")
    resnet.main(base + [f"--out_dir={out}"])
    before = digest(out)
    for argv, words in [([], "already holds a run"), (["--learning_rate=-1"], "learning_rate=-1.0: must be >= 0"),
                        (["--beta2=1"], "beta2=1.0: must be in [0, 1)"), (["--epochs=0"], "epochs=0: must be >= 1"),
                        (["--init_from=resume", "--weight_decay=0.5"], "resuming would change the run: weight_decay")]:
        assert words in one_line_error(resnet.main, base + [f"--out_dir={out}", *argv], capsys)
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in one_line_error(resnet.main, base + [f"--out_dir={out}", "--device=cuda"], capsys)
    assert digest(out) == before


def test_prepare_local_small_inputs(tmp_path, capsys):
    """The default val_fraction (1 document in 100) on inputs of 5 documents and of one: a split that works."""
    src = tmp_path / "few.jsonl"
    src.write_text("".join(f'{{"text": "document {i}"}}\n' for i in range(5)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.bin.tmp999999999").write_bytes(b"left by a killed run")
    prepare_local.main([str(src), "--out_dir", str(out), "--tokenizer", "bytes", "--workers", "1"])
    assert "5 document(s) are too few for val_fraction=0.01: the last one went to val" in capsys.readouterr().out
    assert bytes(np.fromfile(out / "val.bin", np.uint16)[:-1].astype(np.uint8)) == b"document 4"
    assert sorted(os.listdir(out)) == ["train.bin", "val.bin"]   # the stale temporary file is gone
    one = tmp_path / "one.txt"
    text = "".join(f"line {i} of a short text\n" for i in range(500))   # ~12 KB: one document
    one.write_text(text)
    prepare_local.main([str(one), "--out_dir", str(tmp_path / "o2"), "--tokenizer", "bytes", "--workers", "1"])
    assert "its last" in capsys.readouterr().out
    train_ids, val_ids = (np.fromfile(tmp_path / "o2" / f"{s}.bin", np.uint16) for s in ("train", "val"))
    assert len(val_ids) == (len(text) + 1) // 10   # a tenth of the document (+ its end byte)
    assert bytes(np.concatenate([train_ids, val_ids])[:-1].astype(np.uint8)).decode() == text
    msg = one_line_error(prepare_local.main, [str(one), "--out_dir", str(tmp_path / "o3"), "--workers", "0"], capsys)
    assert "workers=0: must be >= 1" in msg and not (tmp_path / "o3").exists()
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_text("not gzip")
    assert "cannot read" in one_line_error(prepare_local.main, [str(bad), "--out_dir", str(tmp_path / "o4"),
                                                                 "--tokenizer", "bytes"], capsys)


def _script(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(os.path.dirname(path)) + "_prepare", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SCRIPTS_WITH_OPTIONS = [fanin.main, prune.main, bench.main, hf.main, taper.main, prepare_local.main] + [
    _script(os.path.join(DATA, d, "prepare.py")).main for d in ("dolma", "shakespeare", "hellaswag")]


@pytest.mark.parametrize("main, words", [(train.main, ["learning_rate = 0.0002", "# peak", "n_layer = 16"]),
                                         (resnet.main, ["batch_size = 512", "# global, over all DDP ranks"]),
                                         (prune.main, ["--calib_batches", "(default: 8)"]),
                                         (bench.main, ["--mode", "(default: inference)"])])
def test_help_lists_every_key(main, words, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    flat = " ".join(out.split())   # argparse wraps its lines
    assert e.value.code == 0 and all(w in flat for w in words), flat[-2000:]
    if main in (train.main, resnet.main):   # every key: its default and a line saying what it is
        keys = [line for line in out.splitlines() if line.startswith("  ") and " = " in line]
        assert len(keys) > 20 and all("  # " in line for line in keys), [k for k in keys if "  # " not in k]


@pytest.mark.parametrize("main", SCRIPTS_WITH_OPTIONS)
def test_every_option_has_a_help_line(main, capsys, tmp_path):
    """gfa.cli.ArgumentParser refuses an option without a help line, so --help succeeding proves it;
    and --help does nothing else (no preparation, no download)."""
    before = sorted(os.listdir(os.path.join(DATA, "shakespeare")))
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "show this help message" in capsys.readouterr().out
    assert sorted(os.listdir(os.path.join(DATA, "shakespeare"))) == before
