"""resnet.py on CPU with tiny widths and images: counts, passthrough, gradient dump, training, resume, errors."""
import gzip
import json
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import resnet
from gfa import rundir
from gfa.cli import UserError
from gfa.training import LayerGradNorms, cosine_lr

load_grad_dump = rundir.read_grad_dump

TINY = ["--dataset=synthetic", "--width=8", "--image_size=8", "--n_synthetic=64", "--batch_size=16",
        "--eval_batch_size=64", "--warmup_epochs=1.0", "--learning_rate=5e-3", "--log_interval=4", "--device=cpu"]


def test_param_count_equals_torchvision():
    torchvision = pytest.importorskip("torchvision")
    ours = sum(p.numel() for p in resnet.ResNet50().parameters())
    theirs = sum(p.numel() for p in torchvision.models.resnet50(weights=None).parameters())
    assert ours == theirs == 25_557_032
    m = resnet.ResNet50()
    assert len(m.blocks) == 16
    assert [i for i, b in enumerate(m.blocks) if not isinstance(b.shortcut, torch.nn.Identity)] == [0, 3, 7, 13]


def _bn(x, bn):
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _randomise(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():    # non-trivial BN statistics so the hand computation means something
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def test_passthrough_equals_hand_computation():
    torch.manual_seed(0)
    model = resnet.ResNet50(num_classes=5, in_channels=3, small_stem=True, width=4).eval()
    _randomise(model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        h0 = model.stem(x)
        # block 0: projection shortcut (1x1 conv + BN) is kept, the residual branch dropped
        b0 = model.blocks[0]
        b0.passthrough = True
        assert model.passthrough == {0}          # the model's set is read from the blocks' flags
        conv, bn = b0.shortcut[0], b0.shortcut[1]
        hand0 = F.relu(_bn(F.conv2d(h0, conv.weight, stride=conv.stride), bn))
        assert torch.allclose(b0(h0), hand0, atol=1e-6)
        b0.passthrough = False
        h1 = b0(h0)
        assert not torch.allclose(h1, hand0)
        # block 1: identity shortcut -> relu(x), which is x after the previous block's relu
        b1 = model.blocks[1]
        b1.passthrough = True
        assert torch.equal(b1(h1), F.relu(h1)) and torch.equal(b1(h1), h1)
        b1.passthrough = False
        # the whole model with block 7 (projection, stride 2) and block 8 (identity) removed
        model.set_passthrough([7, 8])
        h = h0
        for i, b in enumerate(model.blocks):
            if i == 7:
                c, n = b.shortcut[0], b.shortcut[1]
                h = F.relu(_bn(F.conv2d(h, c.weight, stride=c.stride), n))
            elif i != 8:
                h = F.relu(b.branch(h) + b.shortcut(h))
        hand = model.fc(h.mean((2, 3)))
        assert torch.allclose(model(x), hand, atol=1e-5)
        assert model.passthrough == {7, 8}
        model.set_passthrough([])
        assert not torch.allclose(model(x), hand, atol=1e-5)
        with pytest.raises(UserError):
            model.set_passthrough([16])


def test_grad_dump_matches_hand_norms():
    torch.manual_seed(0)
    model = resnet.ResNet50(num_classes=10, in_channels=1, small_stem=True, width=4)
    groups = model.param_groups_by_layer()
    assert list(groups) == ["stem"] + [f"layer.{i}" for i in range(16)] + ["head"]
    ids = [id(p) for g in groups.values() for p in g]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())      # a partition: each param once
    F.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.tensor([0, 1, 2, 3])).backward()
    got = LayerGradNorms(groups)()
    hand = torch.stack([torch.cat([p.grad.flatten() for p in g]).norm() for g in groups.values()])
    assert torch.allclose(got, hand, rtol=1e-5)


def _losses(out_dir):
    text = open(os.path.join(out_dir, "log.txt")).read()
    return [float(v) for v in re.findall(r"\| loss ([0-9.]+) \|", text)]


def test_training_lowers_loss_and_writes_the_run(tmp_path):
    out = str(tmp_path / "run")
    resnet.main(TINY + ["--epochs=5", f"--out_dir={out}"])
    losses = _losses(out)
    assert len(losses) == 5 * 4 // 4
    # the schedule is train.py's (gfa.training.cosine_lr): 4 steps per epoch, 1 warm-up epoch, 20 steps
    logged = re.findall(r"step +(\d+)/20 .*\| lr ([0-9.e+-]+) \|", open(os.path.join(out, "log.txt")).read())
    assert [lr for _, lr in logged] == [f"{cosine_lr(int(s) - 1, 5e-3, 1e-6, 4, 20):.2e}" for s, _ in logged]
    assert losses[-1] < 0.8 * losses[0], losses
    dump = load_grad_dump(out)                       # the format fanin.py reads
    assert dump["names"] == ["stem"] + [f"layer.{i}" for i in range(16)] + ["head"]
    assert list(dump["steps"]) == list(range(20)) and dump["norms"].shape == (20, 18)
    assert np.isclose(dump["share"].sum(), 1.0) and len(dump["layer_names"]) == 16
    kind, mc = rundir.read_model_config(out)
    assert kind == "resnet" and mc == {"num_classes": 10, "in_channels": 3, "small_stem": True, "width": 8}
    with pytest.raises(UserError, match="holds a resnet model, not a gpt one"):   # the LM scripts refuse it
        rundir.load_gpt(out)
    imp = json.load(open(os.path.join(out, "importance.json")))
    assert imp["metric"] == "top1_drop" and len(imp["importance"]) == 16
    assert "top-1" in open(os.path.join(out, "log.txt")).read()
    # --analyse recomputes the same importance from the checkpoint
    os.remove(os.path.join(out, "importance.json"))
    resnet.main([f"--out_dir={out}", "--analyse=True", "--device=cpu"])
    again = json.load(open(os.path.join(out, "importance.json")))
    assert open(os.path.join(out, "log.txt")).read().count("training ") == 1       # analysis only, no training
    assert np.allclose(again["importance"], imp["importance"]) and again["baseline"] == imp["baseline"]


def test_block_importance_restores_passthrough_on_error(monkeypatch):
    model = resnet.ResNet50(num_classes=10, in_channels=3, small_stem=True, width=4)
    model.set_passthrough([5])
    calls = []

    def evaluate(*a):
        calls.append(model.passthrough)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return 0.5, 1.0
    monkeypatch.setattr(resnet, "evaluate", evaluate)
    with pytest.raises(KeyboardInterrupt):
        resnet.block_importance(model, None, None, "cpu", None, log=lambda m: None)
    assert calls == [{5}, {0}, {1}] and model.passthrough == {5}


@pytest.mark.parametrize("what", ["loss", "weights"])
def test_non_finite_model_never_replaces_the_last_checkpoint(tmp_path, monkeypatch, what):
    """Step 5 is a checkpoint step but not a log step: the run must stop there, before saving,
    both for a NaN loss and for an inf weight that the loss of that step could not show yet."""
    out = str(tmp_path / "run")
    batches = resnet.train_batches

    def poisoned(data, cfg, start, *a):       # step 4 (the first of epoch 2) sees a NaN image
        for step, (x, y) in enumerate(batches(data, cfg, start, *a), start):
            yield (x * float("nan") if step == 4 else x), y

    class PoisonedAdamW(torch.optim.AdamW):  # the 5th update leaves an inf in a weight
        def step(self):
            super().step()
            self.n = getattr(self, "n", 0) + 1
            if self.n == 5:
                self.param_groups[0]["params"][0].data.view(-1)[0] = float("inf")
    if what == "loss":
        monkeypatch.setattr(resnet, "train_batches", poisoned)
    else:
        monkeypatch.setattr(resnet.torch.optim, "AdamW", PoisonedAdamW)
    msg = "non-finite loss or gradient at step 4" if what == "loss" else "a weight is non-finite or has exploded after step 5"
    with pytest.raises(UserError, match=f"{msg}.*: stopped \\(the last good checkpoint .* is kept\\)"):
        resnet.main(TINY + ["--epochs=2", "--log_interval=100", "--ckpt_interval=1", f"--out_dir={out}"])
    ckpt = torch.load(os.path.join(out, rundir.CKPT), weights_only=False)
    assert ckpt["iter_num"] == 4
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())


def test_default_data_dir_is_next_to_the_script(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                # not the repository: data/<dataset> must not be looked up here
    os.makedirs(tmp_path / "data" / "imagenet" / "train")
    here = os.path.join(os.path.dirname(os.path.abspath(resnet.__file__)), "data", "imagenet")
    with pytest.raises(UserError, match=re.escape(here)):
        resnet.load_data(resnet.defaults | dict(dataset="imagenet", data_dir="", image_size=32))


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = TINY + ["--epochs=2", "--importance=False"]
    resnet.main(common + [f"--out_dir={a}"])
    resnet.main(common + [f"--out_dir={b}", "--stop_iter=3"])          # mid-epoch stop, then resume
    resnet.main(common + [f"--out_dir={b}", "--init_from=resume"])
    da, db = load_grad_dump(a), load_grad_dump(b)
    assert list(db["steps"]) == list(range(8))
    assert np.allclose(da["norms"], db["norms"], rtol=1e-4, atol=1e-7)
    sa = torch.load(os.path.join(a, rundir.CKPT), weights_only=False)["model"]
    sb = torch.load(os.path.join(b, rundir.CKPT), weights_only=False)["model"]
    assert all(torch.allclose(sa[k].float(), sb[k].float(), atol=1e-5) for k in sa)


def _write_idx(path, arr, gz):
    head = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(head + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_reader(tmp_path):
    rng = np.random.default_rng(0)
    xtr, ytr = rng.integers(0, 256, (6, 28, 28)), rng.integers(0, 10, 6)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", xtr, True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", ytr, False)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", xtr[:2], True)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", ytr[:2], True)
    data = resnet.load_fashion_mnist(str(tmp_path))
    (x, y), (xv, yv) = data["train"], data["val"]
    assert data["size"] == 28 and data["in_channels"] == 1 and data["fill"] == [-resnet.FMNIST_MEAN / resnet.FMNIST_STD]
    assert x.shape == (6, 1, 28, 28) and xv.shape == (2, 1, 28, 28) and y.tolist() == ytr.tolist()
    assert torch.allclose(x[:, 0] * resnet.FMNIST_STD + resnet.FMNIST_MEAN, torch.tensor(xtr / 255.0).float(), atol=1e-6)
    aug = resnet.gpu_augment(x, torch.Generator().manual_seed(0), fill=-1.0)
    assert aug.shape == x.shape
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte"):
        resnet.load_fashion_mnist(str(tmp_path))


def test_gpu_augment_is_a_shifted_flipped_crop():
    B, pad = 8, 2
    x = torch.arange(B * 3 * 5 * 5, dtype=torch.float32).view(B, 3, 5, 5)
    out = resnet.gpu_augment(x, torch.Generator().manual_seed(1), pad=pad, fill=-1.0)
    # the same draws, in the same order, from the same seed: row offsets, column offsets, flips
    g = torch.Generator().manual_seed(1)
    oy, ox = torch.randint(0, 2 * pad + 1, (B,), generator=g), torch.randint(0, 2 * pad + 1, (B,), generator=g)
    flip = torch.rand(B, generator=g) < 0.5
    assert flip.any() and (~flip).any() and (oy != pad).any() and (ox != pad).any()   # the seed exercises every case
    xp = F.pad(x, (pad, pad, pad, pad), value=-1.0)
    for b in range(B):
        crop = xp[b, :, oy[b]:oy[b] + 5, ox[b]:ox[b] + 5]
        assert torch.equal(out[b], crop.flip(2) if flip[b] else crop), b
    assert (out == -1.0).any() and not torch.equal(out, x)


@pytest.mark.parametrize("args, msg", [
    (["--dataset=fashion_mnist", "--data_dir=/no/such/dir"], "does not exist"),
    (["--dataset=imagenet", "--data_dir={tmp}"], "no train/ folder"),
    (["--dataset=fashion_mnist", "--data_dir={tmp}"], "train-images-idx3-ubyte"),
    (["--dataset=synthetic", "--image_size=16", "--stem=imagenet"], "smaller than the 32 px"),
    (["--dataset=synthetic", "--stem=big"], "stem="),
    (["--init_from=resume", "--dataset=synthetic"], "no checkpoint"),
])
def test_bad_input_is_one_line(tmp_path, args, msg):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args] + [f"--out_dir={tmp_path / 'out'}", "--device=cpu"]
    with pytest.raises(UserError, match=msg) as e:
        resnet.main(args)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_val_batches_cover_each_image_once_over_the_ranks(device):
    xs, ys = torch.arange(23.0).view(23, 1, 1, 1), torch.arange(23)
    data = {"kind": "tensor", "val": (xs.to(device), ys.to(device))}
    seen = []
    for rank in range(2):
        for x, y in resnet.val_batches(data, {"eval_batch_size": 5}, 2, rank, torch.device(device)):
            assert x.device.type == device and len(y) <= 5 and torch.equal(x.view(-1).long(), y)
            seen += y.tolist()
    assert sorted(seen) == list(range(23))


def test_importance_of_other_weights_is_not_used(tmp_path, capsys):
    """A resumed run's checkpoint moves on; the importance measured on the earlier weights must not be
    shown against the new share (fanin.py ignores it, and says how to measure it again)."""
    import fanin
    out = str(tmp_path / "run")
    resnet.main(TINY + ["--epochs=1", "--warmup_epochs=0.5", f"--out_dir={out}"])
    assert "rho" in fanin.main([out, "--fig_dir", str(tmp_path / "f1")])["runs"][0]
    resnet.main(TINY + ["--epochs=2", "--warmup_epochs=0.5", f"--out_dir={out}", "--init_from=resume", "--allow_changes=epochs",
                        "--importance=False"])
    capsys.readouterr()
    r = fanin.main([out, "--fig_dir", str(tmp_path / "f2")])["runs"][0]
    assert "measured other weights" in capsys.readouterr().out and "rho" not in r
