"""Every entry point against the bad input a user gives it: a one-line message that names the
problem and the fix, a non-zero exit, and no file of an existing run directory changed (hashes
before and after). In process; tests/gfa/test_cli.py runs the entry points once end to end."""
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import sys
import time

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
from gfa.cli import UserError, cli
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
    assert sorted(os.listdir(out)) == ["data_id.json", "train.bin", "val.bin"]   # the stale temporary file is gone
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


# ---- issue 38: one identity per run and a guard at every door ------------------------------------------
# Each class of bad input below was silently accepted, a traceback, or left files behind before; every
# case checks the run directories it touches are byte for byte as before (tree_digest).
def tree_digest(*folders):
    """{path: sha256} of every file under the folders (recursively); a missing folder is recorded as such."""
    out = {}
    for folder in map(str, folders):
        if not os.path.exists(folder):
            out[folder] = "absent"
        for root, _, files in os.walk(folder):
            for f in files:
                path = os.path.join(root, f)
                out[path] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def seed_run(path, seed=0, lr=1e-3, d_model=32, data=None):
    """A run directory as an earlier version wrote it (no identity.json: it is derived), trained by nobody."""
    from helpers import tiny_model, write_run
    return write_run(path, tiny_model(seed, d_model=d_model, d_attn0=d_model), data,
                     train_config={"seed": seed, "learning_rate": lr})


def bad_weights_copy(run, tmp_path, name, value):
    """A copy of a run whose ckpt.pt holds `value` in one weight (as a damaged or diverged checkpoint does)."""
    bad = str(tmp_path / name)
    shutil.copytree(run, bad)
    ckpt = torch.load(os.path.join(bad, "ckpt.pt"), weights_only=False)
    ckpt["model"]["blocks.1.attn.proj.weight"][0, 0] = value
    torch.save(ckpt, os.path.join(bad, "ckpt.pt"))
    return bad


def test_pooling_refuses_runs_that_are_not_seeds(tmp_path, capsys, monkeypatch, byte_data):
    from gfa import rundir
    a, b = seed_run(tmp_path / "a", 0, data=byte_data), seed_run(tmp_path / "b", 1, data=byte_data)
    wide, lr = seed_run(tmp_path / "wide", 2, d_model=64, data=byte_data), seed_run(tmp_path / "lr", 3, 2e-3, data=byte_data)
    before = tree_digest(tmp_path)
    monkeypatch.setattr(prune, "prune_run", lambda *a: pytest.fail("a check came after the work"))
    fixed = ["--device", "cpu", "--hellaswag", "none", "--k", "1"]
    err = lambda main, *argv: one_line_error(main, argv, capsys)
    assert "one run given twice (the same folder)" in err(prune.main, *fixed, "--runs", a, a)
    assert "different recipes (learning_rate 0.001 vs 0.002)" in err(prune.main, *fixed, "--runs", a, lr)
    assert "different architectures (d_attn0 32 vs 64)" in err(fanin.main, a, wide, "--seeds", "--no_importance")
    assert "--allow_mixed" in err(fanin.main, a, lr, "--seeds", "--no_importance")
    regenerated = tmp_path / "regen"   # the same recipe on data regenerated under another folder
    shutil.copytree(byte_data, regenerated)
    (regenerated / "train.bin").write_bytes((regenerated / "train.bin").read_bytes()[::-1])
    c = seed_run(tmp_path / "c", 4, data=regenerated)
    assert "different data (train.bin" in err(fanin.main, a, c, "--seeds", "--no_importance")
    assert tree_digest(tmp_path / "a", tmp_path / "b", tmp_path / "wide", tmp_path / "lr") == \
        {k: v for k, v in before.items() if "/regen" not in k and "/c/" not in k and "/bytes/" not in k}
    assert rundir.check_poolable([a, b]) is None   # seeds of one experiment (fanin --seeds on them: tests/test_fanin.py)
    for fig in ("fig3", "fig_drift", "fig3_seeds"):   # the figures are tests/test_fanin.py's
        monkeypatch.setattr(fanin, fig, lambda *a: None)
    mixed = fanin.main([a, lr, "--seeds", "--no_importance", "--allow_mixed", "--fig_dir", str(tmp_path / "f2")])
    assert "learning_rate" in mixed["seeds"]["mixed"] and "MIXED POOL" in capsys.readouterr().out


def test_combine_refuses_the_same_results_twice_and_other_experiments(tmp_path, capsys, byte_data):
    a, wide = seed_run(tmp_path / "a", 0, data=byte_data), seed_run(tmp_path / "wide", 2, d_model=64, data=byte_data)
    fixed = ["--device", "cpu", "--hellaswag", "none", "--k", "1", "--methods", "magnitude", "--eval_batches", "1",
             "--batch_size", "2"]
    for run in (a, wide):   # (seeds combined: tests/test_prune.py)
        prune.main([*fixed, "--runs", run, "--out", os.path.join(run, "prune")])
    res = lambda run: os.path.join(run, "prune", "results.json")
    assert json.load(open(res(a)))["runs"][0]["identity"]["architecture"]["d_model"] == 32   # each run's identity
    old = json.load(open(res(a)))   # results.json of an earlier version: no identity; the same file twice is found
    del old["runs"][0]["identity"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    before = tree_digest(tmp_path)
    err = lambda *argv: one_line_error(prune.main, argv, capsys)
    assert "one run given twice (the same checkpoint)" in err("--combine", res(a), res(a), "--out", tmp_path / "t")
    assert "different architectures (d_attn0 32 vs 64)" in err("--combine", res(a), res(wide), "--out", tmp_path / "t")
    assert "one run given twice (identical results)" in err("--combine", tmp_path / "old.json", tmp_path / "old.json")
    assert tree_digest(tmp_path) == before
    prune.main(["--combine", res(a), res(wide), "--allow_mixed", "--out", str(tmp_path / "mixed")])
    assert (tmp_path / "mixed" / "table1.md").read_text().startswith("MIXED POOL")
    assert "d_attn0" in json.load(open(tmp_path / "mixed" / "results.json"))["settings"]["mixed"]


def test_weights_guard_at_every_door(run, tmp_path, capsys):
    st = pytest.importorskip("safetensors.torch")
    nan, huge = bad_weights_copy(run, tmp_path, "nan", float("nan")), bad_weights_copy(run, tmp_path, "huge", 1e38)
    big = bad_weights_copy(run, tmp_path, "big", 1e5)   # finite, fine in float32, inf in float16
    before = tree_digest(tmp_path)
    err = lambda main, *argv: one_line_error(main, argv, capsys)
    weight = "weight blocks.1.attn.proj.weight is"
    assert weight in err(prune.main, "--runs", huge, "--k", "1", "--hellaswag", "none", "--device", "cpu")
    assert weight in err(fanin.main, nan, "--eval_batches", "1")
    assert weight in err(bench.main, nan, "--device", "cpu", "--seq", "8", "--runs", "1")
    assert weight in err(train.main, *TINY, f"--out_dir={tmp_path / 'from_nan'}", f"--init_from={nan}")
    assert weight in err(train.main, *TINY, f"--out_dir={huge}", "--init_from=resume")
    assert weight in err(hf.main, "export", nan, tmp_path / "hf_nan")
    assert "too large (max |w| 1e+05 > 6.55e+04)" in err(hf.main, "export", big, tmp_path / "hf16", "--dtype", "float16")
    hf.main(["export", run, str(tmp_path / "hf_good")])
    tensors = st.load_file(tmp_path / "hf_good" / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"][1, 2] = float("inf")
    st.save_file(tensors, tmp_path / "hf_good" / "model.safetensors")
    assert "weight blocks.0.ffn.down.weight is non-finite" in err(hf.main, "import", tmp_path / "hf_good",
                                                                    tmp_path / "imported")
    assert tree_digest(nan, huge, big, tmp_path / "from_nan", tmp_path / "hf_nan", tmp_path / "hf16",
                       tmp_path / "imported") == {k: v for k, v in before.items()} | {
        str(tmp_path / f): "absent" for f in ("from_nan", "hf_nan", "hf16", "imported")}
    from gfa import rundir
    from helpers import tiny_model
    model = tiny_model()
    with torch.no_grad():
        model.blocks[0].ffn.down.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="not writing .*weight blocks.0.ffn.down.weight is non-finite"):
        rundir.save_gpt(str(tmp_path / "written"), model, {}, 0)   # --save_pruned and hf import write through it
    assert not os.path.exists(tmp_path / "written" / "ckpt.pt")


def test_one_writer_per_run_directory(run, tmp_path, capsys):
    """A second writer is refused with the holder's pid and host; the lock of a process that died is taken over."""
    from gfa import rundir
    target = str(tmp_path / "copy")
    shutil.copytree(run, target)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:   # the first writer: holds the lock until killed
        try:
            rundir.RunLock(target).acquire()
            os.write(ready_w, b"1")
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"1", "the first writer could not take the lock"
        before = tree_digest(target)
        msg = one_line_error(train.main, TINY + [f"--out_dir={target}", "--init_from=resume", "--max_iters=4",
                                                 "--allow_changes=max_iters"], capsys)
        assert f"is being written by another process (pid {pid} on host" in msg
        assert tree_digest(target) == before
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert os.path.isfile(os.path.join(target, ".lock"))   # left by the killed writer
    train.main(TINY + [f"--out_dir={target}", "--init_from=resume", "--max_iters=4", "--allow_changes=max_iters"])
    log = open(os.path.join(target, "log.txt")).read()
    assert f"took over the lock of {target} from a process that is gone (pid {pid}" in log
    assert not os.path.exists(os.path.join(target, ".lock"))   # released at the end


def test_token_files_and_changed_data(run, tmp_path, capsys, byte_data):
    odd = tmp_path / "odd"
    shutil.copytree(byte_data, odd)
    with open(odd / "train.bin", "ab") as f:
        f.write(b"\x01")   # an interrupted copy: half a token
    out = tmp_path / "r"
    msg = one_line_error(train.main, TINY + [f"--out_dir={out}", f"--data_dir={odd}"], capsys)
    assert "not a whole number of uint16 token ids" in msg and not os.path.exists(out)
    data = tmp_path / "data"
    shutil.copytree(byte_data, data)
    train.main(TINY + [f"--out_dir={out}", f"--data_dir={data}"])
    (data / "train.bin").write_bytes(np.roll(np.fromfile(data / "train.bin", np.uint16), 7).tobytes())   # regenerated
    before = tree_digest(out)
    msg = one_line_error(train.main, TINY + [f"--out_dir={out}", f"--data_dir={data}", "--init_from=resume",
                                             "--max_iters=4", "--allow_changes=max_iters"], capsys)
    assert "was trained on other data: its train.bin had content id" in msg and tree_digest(out) == before


def test_multiple_choice_files(run, tmp_path, capsys):
    good = {"ctx": "a b", "endings": [" c", " d"], "label": 0}
    cases = [(dict(good, label=1.7), "label must be 0..1 (an integer"), (dict(good, label=True), "got True"),
             (dict(good, ctx=" "), "has an empty context")]
    for i, (row, words) in enumerate(cases):
        path = tmp_path / f"mc{i}.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
        msg = one_line_error(prune.main, ["--runs", run, "--k", "1", "--hellaswag", path, "--device", "cpu"], capsys)
        assert f"mc{i}.jsonl:2 " in msg and words in msg, msg
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps(good).encode() + b"\n" + json.dumps(dict(good, ctx="caf\u00e9")).encode("latin-1")
                      .replace(b"\\u00e9", b"\xe9") + b"\n")
    msg = one_line_error(prune.main, ["--runs", run, "--k", "1", "--hellaswag", latin, "--device", "cpu"], capsys)
    assert "latin.jsonl:2 is not UTF-8 text" in msg
    assert not os.path.exists(os.path.join(run, "prune"))


def test_settings_devices_and_loggers(run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "new"
    err = lambda *argv: one_line_error(train.main, TINY + [f"--out_dir={out}", *argv], capsys)
    assert "min_lr=0.01 is above learning_rate=0.001" in err("--learning_rate=1e-3", "--min_lr=1e-2")
    assert "ds_alpha=[1.0, -1.0]: the loss weights must be >= 0" in err("--deep_supervision=True", "--ds_alpha=[1.0,-1.0]")
    assert "device='gpu' is not a device" in err("--device=gpu")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert "the wandb package is not installed" in err("--wandb_log=True")
    assert "--target -5.0: a budget must be > 0" in one_line_error(taper.main, ["config/tiny.py", "--target", "-5"],
                                                                    capsys)
    assert "device='npu:0' is not a device" in one_line_error(fanin.main, [run, "--device", "npu:0"], capsys)
    assert not os.path.exists(out)


def test_run_directory_kinds(tmp_path, capsys):
    from gfa import rundir
    rn = str(tmp_path / "resnet_run")
    rundir.write_model_config(rn, "resnet", {"num_classes": 10, "small_stem": True, "width": 4})
    torch.save({"kind": "resnet", "model": {}, "train_config": {}, "iter_num": 1}, os.path.join(rn, "ckpt.pt"))
    before = tree_digest(rn)
    assert "holds a resnet model, not a gpt one" in one_line_error(bench.main, [rn, "--device", "cpu"], capsys)
    assert "holds a resnet model" in one_line_error(prune.main, ["--runs", rn, "--k", "1", "--device", "cpu"], capsys)
    assert "holds a resnet model" in one_line_error(hf.main, ["export", rn, tmp_path / "x"], capsys)
    assert tree_digest(rn) == before


def test_images_and_cifar_files(tmp_path, capsys):
    from PIL import Image
    root = tmp_path / "imgs"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(4):   # constant blue channel: its std is 0
                Image.new("RGB", (8, 8), (40 * i, 100 if c == "a" else 200, 7)).save(root / split / c / f"{i}.png")
    mean, std = resnet.channel_stats(resnet.decode_images(
        __import__("torchvision").datasets.ImageFolder(str(root / "train"), loader=resnet.load_image), 0)[0])
    assert std[2] == pytest.approx(1 / 255) and torch.isfinite(resnet.normalised(
        torch.full((1, 3, 2, 2), 7, dtype=torch.uint8), mean, std)).all()
    (root / "train" / "b" / "3.png").write_bytes(b"\x89PNG not really")
    base = ["--dataset=folder", f"--data_dir={root}", "--width=4", "--batch_size=4", "--epochs=1", "--device=cpu",
            "--num_workers=0", "--importance=False", f"--out_dir={tmp_path / 'rn'}"]
    msg = one_line_error(resnet.main, base, capsys)
    assert "b/3.png is not a readable image" in msg and not os.path.exists(tmp_path / "rn")
    cifar = tmp_path / "cifar" / "cifar-10-batches-py"   # every file there, none the official one
    cifar.mkdir(parents=True)
    for f in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
              "batches.meta"]:
        (cifar / f).write_bytes(b"re-pickled")
    msg = one_line_error(resnet.main, ["--dataset=cifar10", f"--data_dir={tmp_path / 'cifar'}", "--device=cpu",
                                       f"--out_dir={tmp_path / 'rn2'}"], capsys)
    assert "differ from the official CIFAR files (MD5 checksum mismatch" in msg and "missing" not in msg
    assert not os.path.exists(tmp_path / "rn2")


def test_lm_eval_model_args_and_truncation(tmp_path, capsys):
    adapter = pytest.importorskip("gfa.lm_eval_adapter")
    from helpers import tiny_model
    with pytest.raises(UserError, match="--model_args max_token=...: .* \\(did you mean max_tokens\\?\\)"):
        adapter.GFALM.create_from_arg_obj({"ckpt": "x", "max_token": 5})
    lm = adapter.GFALM(model=tiny_model(), device="cpu")
    long = list(range(1, 40))   # 39 + 2 tokens > block_size 32 + 1
    lm._loglikelihood_tokens([(("a", "b"), long, [3, 4]), (("c", "d"), [1, 2], [3])])
    assert "warning: 1 of 2 lm-eval requests are longer than the model's context (block_size 32)" in \
        capsys.readouterr().out


def test_a_failed_start_leaves_nothing_behind(run, tmp_path, capsys):
    out = tmp_path / "new"   # fails after the run folder was made (the reference run is read late)
    msg = one_line_error(train.main, TINY + [f"--out_dir={out}", "--equalize=True",
                                             f"--equalize_reference={tmp_path / 'nowhere'}"], capsys)
    assert "nowhere" in msg and not os.path.exists(out)
    target = tmp_path / "copy"   # a resume that fails after its first writes: the folder as it was
    shutil.copytree(run, target)
    before = tree_digest(target)
    msg = one_line_error(train.main, TINY + [f"--out_dir={target}", "--init_from=resume", "--max_iters=4",
                                             "--allow_changes=max_iters", "--equalize=True",
                                             f"--equalize_reference={tmp_path / 'nowhere'}", "--allow_changes=max_iters,equalize"],
                         capsys)
    assert tree_digest(target) == before, msg


def test_a_missing_embedded_text(tmp_path, capsys, monkeypatch):
    shakespeare = _script(os.path.join(DATA, "shakespeare", "prepare.py"))
    monkeypatch.setattr(shakespeare, "CORPUS", str(tmp_path / "input.txt.xz"))
    msg = one_line_error(lambda argv: shakespeare.prepare(str(tmp_path)), [], capsys)
    assert "cannot be read (FileNotFoundError): restore it with `git checkout" in msg
    (tmp_path / "input.txt.xz").write_bytes(b"\xfd7zXZ\x00 truncated")
    assert "cannot be read (LZMAError)" in one_line_error(lambda argv: shakespeare.prepare(str(tmp_path)), [], capsys)
    assert sorted(os.listdir(tmp_path)) == ["input.txt.xz"]
