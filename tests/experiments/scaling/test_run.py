"""experiments/scaling/run.py, the multi-GPU scaling driver, on CPU: the whole study (ddp and fsdp on 1 and 2
gloo ranks, the kill-and-resume check) with train.py's ranks forked from this process instead of
torchrun's (a torch import less per rank: seconds faster; torchrun itself runs in the gpu test, and
train.py under torchrun in tests/test_train.py); the launcher's environment; the log arithmetic on a
hand-written log; the equality checks failing on planted differences; one-line errors."""
import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import torch

from gfa import rundir
from helpers import one_line_error, train_on_forked_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from experiments.scaling import run as scaling  # noqa: E402

# a tapered 4-layer cascade_a2 (heads 4, 4, 3, 3) after the CPU scale, every width / 4 again
MODEL = ["--device=cpu", "--n_layer=4", "--d_model=32", "--head_dim=8", "--d_attn0=32", "--S_d=8", "--d_ffn0=64",
         "--block_size=32", "--eval_iters=1", "--eval_batch_size=4"]
STUDY = ["--configs=config/tiny.py,config/cascade_a2.py", "--nproc=1,2", "--batch_size=8", "--micro_batch=2",
         "--steps=4", "--skip=1", "--log_interval=1", f"--train_args={' '.join(MODEL)}"]


def forked_launch(cmd, output):
    """scaling.launch's stand-in: the torchrun command's train.py argv, run by n ranks forked from this
    process (a gloo group, the environment torchrun gives); 0 when every rank exits cleanly."""
    n = int(next(a for a in cmd if a.startswith("--nproc_per_node=")).split("=")[1])
    return train_on_forked_ranks(n, cmd[cmd.index("train.py") + 1:], stdout=output)


def test_the_study_on_cpu_ranks_gives_the_table_and_its_checks_pass(tmp_path, byte_data, monkeypatch):
    monkeypatch.setattr(scaling, "launch", forked_launch)
    out = str(tmp_path / "scaling")
    report = scaling.main([f"--data_dir={byte_data}", f"--out={out}", *STUDY])
    runs = {(r["mode"], r["n"]): r for r in report["runs"]}
    assert sorted(runs) == [("ddp", 1), ("ddp", 2), ("fsdp", 1), ("fsdp", 2)]
    assert all(r["error"] is None for r in runs.values())
    assert [runs[k]["accum"] for k in sorted(runs)] == [4, 2, 4, 2]   # 8 sequences = n x 2 x accum
    # every run against its 1-GPU reference (fsdp's against ddp's): one step-0 loss, the same layer norms
    assert runs[("ddp", 1)].get("check") is None
    assert {k: runs[k]["reference"] for k in runs if k != ("ddp", 1)} == {
        ("ddp", 2): "ddp_n1", ("fsdp", 1): "ddp_n1", ("fsdp", 2): "fsdp_n1"}
    for k, r in runs.items():
        assert r["loss0"] == runs[("ddp", 1)]["loss0"]
        if k != ("ddp", 1):
            assert r["check"]["ok"] and r["check"]["norm_rel_diff"] < 1e-5, r["check"]
        assert r["efficiency"] == pytest.approx(r["tok_s_per_gpu"] / runs[(k[0], 1)]["tok_s_per_gpu"])
        assert r["tok_s"] == pytest.approx(8 * 32 * 1000 / r["ms_step"])   # 8 x 32 tokens a step
    # stopped at step 2 and resumed: the uninterrupted run's losses and every step's norms (fp32 on CPU: equal)
    assert [(r["mode"], r["resumed"], r["check"]["ok"]) for r in report["resume"]] == [("ddp", [2], True),
                                                                                       ("fsdp", [2], True)]
    assert all(r["check"]["norm_steps"] == 4 and r["check"]["loss_diff"] == 0 for r in report["resume"])
    md = open(os.path.join(out, "scaling.md")).read()
    assert md.count("| ok |") == 5 and "FAIL" not in md and "| reference |" in md
    assert json.load(open(os.path.join(out, "scaling.json")))["runs"][1]["check"]["ok"]
    assert "--nproc_per_node=2 train.py config/tiny.py config/cascade_a2.py" in md and "--parallel=fsdp" in md
    assert not any(os.path.exists(rundir.file(os.path.join(out, r), rundir.CKPT)) or
                   os.path.exists(rundir.file(os.path.join(out, r), rundir.SHARDED)) for r in os.listdir(out))

    # a second call reuses every finished run; one with another setting runs that part again
    monkeypatch.setattr(scaling, "launch", lambda cmd, output: pytest.fail(f"ran again: {cmd}"))
    assert scaling.main([f"--data_dir={byte_data}", f"--out={out}", *STUDY])["runs"] == report["runs"]
    launched = []
    monkeypatch.setattr(scaling, "launch", lambda cmd, output: launched.append(cmd) or 1)
    with pytest.raises(SystemExit):   # every launch "fails": the table says so and the exit status is 1
        scaling.main([f"--data_dir={byte_data}", f"--out={out}", *STUDY, "--steps=5", "--modes=ddp", "--resume_at=0"])
    assert len(launched) == 2 and "failed" in open(os.path.join(out, "scaling.md")).read()


def test_launch_runs_from_the_root_with_nvlink_multicast_off(tmp_path, monkeypatch):
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")   # whatever the caller's environment says
    monkeypatch.delenv("NVSHMEM_DISABLE_NVLS", raising=False)
    out = str(tmp_path / "x.out")
    show = "import os; print(os.getcwd(), os.environ['NCCL_NVLS_ENABLE'], os.environ['NVSHMEM_DISABLE_NVLS'])"
    assert scaling.launch([sys.executable, "-c", show], out) == 0
    assert open(out).read().split() == [ROOT, "0", "1"]
    assert scaling.launch([sys.executable, "-c", "import sys; sys.exit('no')"], out) == 1 and "no" in open(out).read()


LOG = """model: 1,221,036,032 params (1,118,055,424 without the embedding), 7,962.9 MFLOP/token forward; data d
device cuda:0 x 2, fsdp, dtype bfloat16, compile True; global batch 64 x 2048 tokens = 8 per micro-step x 4 ...
step 0 | val loss 10.9397 | val ppl 56369.47
step 0 | loss 10.9237 | lr 1.00e-07 | grad norm 14.8825 | 60000.0 ms/step | 2,185 tok/s | MFU 0.1% | peak mem 50.00 GiB
step 5 | loss 9.7441 | lr 6.00e-07 | grad norm 0.8084 | 1000.0 ms/step | 131,072 tok/s | MFU 20.0% | peak mem 61.25 GiB
step 10 | loss 9.3334 | lr 1.10e-06 | grad norm 0.7793 | 1000.0 ms/step | 131,072 tok/s | MFU 20.0% | peak mem 61.50 GiB
resumed at step 10, settings unchanged
step 15 | loss 8.9538 | lr 1.60e-06 | grad norm 0.4430 | 2000.0 ms/step | 65,536 tok/s | MFU 10.0% | peak mem 61.50 GiB
step 19 | loss 8.4476 | lr 2.00e-06 | grad norm 0.5075 | 500.0 ms/step | 262,144 tok/s | MFU 40.0% | peak mem 61.50 GiB
step 20 | val loss 8.4 | val ppl 4447.07
"""


def test_the_window_of_a_hand_written_log(tmp_path):
    (tmp_path / "log.txt").write_text(LOG)
    log = scaling.read_log(str(tmp_path))
    assert sorted(log["steps"]) == [0, 5, 10, 15, 19] and log["val"] == {0: 10.9397, 20: 8.4}
    assert log["resumed"] == [10] and log["steps"][5]["mfu"] == pytest.approx(0.2)
    t = scaling.throughput(log, skip=5, n=2, tokens_per_step=64 * 2048)
    # steps 6-10 at 1 s, 11-15 at 2 s, 16-19 at 0.5 s: 14 steps in 17 s; step 0 (compile) and 1-5 left out
    assert t["timed_steps"] == [6, 19] and t["ms_step"] == pytest.approx(17000 / 14)
    assert t["tok_s"] == pytest.approx(14 * 64 * 2048 / 17) and t["tok_s_per_gpu"] == pytest.approx(t["tok_s"] / 2)
    assert t["mfu"] == pytest.approx(0.2 * 14 / 17)   # MFU is proportional to tokens/s: 20 % at 1 s a step
    assert t["peak_mem_gib"] == 61.5
    with pytest.raises(scaling.UserError, match="no logged interval after step 19"):
        scaling.throughput(log, skip=19, n=2, tokens_per_step=1)


def planted_run(path, loss0, norms):
    """A run directory with a one-line log (step 0's loss) and a dump of two steps of the given group norms."""
    os.makedirs(path)
    names = ["embed", "layer.0.attn", "layer.0.mlp", "layer.1.attn", "layer.1.mlp", "head"]
    dump = rundir.GradNormDump(names, rundir.file(path, rundir.GRAD_DUMP))
    for step in (0, 1):
        dump.record(step, torch.tensor(norms, dtype=torch.float32))
    dump.flush()
    with open(rundir.file(path, rundir.LOG), "w") as f:
        f.write(f"step 0 | loss {loss0:.4f} | lr 1e-07 | grad norm 1.0 | 10.0 ms/step | 100 tok/s | MFU n/a\n")
    return path


def test_the_checks_fail_on_planted_differences(tmp_path):
    base = [1.0, 3.0, 4.0, 6.0, 8.0, 2.0]   # layer norms 5 and 10 (3-4-5 and 6-8-10 triangles)
    ref = planted_run(str(tmp_path / "ref"), 10.9, base)
    same = planted_run(str(tmp_path / "same"), 10.91, [x * 1.005 for x in base])
    c = scaling.compare(same, ref, loss_atol=0.02, norm_rtol=0.02)
    assert c["ok"] and c["loss_diff"] == pytest.approx(0.01) and c["norm_rel_diff"] == pytest.approx(0.005, rel=1e-3)
    # layer 1's MLP 8 -> 8.8: its layer norm sqrt(36 + 77.44) = 10.65, 6.5 % off; every other group equal
    off = planted_run(str(tmp_path / "off"), 10.9, base[:4] + [8.8, 2.0])
    c = scaling.compare(off, ref, loss_atol=0.02, norm_rtol=0.02)
    assert not c["ok"] and c["worst"] == "layer.1 at step 0"
    assert c["norm_rel_diff"] == pytest.approx(np.sqrt(36 + 8.8 ** 2) / 10 - 1, rel=1e-5)
    far = planted_run(str(tmp_path / "far"), 10.95, base)
    assert not scaling.compare(far, ref, loss_atol=0.02, norm_rtol=0.02)["ok"]
    assert scaling.compare(far, ref, loss_atol=0.1, norm_rtol=0.02)["ok"]   # the tolerance is the caller's


def test_bad_input_is_one_line(tmp_path, byte_data, capsys):
    base = [f"--data_dir={byte_data}", f"--out={tmp_path / 'o'}", "--train_args=--device=cpu"]
    for extra, words in [(["--nproc=1,3"], "does not split into 3 GPUs"),
                         (["--nproc=1", "--modes=zero"], "--modes=zero: use"),
                         (["--nproc=1,x"], "give numbers of GPUs"),
                         (["--nproc=1", "--steps=5"], "need 1 <= skip < steps"),
                         (["--nproc=1", "--resume_at=40"], "--resume_at=40: must be"),
                         (["--nproc=2", "--data_dir="], "give a dataset folder")]:
        assert words in one_line_error(scaling.main, base + extra, capsys)
    if not torch.cuda.is_available():
        assert "no GPU is visible" in one_line_error(scaling.main, [f"--data_dir={byte_data}"], capsys)
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.gpu
def test_the_study_on_gpus(tmp_path, byte_data):
    """torchrun itself, NCCL, compile and bf16 on the GPUs there are (1 and 2 at most): MFU and peak memory in
    the table, and the checks pass at the default bf16 tolerance. On one GPU only DDP: each launch compiles,
    six took more than 230 s, and FSDP compiled in bf16 with a resume on one GPU is
    tests/test_train.py::test_fsdp_on_a_gpu_compiled_bf16_checkpointed."""
    out = str(tmp_path / "scaling")
    two = torch.cuda.device_count() > 1
    study = [a for a in STUDY if not a.startswith(("--nproc", "--train_args", "--steps", "--log_interval"))]
    report = scaling.main([f"--data_dir={byte_data}", f"--out={out}", *study, "--nproc=" + ("1,2" if two else "1"),
                           "--modes=" + ("ddp,fsdp" if two else "ddp"), "--steps=12", "--log_interval=2",
                           f"--train_args={' '.join(MODEL[1:])}"])
    assert {r["mode"] for r in report["runs"]} == ({"ddp", "fsdp"} if two else {"ddp"})
    for r in report["runs"]:
        assert r["error"] is None and r["mfu"] > 0 and r["peak_mem_gib"] > 0
    assert all(r["check"]["ok"] for r in report["runs"] + report["resume"] if r.get("check"))
