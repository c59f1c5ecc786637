"""gfa/rundir.py: the run directory contract. A GPT run round-trips through save_gpt/load_gpt,
checkpoints carry their kind (a ResNet run is refused by the LM readers), the share is derived
from the stored norms over the steps asked for, the checkpoint's copy of the dump stands in for
a missing grad_norms.npz, runs of earlier versions still load, and a failed write leaves the
previous file and no temporary file."""
import errno
import json
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

from gfa import rundir
from gfa.cli import UserError
from gfa.theory import accumulated_share
from helpers import tiny_model, write_run


def test_gpt_run_round_trips(tmp_path):
    m = tiny_model(3, passthrough=[2])
    run = write_run(tmp_path / "r", m, iter_num=7)
    assert sorted(os.listdir(run)) == ["ckpt.pt", "grad_norms.npz", "model_config.json"]
    kind, cfg = rundir.read_model_config(run)
    assert kind == "gpt" and cfg == asdict(m.config)
    ckpt = torch.load(os.path.join(run, "ckpt.pt"), weights_only=False)
    assert ckpt["kind"] == "gpt" and ckpt["iter_num"] == 7 and "model_config" not in ckpt   # stored once
    again, ck = rundir.load_gpt(run)
    x = torch.randint(0, 256, (2, 9))
    assert again.passthrough == {2} and torch.equal(again(x)[0], m(x)[0]) and ck["iter_num"] == 7


def test_kind_is_checked(tmp_path):
    run = str(tmp_path / "resnet")
    rundir.write_model_config(run, "resnet", {"width": 4})
    rundir.save_checkpoint(run, "resnet", {"w": torch.zeros(1)}, {"lr": 1.0}, 3)
    with pytest.raises(UserError, match="holds a resnet model, not a gpt one"):
        rundir.load_gpt(run)
    assert rundir.read_checkpoint(run, kind="resnet")["iter_num"] == 3
    with pytest.raises(UserError, match="is not a run directory"):
        rundir.read_checkpoint(str(tmp_path / "nowhere"))
    (tmp_path / "junk").mkdir()
    torch.save([1, 2], tmp_path / "junk" / "ckpt.pt")
    with pytest.raises(UserError, match="not a checkpoint written by this codebase"):
        rundir.read_checkpoint(str(tmp_path / "junk"))
    with pytest.raises(UserError, match="no model_config.json"):
        rundir.read_model_config(str(tmp_path / "nowhere"))


def test_runs_of_earlier_versions_still_load(tmp_path):
    """Before this layout: the architecture inside ckpt.pt (and a bare model_config.json), no kind."""
    m = tiny_model(1)
    old = tmp_path / "old"
    old.mkdir()
    torch.save({"model": m.state_dict(), "model_config": asdict(m.config), "iter_num": 4,
                "train_config": {"dataset": "x"}}, old / "ckpt.pt")
    again, _ = rundir.load_gpt(str(old))
    x = torch.randint(0, 256, (1, 5))
    assert torch.equal(again(x)[0], m(x)[0])
    (old / "model_config.json").write_text(json.dumps(asdict(m.config)))
    assert rundir.read_model_config(str(old)) == ("gpt", asdict(m.config))
    (old / "model_config.json").write_text("{broken")
    with pytest.raises(UserError, match="model_config.json cannot be read"):
        rundir.read_model_config(str(old))


def test_resnet_runs_of_earlier_versions_still_load(tmp_path):
    """resnet.py used to write resnet_ckpt.pt (its config inside) and no model_config.json."""
    old = tmp_path / "old_resnet"
    old.mkdir()
    cfg = {"num_classes": 10, "in_channels": 1, "small_stem": True, "width": 4}
    torch.save({"model": {"w": torch.zeros(1)}, "model_config": cfg, "iter_num": 8, "train_config": {}},
               old / "resnet_ckpt.pt")
    assert rundir.read_model_config(str(old)) == ("resnet", cfg) and rundir.has_checkpoint(str(old))
    assert rundir.read_checkpoint(str(old), kind="resnet")["iter_num"] == 8
    with pytest.raises(UserError, match="holds a resnet model, not a gpt one"):
        rundir.load_gpt(str(old))
    with pytest.raises(UserError, match="already holds a run"):
        rundir.start_run(str(old), "resnet", cfg)
    bare = tmp_path / "copied"   # only its dump and importance.json were kept (docs/runs/)
    bare.mkdir()
    (bare / "importance.json").write_text(json.dumps({"metric": "top1_drop", "importance": [0.1]}))
    assert rundir.read_model_config(str(bare)) == ("resnet", {})


def test_share_is_derived_over_the_steps_asked_for(tmp_path):
    m = tiny_model()
    rows = np.random.default_rng(0).random((12, 6)) + 0.5
    run = write_run(tmp_path / "r", m, rows=rows, iter_num=8)
    with np.load(os.path.join(run, "grad_norms.npz")) as z:
        assert sorted(z.files) == ["names", "norms", "steps"]   # no stored share to go stale
    names = ["embed"] + [f"layer.{i}" for i in range(4)] + ["head"]
    full = rundir.read_grad_dump(run)
    assert full["step_range"] == (0, 11) and full["layer_names"] == names[1:-1]
    np.testing.assert_allclose(full["share"], accumulated_share(rows, names), rtol=1e-6)
    part = rundir.read_grad_dump(run, before_step=8)
    assert part["step_range"] == (0, 7) and len(part["norms"]) == 8
    np.testing.assert_allclose(part["share"], accumulated_share(rows[:8], names), rtol=1e-6)
    # without grad_norms.npz, the copy in the checkpoint (written with it) stands in
    os.remove(os.path.join(run, "grad_norms.npz"))
    ckpt = rundir.read_checkpoint(run)
    np.testing.assert_allclose(rundir.read_grad_dump(run, 8, ckpt)["share"], part["share"])
    with pytest.raises(UserError, match="no gradient dump"):
        rundir.read_grad_dump(run)
    with pytest.raises(UserError, match="holds no steps before step 0"):
        rundir.read_grad_dump(run, 0, ckpt)


def test_sub_block_dump_reads_per_layer_and_per_sub_block(tmp_path):
    """A dump with attention and MLP apart: the layer norm is sqrt(attn^2 + mlp^2) (planted 3-4-5 and
    5-12-13 triangles), the share over it is Eq. 2's, and each kind of sub-block has its own share."""
    names = ["embed", "layer.0.attn", "layer.0.mlp", "layer.1.attn", "layer.1.mlp", "head"]
    rows = np.array([[1.0, 3, 4, 5, 12, 2], [1.0, 6, 8, 0, 13, 2]])
    d = rundir.GradNormDump(names, str(tmp_path / "grad_norms.npz"), equalized=True)
    for s, r in enumerate(rows):
        d.record(s, torch.tensor(r, dtype=torch.float32), torch.tensor(2 * r, dtype=torch.float32))
    d.flush()
    got = rundir.read_grad_dump(str(tmp_path))
    assert got["names"] == ["embed", "layer.0", "layer.1", "head"] and got["sub_names"] == names
    np.testing.assert_allclose(got["norms"], [[1, 5, 13, 2], [1, 10, 13, 2]])
    np.testing.assert_allclose(got["norms_equalized"], [[2, 10, 26, 4], [2, 20, 26, 4]])
    np.testing.assert_allclose(got["share"], [15 / 41, 26 / 41])
    np.testing.assert_allclose(got["sub_share"]["attn"], [9 / 14, 5 / 14])
    np.testing.assert_allclose(got["sub_share"]["mlp"], [12 / 37, 25 / 37])
    assert rundir.records_sublayers(names) and not rundir.records_sublayers(got["names"])


def test_dump_resume_drops_rows_at_and_after_the_step(tmp_path):
    d = rundir.GradNormDump(["layer.0", "layer.1"], str(tmp_path / "g.npz"), equalized=True)
    for s in range(5):
        d.record(s, torch.tensor([s, 1.0]), torch.tensor([2.0, 2.0]))
    sd = d.state_dict()
    e = rundir.GradNormDump(["layer.0", "layer.1"], str(tmp_path / "g.npz"), equalized=True)
    e.load_state_dict(sd, before_step=3)
    assert e.state_dict()["steps"].tolist() == [0, 1, 2] and e.state_dict()["norms_equalized"].shape == (3, 2)
    with pytest.raises(UserError, match="equalize=True"):
        rundir.GradNormDump(["layer.0", "layer.1"], None).load_state_dict(sd)
    with pytest.raises(UserError, match="other layer names"):
        rundir.GradNormDump(["layer.0"], None, equalized=True).load_state_dict(sd)


def test_failed_write_keeps_the_previous_file_and_no_temporary(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    rundir.atomic_save({"a": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        rundir.atomic_save({"a": Unpicklable()}, path)
    assert torch.load(path) == {"a": 1} and os.listdir(tmp_path) == ["ckpt.pt"]
    full = lambda f: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(UserError, match="cannot write .*ckpt.pt: No space left on device"):
        rundir._atomic(path, full)   # a full disk: one line, nothing left behind
    assert torch.load(path) == {"a": 1} and os.listdir(tmp_path) == ["ckpt.pt"]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f"ckpt.pt.tmp{dead.stdout.strip()}").write_bytes(b"x" * 100)   # what a killed write leaves
    (tmp_path / f"ckpt.pt.tmp{os.getppid()}").write_bytes(b"y")   # a live writer's: left to it
    rundir.atomic_save({"a": 2}, path)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", f"ckpt.pt.tmp{os.getppid()}"] and torch.load(path) == {"a": 2}
    rundir.atomic_write_text("x", str(tmp_path / "sub" / "t.md"))   # makes the folder
    assert (tmp_path / "sub" / "t.md").read_text() == "x"


def test_provenance_records_every_invocation_and_summarises_the_first(tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    assert rundir.provenance_summary(run).startswith("not recorded")
    monkeypatch.setenv("GFA_COMMIT", "0123456789abcdef")
    rundir.start_run(run, "gpt", {"n_layer": 2})
    rundir.record_invocation(run, ["train.py", "--init_from=resume"])
    record = rundir.read_provenance(run)
    assert [i["commit"] for i in record["invocations"]] == ["0123456789abcdef"] * 2
    assert record["invocations"][1]["argv"] == ["train.py", "--init_from=resume"]
    assert rundir.provenance_summary(run).startswith("commit 0123456789: ")
    assert rundir.provenance_summary(run).endswith("(+1 resume)")
    rundir.start_run(run, "gpt", {"n_layer": 2}, overwrite=True)   # a replaced run starts a new record
    assert len(rundir.read_provenance(run)["invocations"]) == 1


def test_provenance_reads_git_without_the_override(monkeypatch):
    monkeypatch.delenv("GFA_COMMIT", raising=False)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    head = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout (an unpacked archive): no commit to compare")
    v = rundir.code_version()
    assert v["commit"] == head.stdout.strip() and v["dirty"] in (True, False)


def test_identity_of_a_run_of_an_earlier_version_is_derived_from_what_it_has(tmp_path, byte_data):
    """No identity.json (earlier versions): the architecture from model_config.json, the recipe and seed from
    the checkpoint's train_config (bookkeeping keys and model keys left out), the data from the content of
    the folder it names; without a checkpoint, the data folder log.txt's first lines name, the rest unknown."""
    run = write_run(tmp_path / "old", tiny_model(), byte_data, train_config={
        "seed": 7, "learning_rate": 1e-3, "log_interval": 5, "device": "cuda", "init_from": "resume", "n_layer": 4})
    ident = rundir.read_identity(run)
    assert ident["architecture"] == asdict(tiny_model().config) and ident["seed"] == 7
    assert ident["recipe"] == {"batch_size": 4, "learning_rate": 1e-3, "init_from": "scratch"}
    size = os.path.getsize(byte_data / "train.bin")
    assert ident["data"]["train.bin"].startswith(f"{size}:") and "derived" in ident
    bare = tmp_path / "bare"   # a run stopped before its first checkpoint: model config and log only
    rundir.write_model_config(str(bare), "gpt", asdict(tiny_model().config))
    (bare / "log.txt").write_text(f"model: 1 params; data {byte_data}: 6,000 train tokens\n")
    ident2 = rundir.read_identity(str(bare))
    assert ident2["recipe"] == ident2["seed"] == "unknown" and ident2["data"] == ident["data"]
    # pooling compares what is known: the architecture and data agree, the unknown recipe is not compared
    assert rundir.check_poolable([run, str(bare)]) is None
    # and the first known difference is named, whichever part it is in
    other = dict(ident, recipe=dict(ident["recipe"], batch_size=8), seed=8)
    with pytest.raises(UserError, match=r"x and y have different recipes \(batch_size 4 vs 8\)"):
        rundir.check_poolable([("x", ident), ("y", other)])
    assert "batch_size 4 vs 8" in rundir.check_poolable([("x", ident), ("y", other)], allow_mixed=True)
    with pytest.raises(UserError, match="one run given twice \\(the same seed 7 and the same settings\\)"):
        rundir.check_poolable([("x", ident), ("y", dict(ident))])


def test_a_failed_start_is_rolled_back_and_a_good_one_kept(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.txt").write_text("old line\n")
    (run / "provenance.json").write_text("{}")
    with pytest.raises(UserError):
        with rundir.RunStart() as start:
            start.claim(str(run))
            assert "pid " in (run / ".lock").read_text()
            (run / "log.txt").open("a").write("new line\n")
            (run / "provenance.json").write_text('{"changed": 1}')
            (run / "new.json").write_text("x")
            (run / "sub").mkdir()
            raise UserError("a check failed")
    assert sorted(os.listdir(run)) == ["log.txt", "provenance.json"]
    assert (run / "log.txt").read_text() == "old line\n" and (run / "provenance.json").read_text() == "{}"
    with pytest.raises(UserError):
        with rundir.RunStart() as start:
            start.claim(str(tmp_path / "fresh"))
            raise UserError("x")
    assert not (tmp_path / "fresh").exists()   # the folder this start created goes with it
    with pytest.raises(RuntimeError):
        with rundir.RunStart() as start:
            start.claim(str(run))
            start.started()
            (run / "ckpt.pt").write_text("written by the run")
            raise RuntimeError("a failure of the run itself, after its start")
    assert (run / "ckpt.pt").exists() and not (run / ".lock").exists()


def test_fp16_keeping_sums_keeps_every_norm_and_every_running_sum_close():
    """Norms that plain float16 rounding biases one way (all just above 1, 0.01, 100): each stored norm is the
    float16 value below or above it (within 2^-10 of itself), and each column's running sum stays within one
    float16 step of its values (plain rounding drifts by thousands of steps times its bias); zeros, inf and nan
    are kept as they are."""
    rng = np.random.default_rng(0)
    x = np.array([1.0, 0.01, 100.0]) * (1 + 2.0 ** -12 + 1e-5 * rng.random((3000, 3)))
    h = rundir.fp16_keeping_sums(x).astype(np.float64)
    assert np.all(np.abs(h - x) <= 2.0 ** -10 * x)
    step = np.array([2.0 ** -10, 2.0 ** -17, 2.0 ** -4])   # float16's spacing just above 1, 0.01, 100
    drift = np.abs(np.cumsum(h, 0) - np.cumsum(x, 0))
    assert np.all(drift <= step)
    plain = np.abs(np.cumsum(x.astype(np.float16).astype(np.float64), 0) - np.cumsum(x, 0))
    assert np.all(plain[-1] > 100 * step)   # what the carried error avoids
    odd = np.array([[0.0, np.inf, np.nan, 1.5], [0.0, 2.0, 3.0, -np.inf]])
    np.testing.assert_array_equal(rundir.fp16_keeping_sums(odd), odd.astype(np.float16))


def test_compact_grad_dump_in_float16_reads_back_with_the_same_shares(tmp_path):
    names = ["embed"] + [f"layer.{i}.{p}" for i in range(3) for p in ("attn", "mlp")] + ["head"]
    rows = np.exp(np.random.default_rng(1).normal(0, 2, (400, len(names))))   # 1e-3 .. 1e3: all float16-normal
    d = rundir.GradNormDump(names, str(tmp_path / "r" / "grad_norms.npz"), equalized=True)
    for s, r in enumerate(rows):
        d.record(s, torch.tensor(r, dtype=torch.float32), torch.tensor(r / 2, dtype=torch.float32))
    d.flush()
    run = str(tmp_path / "r")
    want = rundir.read_grad_dump(run)
    r = rundir.compact_grad_dump(run)
    assert r["dtype"] == "float16" and not r["skipped"] and r["after"] < r["before"] / 2
    assert r["fit"]["below_min_normal"] == 0 and r["fit"]["max_rel_error"] <= 2.0 ** -10
    with np.load(os.path.join(run, "grad_norms.npz")) as z:   # np.load reads it, the keys as before
        assert sorted(z.files) == ["names", "norms", "norms_equalized", "steps"] and z["norms"].dtype == np.float16
        np.testing.assert_allclose(z["norms"], rows, rtol=2.0 ** -10)
    got = rundir.read_grad_dump(run)
    assert got["sub_norms"].dtype == np.float64 and got["names"] == want["names"]
    np.testing.assert_allclose(got["share"], want["share"], rtol=1e-4)
    for part in ("attn", "mlp"):
        np.testing.assert_allclose(got["sub_share"][part], want["sub_share"][part], rtol=1e-4)
    np.testing.assert_allclose(got["norms_equalized"], want["norms_equalized"], rtol=2.0 ** -10)
    before = open(os.path.join(run, "grad_norms.npz"), "rb").read()
    assert rundir.compact_grad_dump(run)["skipped"] and open(os.path.join(run, "grad_norms.npz"), "rb").read() == before


def test_compact_fold_sublayers_keeps_each_layers_norm_and_share(tmp_path, capsys):
    """--fold_sublayers: one column per layer, sqrt(attn^2 + mlp^2) (hand-computed: 3-4-5 triangles), the
    same per-layer share read_grad_dump derived from the full dump, no sub-block split left; a folded dump
    is compact already the second time."""
    names = ["embed"] + [f"layer.{i}.{p}" for i in range(2) for p in ("attn", "mlp")] + ["head"]
    rows = np.tile([1.0, 3.0, 4.0, 6.0, 8.0, 2.0], (50, 1))
    d = rundir.GradNormDump(names, str(tmp_path / "r" / "grad_norms.npz"), equalized=True)
    for s, r in enumerate(rows):
        d.record(s, torch.tensor(r, dtype=torch.float32), torch.tensor(2 * r, dtype=torch.float32))
    d.flush()
    run = str(tmp_path / "r")
    want = rundir.read_grad_dump(run)
    rundir.compact_main(["compact", run, "--fold_sublayers"])
    assert "per layer, float16" in capsys.readouterr().out
    with np.load(os.path.join(run, "grad_norms.npz")) as z:
        assert list(z["names"]) == ["embed", "layer.0", "layer.1", "head"]
        np.testing.assert_array_equal(z["norms"][0], [1.0, 5.0, 10.0, 2.0])
        np.testing.assert_array_equal(z["norms_equalized"][0], [2.0, 10.0, 20.0, 4.0])
    got = rundir.read_grad_dump(run)
    assert "sub_share" not in got and got["names"] == want["names"]
    np.testing.assert_allclose(got["share"], [1 / 3, 2 / 3])
    np.testing.assert_allclose(got["share"], want["share"])
    assert rundir.compact_grad_dump(run, fold_sublayers=True)["skipped"]


@pytest.mark.parametrize("value, count", [(1e-6, "below_min_normal"), (7e4, "overflow")])
def test_compact_grad_dump_keeps_float32_when_float16_would_lose_a_norm(tmp_path, value, count):
    rows = np.ones((20, 6), dtype=np.float32)
    rows[7, 2] = value
    run = write_run(tmp_path / "r", tiny_model(), rows=rows)
    r = rundir.compact_grad_dump(run)
    assert r["dtype"] == "float32" and not r["fit"]["ok"] and r["fit"][count] == 1
    with np.load(os.path.join(run, "grad_norms.npz")) as z:
        np.testing.assert_array_equal(z["norms"], rows)   # exactly as trained
    assert rundir.compact_grad_dump(run, max_rel_error=1.0)["dtype"] == ("float16" if count == "below_min_normal"
                                                                           else "float32")   # overflow: never


def test_compact_cli_converts_every_dump_under_the_folders_atomically(tmp_path, capsys, monkeypatch):
    a = write_run(tmp_path / "runs" / "a", tiny_model(), rows=np.full((30, 6), 0.5))
    b = write_run(tmp_path / "runs" / "deeper" / "b", tiny_model(), rows=np.full((30, 6), 2.0))
    rundir.compact_main(["compact", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert out.count("float16, norms within 0 of themselves") == 2 and "2 dumps: " in out
    for run, v in ((a, 0.5), (b, 2.0)):
        assert sorted(os.listdir(run)) == ["ckpt.pt", "grad_norms.npz", "model_config.json"]   # no temporary left
        assert (rundir.read_grad_dump(run)["norms"] == v).all()
    c = write_run(tmp_path / "runs" / "c", tiny_model(), rows=np.full((30, 6), 3.0))
    before = open(os.path.join(c, "grad_norms.npz"), "rb").read()
    monkeypatch.setattr(rundir.os, "replace", lambda *x: (_ for _ in ()).throw(OSError(errno.ENOSPC, "disk full")))
    with pytest.raises(UserError, match="cannot write .*grad_norms.npz: disk full"):
        rundir.compact_main(["compact", str(tmp_path / "runs" / "c")])
    assert open(os.path.join(c, "grad_norms.npz"), "rb").read() == before and len(os.listdir(c)) == 3
    with pytest.raises(UserError, match="is not a folder"):
        rundir.compact_main(["compact", str(tmp_path / "nothing")])
