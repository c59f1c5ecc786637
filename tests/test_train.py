"""train.py on CPU: learning, exact resume, DDP == one process (a real torchrun), the gradient-norm
dump against hand-computed norms, norm equalisation, the run directory it writes, starting from
another checkpoint's weights, and the one-line errors for bad input. Tiny models, fast."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
from gfa import memory as gfa_memory
from gfa import rundir
from gfa.data import DATA, get_batch, load_tokens
from gfa.evaluation import evaluate
from helpers import one_line_error, train_on_forked_ranks
from model import GPT, GPTConfig, drop_layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
load_grad_dump = rundir.read_grad_dump

TINY = ["--dataset=shakespeare", "--n_layer=3", "--d_model=32", "--head_dim=8", "--d_attn0=32", "--S_d=8",
        "--d_ffn0=64", "--vocab_size=256", "--block_size=32", "--batch_size=8", "--eval_iters=2",
        "--eval_batch_size=4", "--warmup_iters=2", "--learning_rate=3e-3", "--log_interval=1", "--device=cpu",
        "--eval_interval=1000"]


def run(tmp_path, name, *extra):
    out = str(tmp_path / name)
    return train.main(TINY + [f"--out_dir={out}", *extra]), out


def cli(*args, env=None):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env or {**os.environ, "OMP_NUM_THREADS": "1"})


def test_loss_falls(tmp_path):
    hist, _ = run(tmp_path, "a", "--max_iters=40", "--eval_interval=40")
    losses = list(hist["loss"].values())
    assert np.mean(losses[-5:]) < np.mean(losses[:3]) - 1.0, losses
    val = hist["val"]
    assert val[40] < val[0] - 1.0, val


def test_resume_reproduces_uninterrupted_run(tmp_path):
    full, out_a = run(tmp_path, "a", "--max_iters=8", "--eval_interval=4")
    part, out_b = run(tmp_path, "b", "--max_iters=8", "--eval_interval=4", "--stop_iter=5")
    assert torch.load(os.path.join(out_b, "ckpt.pt"), weights_only=False)["iter_num"] == 5
    rest, _ = run(tmp_path, "b", "--max_iters=8", "--eval_interval=4", "--init_from=resume")
    assert part["loss"] | rest["loss"] == full["loss"]          # bit-exact on CPU
    a, b = load_grad_dump(out_a), load_grad_dump(out_b)
    assert list(b["steps"]) == list(range(8))
    for k in ("steps", "norms", "share"):
        np.testing.assert_array_equal(a[k], b[k])
    ca = torch.load(os.path.join(out_a, "ckpt.pt"), weights_only=False)["model"]
    cb = torch.load(os.path.join(out_b, "ckpt.pt"), weights_only=False)["model"]
    assert all(torch.equal(ca[k], cb[k]) for k in ca)


def test_stop_after_min_stops_at_a_log_line_with_a_checkpoint(tmp_path):
    """A time limit already passed stops the run at its first log line (the one of step 0, so at step 1),
    checkpointed there as --stop_iter would, and the run resumes to the end."""
    part, out = run(tmp_path, "t", "--max_iters=8", "--log_interval=3", "--stop_after_min=1e-9")
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)["iter_num"] == 1
    assert "stop_after_min=1e-09 reached: stopping at step 1" in open(os.path.join(out, "log.txt")).read()
    rest, _ = run(tmp_path, "t", "--max_iters=8", "--log_interval=3", "--init_from=resume")
    assert max(rest["loss"]) == 7


def test_resuming_a_run_from_before_sub_blocks_keeps_its_layout(tmp_path):
    """A run whose dump has one group per layer (earlier versions) continues in that layout, its rows
    kept; a new run records attention and MLP apart, and its per-layer norms are the old ones."""
    _, new = run(tmp_path, "new", "--max_iters=4", "--eval_interval=2")
    _, old = run(tmp_path, "old", "--max_iters=4", "--eval_interval=2", "--stop_iter=2")
    ckpt = torch.load(os.path.join(old, "ckpt.pt"), weights_only=False)
    coarse, names = rundir.per_layer(ckpt["grad_dump"]["norms"], ckpt["grad_dump"]["names"])
    ckpt["grad_dump"] = {"names": names, "steps": ckpt["grad_dump"]["steps"], "norms": coarse}
    torch.save(ckpt, os.path.join(old, "ckpt.pt"))
    os.remove(os.path.join(old, "grad_norms.npz"))
    run(tmp_path, "old", "--max_iters=4", "--eval_interval=2", "--init_from=resume")
    with np.load(os.path.join(old, "grad_norms.npz")) as z:
        assert list(z["names"]) == names and z["steps"].tolist() == [0, 1, 2, 3]
        np.testing.assert_array_equal(z["norms"][:2], coarse)
    a, b = load_grad_dump(new), load_grad_dump(old)
    assert "sub_share" in a and "sub_share" not in b
    np.testing.assert_allclose(a["norms"], b["norms"], rtol=1e-6)


def test_a_run_from_before_a_model_key_resumes(tmp_path):
    """model_config.json written before the normalisation keys existed: the run had their defaults, so
    it resumes (and serves as an equalisation reference) as the same model."""
    _, out = run(tmp_path, "old", "--max_iters=4", "--eval_interval=2", "--stop_iter=2")
    path = os.path.join(out, "model_config.json")
    d = json.load(open(path))
    for k in ("norm_placement", "mix_post_fraction", "post_ln", "norm_scale", "residual_scale"):
        del d["config"][k]
    json.dump(d, open(path, "w"))
    run(tmp_path, "old", "--max_iters=4", "--eval_interval=2", "--init_from=resume")
    assert rundir.read_model_config(out)[1]["norm_placement"] == "pre"
    assert train.reference_max_norm(out, 2, GPTConfig.from_dict(rundir.read_model_config(out)[1])) > 0


def test_sgd_run_trains_with_sgd(tmp_path):
    _, out = run(tmp_path, "sgd", "--max_iters=2", "--optimizer=sgd", "--learning_rate=0.1")
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert ckpt["train_config"]["optimizer"] == "sgd"
    groups = ckpt["optimizer"]["param_groups"]
    assert groups[0]["momentum"] == 0.9 and "betas" not in groups[0]
    assert all("momentum_buffer" in st for st in ckpt["optimizer"]["state"].values())


def test_ddp_two_ranks_equal_one_process(tmp_path):
    args = TINY + ["--max_iters=4"]
    single, out_1 = run(tmp_path, "one", "--max_iters=4")
    accum, out_acc = run(tmp_path, "acc", "--max_iters=4", "--gradient_accumulation_steps=2")
    out_2 = str(tmp_path / "two")
    r = cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *args,
            f"--out_dir={out_2}")
    assert r.returncode == 0, r.stderr[-3000:]
    ddp_loss = {int(l.split()[1]): float(l.split("| loss ")[1].split()[0])
                for l in r.stdout.splitlines() if l.startswith("step ") and "| loss " in l}
    assert ddp_loss.keys() == single["loss"].keys()
    for s in single["loss"]:
        assert abs(ddp_loss[s] - single["loss"][s]) < 2e-4 and abs(accum["loss"][s] - single["loss"][s]) < 1e-5
    d1, d2, da = load_grad_dump(out_1), load_grad_dump(out_2), load_grad_dump(out_acc)
    np.testing.assert_allclose(d2["norms"], d1["norms"], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(da["norms"], d1["norms"], rtol=1e-4, atol=1e-7)
    m1 = torch.load(os.path.join(out_1, "ckpt.pt"), weights_only=False)["model"]
    m2 = torch.load(os.path.join(out_2, "ckpt.pt"), weights_only=False)["model"]
    for k in m1:
        torch.testing.assert_close(m2[k], m1[k], rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_compiled_ddp_trains_after_an_evaluation_of_another_batch_size(tmp_path):
    """torchrun on one GPU, the paper's Vanilla-16L as config/vanilla_16l.py gives it (fp32, compiled, DDP;
    ~55 GiB): the step-0 evaluation runs 8 sequences, the training micro-steps 4 (auto's pick on 80 GB).
    With the batch dimension left to dynamo, the second shape made it symbolic and DDP's graph splitter
    failed on the first training step ("'int' object has no attribute 'meta'", on an H100; the small scale
    and CPUs compile either way); each shape now gets its own static graph. lr 0: no checkpoint is written."""
    r = cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py", "config/vanilla_16l.py",
            "--dataset=shakespeare", "--device=cuda", "--batch_size=8", "--micro_batch=4", "--max_iters=1",
            "--eval_iters=1", "--learning_rate=0.0", "--min_lr=0.0", "--warmup_iters=0",
            "--always_save_checkpoint=False", f"--out_dir={tmp_path / 'a'}")
    errors = [line for line in (r.stdout + r.stderr).splitlines() if "error: " in line]   # torchrun's trace buries it
    assert r.returncode == 0, "\n".join(errors) or r.stdout[-2000:] + r.stderr[-2000:]
    assert "4 per micro-step x 2 accumulation" in r.stdout
    assert "step 0 | loss " in r.stdout and "step 1 | val loss " in r.stdout


def test_dumped_norms_equal_hand_computed(tmp_path):
    _, out = run(tmp_path, "a", "--max_iters=1", "--n_layer=2", "--repeats=[1, 2]", "--deep_supervision=True")
    dump = load_grad_dump(out)
    cfg = GPTConfig(n_layer=2, d_model=32, head_dim=8, d_attn0=32, S_d=8, d_ffn0=64, vocab_size=256, block_size=32,
                    repeats=[1, 2], deep_supervision=True)
    torch.manual_seed(train.seed)
    model = GPT(cfg)
    x, y = get_batch(load_tokens(os.path.join(DATA, "shakespeare/train.bin")), 8, 32, step=0, seed=train.seed)
    model(x, y)[1].backward()
    groups = model.param_groups_by_layer()
    hand = [torch.sqrt(sum((p.grad.double() ** 2).sum() for p in groups[n])).item() for n in dump["names"]]
    assert dump["names"] == ["embed", "layer.0", "layer.1", "head"]
    np.testing.assert_allclose(dump["norms"][0], hand, rtol=1e-5)
    layers = np.array(hand[1:-1])   # Eq. 2 over the transformer layers only (not embed / head)
    np.testing.assert_allclose(dump["share"], layers / layers.sum(), rtol=1e-5)
    # the file records attention and MLP apart (the layer norms above are derived from them)
    b = model.blocks
    parts = {"attn": [[b[i].attn_norm.weight, *b[i].attn.parameters()] for i in range(2)],
             "mlp": [[b[i].ffn_norm.weight, *b[i].ffn.parameters()] for i in range(2)]}
    sub = {k: np.array([torch.sqrt(sum((p.grad.double() ** 2).sum() for p in ps)).item() for ps in v])
           for k, v in parts.items()}
    with np.load(os.path.join(out, "grad_norms.npz")) as z:
        assert list(z["names"]) == ["embed", "layer.0.attn", "layer.0.mlp", "layer.1.attn", "layer.1.mlp", "head"]
        np.testing.assert_allclose(z["norms"][0, 1:5], np.stack([sub["attn"], sub["mlp"]], 1).ravel(), rtol=1e-5)
    for k in ("attn", "mlp"):
        np.testing.assert_allclose(dump["sub_share"][k], sub[k] / sub[k].sum(), rtol=1e-5)


def test_equalize_makes_layer_norms_equal(tmp_path):
    _, out = run(tmp_path, "a", "--max_iters=3", "--equalize=True", "--equalize_clip_factor=2.0")
    d = load_grad_dump(out)
    cols = [i for i, n in enumerate(d["names"]) if n.startswith("layer.")]
    other = [i for i, n in enumerate(d["names"]) if not n.startswith("layer.")]
    raw, eq = d["norms"], d["norms_equalized"]
    assert raw.shape == eq.shape == (3, len(d["names"]))
    for t in range(3):
        np.testing.assert_allclose(eq[t, cols], raw[t, cols].max(), rtol=1e-5)
        assert raw[t, cols].std() > 0                       # they were not equal before
    np.testing.assert_array_equal(eq[:, other], raw[:, other])   # embed / head untouched


@pytest.mark.parametrize("via", ["lr", "lr_mean"])
def test_equalize_via_lr_scales_each_layers_lr_by_its_factor(tmp_path, via):
    """equalize_via='lr': the checkpoint's optimizer holds a group pair per layer whose lr at the last step is
    the schedule's times that step's factor (the largest layer norm over the layer's own, from the dump);
    'lr_mean': times the factor over the layers' mean. The gradients are not rescaled (no norms_equalized;
    step 0's norms are the standard run's), but the updates are (step 1's differ)."""
    from gfa.training import cosine_lr
    _, std = run(tmp_path, "std", "--max_iters=3")
    _, out = run(tmp_path, "lr", "--max_iters=3", "--equalize=True", f"--equalize_via={via}")
    d, s = load_grad_dump(out), load_grad_dump(std)
    assert "norms_equalized" not in d
    np.testing.assert_array_equal(d["norms"][0], s["norms"][0])
    assert not np.allclose(d["norms"][1], s["norms"][1])
    layer_norm = dict(zip(d["names"], d["norms"][-1].astype(np.float64)))
    top = max(v for n, v in layer_norm.items() if n.startswith("layer."))
    mean = np.mean([top / v for n, v in layer_norm.items() if n.startswith("layer.")]) if via == "lr_mean" else 1.0
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    lr = cosine_lr(2, 3e-3, ckpt["train_config"]["min_lr"], 2, 3)
    groups = ckpt["optimizer"]["param_groups"]
    assert {g["layer_group"] for g in groups} == {"embed", "layer.0", "layer.1", "layer.2", "head"}
    for g in groups:
        factor = top / layer_norm[g["layer_group"]] / mean if g["layer_group"].startswith("layer.") else 1.0
        assert g["lr"] == pytest.approx(lr * factor, rel=1e-5), g["layer_group"]
    assert max(g["lr"] for g in groups) > 1.05 * lr


def total_norms(d, key="norms"):
    return np.sqrt((d[key].astype(np.float64) ** 2).sum(1))


def test_equalize_clip_factor_is_derived_as_the_paper_says(tmp_path, capsys):
    """Appendix A.2.2: factor = max norm of the equalised model / max norm of the standard model. The two
    maxima, computed independently here from runs trained on their own, over the same first P steps."""
    P, common = 4, ["--max_iters=6", "--eval_interval=3", "--equalize_pilot_iters=4"]
    _, std = run(tmp_path, "standard", *common)                                     # the standard model
    _, eq1 = run(tmp_path, "eq1", *common, "--equalize=True", "--equalize_clip_factor=1.0")   # clipped alike
    want = total_norms(load_grad_dump(eq1, before_step=P), "norms_equalized").max() \
        / total_norms(load_grad_dump(std, before_step=P)).max()
    _, derived = run(tmp_path, "derived", *common, "--equalize=True")             # two pilots
    _, from_ref = run(tmp_path, "ref", *common, "--equalize=True", f"--equalize_reference={std}")   # one pilot
    rec = [torch.load(os.path.join(o, "ckpt.pt"), weights_only=False)["equalize_clip"] for o in (derived, from_ref)]
    assert abs(want - 1) > 1e-3   # the factor is not trivially 1 here
    for r in rec:
        assert r["factor"] == pytest.approx(want, rel=1e-6), (r, want)
    assert rec[0]["standard_from"] == "pilot" and rec[1]["standard_from"] == std
    # the pilots leave no trace: the run equals one given the factor outright
    _, given = run(tmp_path, "given", *common, "--equalize=True", f"--equalize_clip_factor={rec[0]['factor']!r}")
    a = torch.load(os.path.join(derived, "ckpt.pt"), weights_only=False)["model"]
    b = torch.load(os.path.join(given, "ckpt.pt"), weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = open(os.path.join(derived, "log.txt")).read()
    assert "equalisation clip factor" in log and "% of the 6 steps recorded" in log
    # a resume keeps the recorded factor (no pilots again)
    run(tmp_path, "derived", *common[1:], "--max_iters=8", "--equalize=True", "--init_from=resume",
        "--allow_changes=max_iters")
    again = torch.load(os.path.join(derived, "ckpt.pt"), weights_only=False)["equalize_clip"]
    assert again == rec[0]
    # a reference of another model, or without the steps, is a one-line error
    bad = TINY + [*common, "--equalize=True", f"--equalize_reference={std}"]
    assert "holds another model" in one_line_error(train.main, bad + [f"--out_dir={tmp_path / 'b1'}", "--d_ffn0=32"],
                                                   capsys)
    assert "covers steps 0..7" in one_line_error(train.main, bad + [f"--out_dir={tmp_path / 'b2'}",
                                                                    "--equalize_pilot_iters=8"], capsys)


def test_run_directory(tmp_path):
    """The files train.py leaves (gfa/rundir.py's contract): the architecture once, in model_config.json;
    the training settings without model keys; the default out_dir from the config files' names."""
    _, out = run(tmp_path, "a", "--max_iters=2")
    assert sorted(os.listdir(out)) == ["ckpt.pt", "grad_norms.npz", "identity.json", "log.txt", "model_config.json",
                                       "provenance.json"]
    kind, mc = rundir.read_model_config(out)
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert kind == ckpt["kind"] == "gpt" and mc["n_layer"] == 3 and "model_config" not in ckpt
    assert "n_layer" not in ckpt["train_config"] and ckpt["train_config"]["batch_size"] == 8
    old = os.getcwd()
    try:
        os.chdir(tmp_path)
        train.main([os.path.join(ROOT, "config/tiny.py"), os.path.join(ROOT, "config/vanilla_8l.py"),
                    *[a for a in TINY if not a.startswith(("--n_layer", "--dataset"))], "--max_iters=1"])
    finally:
        os.chdir(old)
    assert rundir.read_model_config(str(tmp_path / "out/tiny_vanilla_8l"))[1]["n_layer"] == 8


def test_a_new_run_never_mixes_with_an_old_one(tmp_path, capsys):
    """A run directory's files belong to one run: a new run into a folder holding another is
    refused (files untouched) unless --overwrite=True, which replaces the old run's files."""
    import hashlib
    _, out = run(tmp_path, "a", "--max_iters=2")
    digest = lambda: {f: hashlib.sha256(open(os.path.join(out, f), "rb").read()).hexdigest() for f in os.listdir(out)}
    before = digest()
    for extra in (["--n_layer=2"], ["--n_layer=2", "--dtype=fp16"]):
        msg = one_line_error(train.main, [*TINY, f"--out_dir={out}", "--max_iters=2", *extra], capsys)
        assert "already holds a run" in msg or "dtype='fp16'" in msg, msg
        assert digest() == before
    train.main(TINY + [f"--out_dir={out}", "--max_iters=2", "--n_layer=2", "--overwrite=True"])
    model, ckpt = rundir.load_gpt(out)   # the files agree: the 2-layer architecture, the 2-layer weights
    assert model.config.n_layer == 2 and rundir.read_grad_dump(out, ckpt["iter_num"])["norms"].shape == (2, 4)
    assert open(os.path.join(out, "log.txt")).read().count("model: ") == 1   # the old run's log went with it
    for f in ("fanin_summary.json", "fig3_share_vs_fanin.png", "prune/table1.md"):   # and its results
        os.makedirs(os.path.dirname(os.path.join(out, f)), exist_ok=True)
        open(os.path.join(out, f), "w").close()
    train.main(TINY + [f"--out_dir={out}", "--max_iters=2", "--overwrite=True"])
    assert sorted(os.listdir(out)) == ["ckpt.pt", "grad_norms.npz", "identity.json", "log.txt", "model_config.json",
                                       "provenance.json"]


def test_resuming_a_run_of_an_earlier_version_brings_it_up_to_date(tmp_path):
    """Earlier versions kept the architecture inside ckpt.pt and wrote no model_config.json."""
    _, out = run(tmp_path, "old", "--max_iters=4", "--stop_iter=2", "--eval_interval=2")
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    _, mc = rundir.read_model_config(out)
    for k in ("kind", "save_id"):
        del ckpt[k]
    torch.save(dict(ckpt, model_config=mc), os.path.join(out, "ckpt.pt"))
    os.remove(os.path.join(out, "model_config.json"))
    run(tmp_path, "old", "--max_iters=4", "--eval_interval=2", "--init_from=resume")
    assert rundir.read_model_config(out) == ("gpt", mc) and os.path.isfile(os.path.join(out, "model_config.json"))
    model, ck = rundir.load_gpt(out)
    assert ck["iter_num"] == 4 and model.config.n_layer == 3


def test_a_blown_up_update_is_never_saved(tmp_path, monkeypatch, capsys):
    """The loss and gradient of step 3 are finite, but its update leaves a weight at 1e38 (finite, an
    exploded, dead model): the eval at step 4 must refuse to save it, and keep step 2's checkpoint."""
    real = train.optimizer_for

    def poisoned(*a, **kw):
        opt = real(*a, **kw)
        step = opt.step

        def blow_up(*sa, **skw):
            step(*sa, **skw)
            opt.n = getattr(opt, "n", 0) + 1
            if opt.n == 4:
                opt.param_groups[0]["params"][0].data.view(-1)[0] = 1e38
        opt.step = blow_up
        return opt
    monkeypatch.setattr(train, "optimizer_for", poisoned)
    out = str(tmp_path / "run")
    msg = one_line_error(train.main, [*TINY, f"--out_dir={out}", "--max_iters=6", "--eval_interval=2"], capsys)
    assert "a weight is non-finite or has exploded after step 4 (max |w| 1e+38 in tok_emb.weight)" in msg
    assert f"the last good checkpoint {out}/ckpt.pt is kept" in msg
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert ckpt["iter_num"] == 2 and max(v.abs().max() for v in ckpt["model"].values()) < 1e3


def test_resume_continues_exactly_or_says_what_it_changes(tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main(TINY + ["--max_iters=6", "--eval_interval=2", "--stop_iter=2", f"--out_dir={out}"])
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()
    import shutil
    shutil.copytree(os.path.join(DATA, "shakespeare"), tmp_path / "copy")   # the same tokens, another folder
    for extra, what in [(["--learning_rate=0.1"], "learning_rate (checkpoint 0.003, now 0.1)"),
                        ([f"--data_dir={tmp_path / 'copy'}"], "data_dir (checkpoint '', now"),
                        (["--max_iters=9"], "max_iters (checkpoint 6, now 9)")]:
        msg = one_line_error(train.main, [*TINY, "--max_iters=6", "--eval_interval=2", f"--out_dir={out}",
                                          "--init_from=resume", *extra], capsys)
        assert what in msg and "--allow_changes=" in msg, msg
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before   # refused before any write
    hist = train.main(TINY + ["--max_iters=8", "--eval_interval=2", f"--out_dir={out}", "--init_from=resume",
                              "--allow_changes=max_iters", "--log_interval=3"])   # log_interval: free to change
    assert max(hist["val"]) == 8
    log = open(os.path.join(out, "log.txt")).read()
    assert "resumed at step 2: max_iters 6 -> 8" in log


def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    base = [*TINY, "--max_iters=4", "--eval_interval=2"]
    fails = lambda *extra: one_line_error(train.main, [*base, *extra], capsys)
    assert "does not exist" in fails(f"--data_dir={tmp_path / 'nowhere'}", f"--out_dir={tmp_path / 'x'}")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/train.bin").write_bytes(b"")
    (tmp_path / "empty/val.bin").write_bytes(b"")
    assert "is empty" in fails(f"--data_dir={tmp_path / 'empty'}", f"--out_dir={tmp_path / 'x'}")
    assert "vocab_size is 100" in fails("--vocab_size=100", f"--out_dir={tmp_path / 'x'}")
    assert "batch_size=7" in fails("--batch_size=7", "--gradient_accumulation_steps=2", f"--out_dir={tmp_path / 'x'}")
    assert "compile='yes'" in fails("--compile=yes", f"--out_dir={tmp_path / 'x'}")
    assert "n_head has 1 entries but n_layer=3" in fails("--n_head=[4]", f"--out_dir={tmp_path / 'x'}")   # ConfigError
    for bad, words in [("--learning_rate=-1e-3", "learning_rate=-0.001: must be >= 0"),
                       ("--beta1=1.0", "beta1=1.0: must be in [0, 1)"), ("--seed=-1", "seed=-1: must be >= 0"),
                       ("--dtype=fp16", "dtype='fp16'"), ("--device=cuda:0", "no CUDA GPU is visible"),
                       ("--fused_ce_chunk=0", "fused_ce_chunk=0: must be >= 1")]:
        if "cuda" in bad and torch.cuda.is_available():
            continue
        assert words in fails(bad, f"--out_dir={tmp_path / 'x'}")
    assert not os.path.exists(tmp_path / "x")   # a failed start leaves no folder behind
    out = str(tmp_path / "run")
    train.main(TINY + ["--max_iters=4", "--eval_interval=2", "--stop_iter=2", f"--out_dir={out}"])
    assert "n_layer (checkpoint 3, requested 4)" in fails("--n_layer=4", "--init_from=resume", f"--out_dir={out}")
    assert "does not exist" in fails("--init_from=resume", f"--out_dir={tmp_path / 'none'}")
    msg = fails("--init_from=resume", "--equalize=True", f"--out_dir={out}")
    assert "resuming would change the run: equalize (checkpoint False, now True)" in msg
    msg = fails("--init_from=resume", "--learning_rate=1e30", "--max_iters=8", f"--out_dir={out}",
                "--allow_changes=learning_rate,max_iters")
    assert "non-finite" in msg and f"the last good checkpoint {out}/ckpt.pt is kept" in msg
    step = int(msg.split("at step ")[1].split(":")[0])
    assert step == 3   # resumed at 2; step 2's lr-1e30 update makes step 3's loss non-finite (not a restart from 0)
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert ckpt["iter_num"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


# ---- parallel=fsdp (gfa/sharding.py) --------------------------------------------------------------
def two_ranks(argv):
    assert train_on_forked_ranks(2, argv) == 0, "a rank failed (its traceback is above)"


def logged_losses(out):
    return {int(l.split()[1]): float(l.split("| loss ")[1].split()[0])
            for l in open(os.path.join(out, "log.txt")) if l.startswith("step ") and "| loss " in l}


def test_fsdp_two_ranks_equal_one_process_and_reshard_on_resume(tmp_path):
    """2-rank FSDP (uneven shards: d_model 33; a repeated block; norm equalisation; accumulation) trains
    like one plain process on the same global batch: losses, dumped norms (raw and equalised), weights.
    Its sharded checkpoint resumes on 1 rank (DCP reshards), and load_gpt reads it as a plain model."""
    common = ["--max_iters=4", "--eval_interval=2", "--d_model=33", "--repeats=[1, 2, 1]", "--equalize=True",
              "--equalize_clip_factor=1.0"]
    one, out_1 = run(tmp_path, "one", *common)
    out_2 = str(tmp_path / "two")
    two_ranks(TINY + common + ["--parallel=fsdp", "--stop_iter=2", "--gradient_accumulation_steps=2",
                               f"--out_dir={out_2}"])
    assert "x 2 ranks" in open(os.path.join(out_2, "log.txt")).read()
    rest, _ = run(tmp_path, "two", *common, "--parallel=fsdp", "--init_from=resume")
    losses = logged_losses(out_2)
    assert sorted(losses) == [0, 1, 2, 3]
    for s in one["loss"]:
        assert losses[s] == pytest.approx(one["loss"][s], abs=1e-4)   # the log rounds to 4 decimals
    d1, d2 = load_grad_dump(out_1), load_grad_dump(out_2)
    for k in ("norms", "norms_equalized"):
        np.testing.assert_allclose(d2[k], d1[k], rtol=1e-4, atol=1e-7)
    m1, m2 = rundir.load_gpt(out_1)[0].state_dict(), rundir.load_gpt(out_2)[0].state_dict()
    assert m1.keys() == m2.keys()
    for k in m1:
        torch.testing.assert_close(m2[k], m1[k], rtol=1e-4, atol=1e-5)


def test_fsdp_resume_is_exact_and_checkpoints_are_sharded(tmp_path, capsys):
    """One rank of FSDP: stopped and resumed (with activation checkpointing switched on, which changes no
    number) equals the uninterrupted run bit for bit; ckpt.pt names one shard folder, the others are gone."""
    fsdp = ["--max_iters=4", "--eval_interval=2", "--parallel=fsdp"]
    full, out_a = run(tmp_path, "a", *fsdp)
    part, out_b = run(tmp_path, "b", *fsdp, "--stop_iter=3")
    rest, _ = run(tmp_path, "b", *fsdp, "--init_from=resume", "--activation_checkpointing=True")
    assert part["loss"] | rest["loss"] == full["loss"]
    a, b = load_grad_dump(out_a), load_grad_dump(out_b)
    np.testing.assert_array_equal(a["norms"], b["norms"])
    ma, mb = rundir.load_gpt(out_a)[0].state_dict(), rundir.load_gpt(out_b)[0].state_dict()
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    ckpt = rundir.read_checkpoint(out_b)
    assert "model" not in ckpt and "optimizer" not in ckpt and ckpt["iter_num"] == 4
    assert os.listdir(os.path.join(out_b, rundir.SHARDED)) == [ckpt["sharded"]]
    msg = one_line_error(train.main, [*TINY, *fsdp, f"--out_dir={out_b}", "--init_from=resume", "--parallel=ddp",
                                      "--max_iters=6", "--allow_changes=max_iters"], capsys)
    assert "a sharded checkpoint: resume it with --parallel=fsdp" in msg
    for bad, words in [("--parallel=zero", "parallel='zero': use 'ddp'"),
                       ("--activation_checkpointing=1", "activation_checkpointing=1 has type int")]:
        assert words in one_line_error(train.main, [*TINY, f"--out_dir={tmp_path / 'x'}", bad], capsys)
    import shutil
    shutil.rmtree(os.path.join(out_b, rundir.SHARDED))
    with pytest.raises(rundir.UserError, match="missing or incomplete"):
        rundir.load_gpt(out_b)


def test_fsdp_bf16_keeps_the_numbers_of_autocast(tmp_path):
    """bf16 under FSDP gathers the blocks' weights in bf16, which autocast computes their matmuls in anyway,
    and keeps the residual stream in fp32: the losses are autocast's to bf16 rounding of the norm gains."""
    plain, _ = run(tmp_path, "plain", "--max_iters=3", "--dtype=bfloat16")
    fsdp, _ = run(tmp_path, "fsdp", "--max_iters=3", "--dtype=bfloat16", "--parallel=fsdp")
    assert fsdp["loss"][0] == plain["loss"][0]   # the first forward: the same bf16 matmuls
    for s in plain["loss"]:
        assert fsdp["loss"][s] == pytest.approx(plain["loss"][s], abs=2e-3)


@pytest.mark.gpu
def test_fsdp_on_a_gpu_compiled_bf16_checkpointed(tmp_path):
    """What CPUs cannot check: FSDP on CUDA (an NCCL group of one; fully_shard moves the shards to the GPU),
    compiled per block, bf16 gathering, activation checkpointing: close to the plain compiled bf16 run, and
    a resume continues it."""
    gpu = ["--device=cuda", "--compile=True", "--dtype=bfloat16", "--max_iters=4", "--eval_interval=2"]
    plain, _ = run(tmp_path, "plain", *gpu)
    fsdp = [*gpu, "--parallel=fsdp", "--activation_checkpointing=True"]
    full, out_a = run(tmp_path, "a", *fsdp)
    part, out_b = run(tmp_path, "b", *fsdp, "--stop_iter=2")
    rest, _ = run(tmp_path, "b", *fsdp, "--init_from=resume")
    for s, loss in plain["loss"].items():
        assert full["loss"][s] == pytest.approx(loss, abs=5e-3)
        assert (part["loss"] | rest["loss"])[s] == pytest.approx(full["loss"][s], abs=1e-4)
    np.testing.assert_allclose(load_grad_dump(out_b)["norms"], load_grad_dump(out_a)["norms"], rtol=1e-3)


TRAIN_ONLY = [a for a in TINY if a.split("=")[0][2:] not in GPTConfig.defaults()]   # no model keys


def test_init_from_a_pruned_checkpoint_trains_its_weights_with_a_fresh_optimizer(tmp_path, capsys):
    """--init_from=<ckpt.pt>: the checkpoint's architecture and weights (a physically pruned model, no
    optimizer), step 0 of a fresh schedule: the first step equals clip + a fresh AdamW step written out
    here; a passthrough checkpoint keeps its skipped layer untouched."""
    _, src = run(tmp_path, "src", "--max_iters=3", "--passthrough=[1]")
    model, ckpt = rundir.load_gpt(src)
    small = tmp_path / "pruned"
    rundir.save_gpt(str(small), drop_layers(model, [1]), ckpt["train_config"], ckpt["iter_num"])   # as prune.py does
    out = str(tmp_path / "healed")
    hist = train.main(TRAIN_ONLY + [f"--init_from={small / 'ckpt.pt'}", f"--out_dir={out}", "--max_iters=1"])
    start, _ = rundir.load_gpt(str(small))
    val = load_tokens(os.path.join(DATA, "shakespeare/val.bin"))
    assert hist["val"][0] == pytest.approx(evaluate(start, val, 32, 4, 2, "cpu"), rel=1e-6)   # its weights at step 0
    x, y = get_batch(load_tokens(os.path.join(DATA, "shakespeare/train.bin")), 8, 32, step=0, seed=train.seed)
    start.train()
    start(x, y)[1].backward()
    torch.nn.utils.clip_grad_norm_(start.parameters(), 1.0)
    params = list(start.parameters())
    torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                       {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                      lr=3e-3 / 3, betas=(0.9, 0.95)).step()   # warm-up step 0 of 2: peak / 3
    healed, hc = rundir.load_gpt(out)
    assert healed.config == start.config and hc["iter_num"] == 1 and "optimizer" in hc
    for k, v in healed.state_dict().items():
        torch.testing.assert_close(v, start.state_dict()[k], rtol=1e-4, atol=1e-6)
    assert hc["initialised_from"]["path"] == str(small) and "weights from" in open(f"{out}/log.txt").read()
    # resuming the new run keeps the checkpoint's architecture (no model keys given)
    train.main(TRAIN_ONLY + ["--init_from=resume", f"--out_dir={out}", "--max_iters=2", "--allow_changes=max_iters"])
    assert rundir.load_gpt(out)[0].config.n_layer == 2
    # a passthrough checkpoint: its skipped layer gets no gradient, the others train
    out2 = str(tmp_path / "from_passthrough")
    train.main(TRAIN_ONLY + [f"--init_from={src}", f"--out_dir={out2}", "--max_iters=2"])
    before, after = rundir.load_gpt(src)[0].state_dict(), rundir.load_gpt(out2)[0].state_dict()
    assert all(torch.equal(before[k], after[k]) == k.startswith("blocks.1.") for k in before if k.startswith("blocks."))


def test_init_from_bad_input(tmp_path, capsys):
    _, src = run(tmp_path, "src", "--max_iters=1")
    out = tmp_path / "new"
    err = lambda *a: one_line_error(train.main, [*TRAIN_ONLY, "--max_iters=1", *a], capsys)
    assert "n_layer=2 (checkpoint 3) was set" in err(f"--init_from={src}", "--n_layer=2", f"--out_dir={out}")
    assert "does not exist" in err(f"--init_from={tmp_path / 'nope'}", f"--out_dir={out}")
    assert "--init_from=resume" in err(f"--init_from={src}", f"--out_dir={src}")
    with open(os.path.join(src, "model_config.json")) as f:   # files of two runs: the weights do not fit
        mc = f.read()
    with open(os.path.join(src, "model_config.json"), "w") as f:
        f.write(mc.replace('"d_ffn0": 64', '"d_ffn0": 48'))
    assert "does not hold the model" in err(f"--init_from={src}/ckpt.pt", f"--out_dir={out}")
    assert not out.exists()   # nothing written


@pytest.mark.parametrize("extra", [[], ["--deep_supervision=True", "--ds_scale=linear", "--tie_embeddings=True",
                                        "--parallel=fsdp"]])
def test_fused_ce_trains_as_the_plain_head(tmp_path, extra):
    """fused_ce=True (the LM head and cross-entropy fused, 256 tokens a micro-step in chunks of 100) trains as
    the plain head to fp32 rounding: the losses, the dumped per-layer gradient norms and the weights after 3
    steps; with deep supervision, a tied head and FSDP's sharded root (a process group of one) too."""
    common = ["--max_iters=3", "--eval_interval=3", *extra]
    plain, out_p = run(tmp_path, "plain", *common)
    fused, out_f = run(tmp_path, "fused", *common, "--fused_ce=True", "--fused_ce_chunk=100")
    assert "fused LM head + CE (100 tokens a chunk)" in open(os.path.join(out_f, "log.txt")).read()
    for s in plain["loss"]:
        assert fused["loss"][s] == pytest.approx(plain["loss"][s], rel=1e-6)
    assert fused["val"] == pytest.approx(plain["val"], rel=1e-6)
    dp, df = load_grad_dump(out_p), load_grad_dump(out_f)
    np.testing.assert_allclose(df["norms"], dp["norms"], rtol=1e-5)
    mp, mf = rundir.load_gpt(out_p)[0].state_dict(), rundir.load_gpt(out_f)[0].state_dict()
    for k in mp:
        torch.testing.assert_close(mf[k], mp[k], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_fused_ce_on_a_gpu_compiled_bf16_deep_supervision(tmp_path):
    """What CPUs cannot check: fused_ce=True compiled (one graph, deep supervision's exits included) under bf16
    autocast on CUDA trains as the plain compiled head to bf16 rounding."""
    gpu = ["--device=cuda", "--compile=True", "--dtype=bfloat16", "--max_iters=4", "--deep_supervision=True",
           "--ds_scale=linear"]
    plain, _ = run(tmp_path, "plain", *gpu)
    fused, _ = run(tmp_path, "fused", *gpu, "--fused_ce=True", "--fused_ce_chunk=100")
    for s, loss in plain["loss"].items():
        assert fused["loss"][s] == pytest.approx(loss, abs=5e-3)


@pytest.mark.gpu
def test_ms_per_step_after_an_evaluation_times_the_work_not_its_launch(tmp_path):
    """The progress line's ms/step is wall time of finished steps: the one step logged right after an
    evaluation (a log interval of one step) reads like the others, not like the host's launch of it,
    on a model big enough that a step's GPU work outlasts its launch."""
    big = ["--device=cuda", "--compile=False", "--d_model=1024", "--head_dim=64", "--d_attn0=1024", "--S_d=0",
           "--d_ffn0=4096", "--n_layer=4", "--block_size=512", "--batch_size=32", "--max_iters=12",
           "--eval_interval=6", "--eval_iters=1"]
    _, out = run(tmp_path, "big", *big)
    ms = {int(m[1]): float(m[2]) for m in re.finditer(r"step (\d+) \| loss .*? \| ([\d.]+) ms/step",
                                                        open(os.path.join(out, "log.txt")).read())}
    steady = np.median([ms[s] for s in range(2, 12) if s != 6])
    assert 0.5 * steady < ms[6] < 2 * steady, (ms, steady)


# ---- memory: --plan, micro_batch, one line for what does not fit or compile (gfa/memory.py) -------------------
def test_plan_prints_what_fits_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "planned"
    train.main([os.path.join(ROOT, "config/cascade_a2.py"), "--plan", "--world_size=8", "--gpu_mem_gb=80",
                f"--out_dir={out}"])
    text = capsys.readouterr().out
    assert "8 sequences per GPU per step = 8 per micro-step x 1 accumulation" in text
    assert "ddp x 8" in text and ": fits" in text and not out.exists()
    train.main([os.path.join(ROOT, "config/cascade_a2.py"), "--plan", "--world_size=1", "--micro_batch=64",
                "--gpu_mem_gb=80", f"--out_dir={out}"])
    text = capsys.readouterr().out
    assert "does NOT fit" in text and "fits: --micro_batch=" in text and not out.exists()
    assert "micro_batch=3 does not divide" in one_line_error(train.main, [*TINY, "--micro_batch=3", "--plan"], capsys)


def test_plan_under_torchrun_with_one_rank_counts_ddp(capsys, monkeypatch):
    """torchrun --nproc_per_node=1 wraps the model in DDP (its buckets: 4 bytes a parameter); python alone does not."""
    plan = [os.path.join(ROOT, "config/cascade_a2.py"), "--plan", "--micro_batch=8", "--gpu_mem_gb=80"]
    train.main(plan)
    alone = capsys.readouterr().out
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    train.main(plan)
    under = capsys.readouterr().out
    assert "one process" in alone and "DDP buckets" not in alone
    assert "ddp x 1" in under and "DDP buckets 4.55 GiB" in under   # 1,221,036,032 x 4 bytes


def test_micro_batch_keeps_the_data_of_every_step(tmp_path):
    """micro_batch=4 of batch 8 is two accumulation steps: the same losses and norms as
    gradient_accumulation_steps=2, and as one micro-step to fp32 rounding; 'auto' on a CPU is one step."""
    one, out_1 = run(tmp_path, "one", "--max_iters=3")
    acc, out_a = run(tmp_path, "acc", "--max_iters=3", "--gradient_accumulation_steps=2")
    mb, out_m = run(tmp_path, "mb", "--max_iters=3", "--micro_batch=4")
    assert mb["loss"] == acc["loss"] and mb["loss"] == pytest.approx(one["loss"], abs=1e-5)
    np.testing.assert_array_equal(load_grad_dump(out_m)["norms"], load_grad_dump(out_a)["norms"])
    assert "= 4 per micro-step x 2 accumulation" in open(os.path.join(out_m, "log.txt")).read()
    assert "= 8 per micro-step x 1 accumulation" in open(os.path.join(out_1, "log.txt")).read()
    from gfa.benchmark import read_train_log   # bench.py --mode memory reads train.py's log: its format, here
    log = read_train_log(open(os.path.join(out_m, "log.txt")).read())
    assert (log["micro"], log["accum"], sorted(log["steps"]), log["error"]) == (4, 2, [0, 1, 2], None)
    assert log["steps"][2]["tok_s"] > 0 and log["steps"][2]["peak_gib"] is None   # CPU: no peak memory


def test_auto_micro_batch_on_a_gpu_is_the_plans_and_an_explicit_setting_wins():
    """fit_micro_batch as a GPU rank sees it (gpu_mem_gb given, so no device is asked): the plan's pick, the
    same for the same inputs, the global batch kept; gradient_accumulation_steps or micro_batch set win."""
    from gfa.training import Dist
    model_cfg = GPTConfig(n_layer=16)
    gpu = Dist(device="cuda:0")
    base = {k: v for k, v in train._DEFAULTS.items()} | {"gpu_mem_gb": 80.0}
    picks = []
    for _ in range(2):
        cfg = dict(base)
        micro, setting, total, lines = train.fit_micro_batch(cfg, set(), model_cfg, gpu, 64)
        picks.append((micro, cfg["gradient_accumulation_steps"]))
    assert picks[0] == picks[1] and picks[0][0] * picks[0][1] == 64 and 1 < picks[0][0] < 64
    assert picks[0][0] == gfa_memory.fit(model_cfg, setting, 64, int(80 * gfa_memory.GIB * (1 - gfa_memory.HEADROOM)))
    assert any("micro_batch auto" in l for l in lines)
    cfg = base | {"gradient_accumulation_steps": 2}
    assert train.fit_micro_batch(cfg, {"gradient_accumulation_steps"}, model_cfg, gpu, 32)[0] == 32
    cfg = base | {"micro_batch": 2}
    assert train.fit_micro_batch(cfg, {"micro_batch"}, model_cfg, gpu, 64)[0] == 2
    assert cfg["gradient_accumulation_steps"] == 32


def snapshot(run_dir):
    return {f: open(os.path.join(run_dir, f), "rb").read() for f in sorted(os.listdir(run_dir))}


@pytest.mark.parametrize("failure", ["oom_step", "oom_eval", "compile"])
def test_a_step_that_does_not_fit_or_compile_ends_in_one_line_and_keeps_the_run(tmp_path, capsys, monkeypatch,
                                                                                failure):
    """Simulated: a CUDA out-of-memory error in a training step or an evaluation, or a torch.compile failure
    (BackendCompilerFailed) in the first step of a resume: one line naming the step, the plan's figure and
    what fits (or the switch that avoids it); every file of the run as it was, the log only appended to."""
    out = str(tmp_path / "run")
    train.main(TINY + ["--max_iters=6", "--eval_interval=2", "--stop_iter=2", f"--out_dir={out}"])
    before = snapshot(out)

    from torch._dynamo.exc import BackendCompilerFailed

    def fail(*a, **k):
        if failure == "compile":
            raise BackendCompilerFailed("inductor", AttributeError("'int' object has no attribute 'meta'"), None)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.07 GiB.")
    if failure == "oom_eval":   # the resume evaluates at step 2, then (two good steps on) at step 4: that one fails
        real, calls = train.evaluate, []
        monkeypatch.setattr(train, "evaluate", lambda *a, **k: calls.append(1) or (fail() if len(calls) > 1 else
                                                                                 real(*a, **k)))
    else:
        monkeypatch.setattr(train.Loop, "train_step", fail)
    line = one_line_error(train.main, [*TINY, "--max_iters=6", "--eval_interval=2", "--init_from=resume",
                                       f"--out_dir={out}", "--log_interval=100"], capsys)
    if failure == "compile":
        assert line.startswith("error: torch.compile failed in training step 2 (AttributeError: 'int' object has no "
                               "attribute 'meta'): run with --compile=False")
    else:
        where = "the evaluation at step 4" if failure == "oom_eval" else "training step 2"
        assert line.startswith(f"error: CUDA out of memory in {where}: the memory plan puts this run at ")
        assert "fits: --micro_batch=" in line and ("--eval_batch_size" in line) == (failure == "oom_eval")
    assert f"the last good checkpoint {out}/ckpt.pt is kept" in line
    after = snapshot(out)
    assert after.keys() == before.keys()
    for f in after:
        if f == "log.txt":   # the resume's lines, and the error, appended
            assert after[f].startswith(before[f]) and after[f].decode().endswith(line + "\n")
        elif f == rundir.PROVENANCE:   # the resume's invocation recorded after the others
            old, new = (json.loads(x)["invocations"] for x in (before[f], after[f]))
            assert new[:-1] == old and len(new) == len(old) + 1
        else:
            assert after[f] == before[f], f
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)["iter_num"] == 2


def test_identity_leaves_out_what_a_resume_may_change(tmp_path):
    """The run identity's bookkeeping (gfa/rundir.py: BOOKKEEPING) holds every setting a resume may change
    freely, but the two that shape the equalisation factor a resume reuses; identity.json is written at the
    start and says the recipe, seed and data of the run."""
    assert train._FREE_ON_RESUME - {"init_from", "equalize_pilot_iters"} <= rundir.BOOKKEEPING
    _, out = run(tmp_path, "a", "--max_iters=2")
    ident = json.load(open(os.path.join(out, "identity.json")))
    assert ident["seed"] == 324709 and ident["recipe"]["max_iters"] == 2 and "out_dir" not in ident["recipe"]
    assert ident["data"]["val.bin"].startswith(f"{os.path.getsize(os.path.join(ROOT, 'data/shakespeare/val.bin'))}:")
