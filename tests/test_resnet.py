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
    assert yv.tolist() == ytr[:2].tolist()
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
    (["--dataset=imagenet", "--data_dir={file}"], "is a file, not a folder .*train/ and val/ class folders"),
    (["--dataset=cifar10", "--data_dir={file}"], "is a file, not a folder .*cifar-10-batches-py"),
    (["--dataset=cifar100", "--data_dir=/no/such/dir"], "/no/such/dir does not exist: .*cifar-100-python>, or --download"),
    (["--dataset=folder", "--data_dir={tmp}"], "has no train/ folder: folder needs the ImageFolder layout"),
    (["--dataset=cifar"], "dataset='cifar': use imagenet, cifar10, cifar100, folder"),
    (["--dataset=synthetic", "--download=True"], "download=True fetches cifar10 or cifar100, not synthetic"),
    (["--dataset=synthetic", "--augment=small"], "augment='small' chooses the recipe of an image folder"),
    (["--dataset=folder", "--augment=big"], "augment='big': use auto, small or imagenet"),
    (["--dataset=synthetic", "--image_size=8", "--epochs=1"],     # 5 warm-up epochs by default
     r"warmup_epochs=5.0 \(5 steps\) is not shorter than the run \(epochs=1, 1 steps\).*--warmup_epochs=0.17"),
    (["--dataset=synthetic", "--image_size=8", "--n_synthetic=8", "--batch_size=16"], "8 training images are fewer"),
    (["--dataset=synthetic", "--num_workers=-1"], "num_workers=-1: must be >= 0"),
])
def test_bad_input_is_one_line(tmp_path, args, msg):
    (tmp_path / "archive.tar.gz").write_bytes(b"")
    args = [a.replace("{tmp}", str(tmp_path)).replace("{file}", str(tmp_path / "archive.tar.gz")) for a in args]
    with pytest.raises(UserError, match=msg) as e:
        resnet.main(args + [f"--out_dir={tmp_path / 'out'}", "--device=cpu"])
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()           # nothing written: no half a run


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
    resnet.main(TINY + ["--epochs=2", "--warmup_epochs=0.5", f"--out_dir={out}", "--init_from=resume",
                        "--allow_changes=epochs", "--importance=False"])
    capsys.readouterr()
    r = fanin.main([out, "--fig_dir", str(tmp_path / "f2")])["runs"][0]
    assert "measured other weights" in capsys.readouterr().out and "rho" not in r


# ---- CIFAR-10/100 and image folders -----------------------------------------------------------
def write_cifar(root, name, n=8, seed=0):
    """Tiny CIFAR files in torchvision's layout, the python version's pickled batches: rows of 3072
    bytes (1024 red, 1024 green, 1024 blue, row-major) with 'labels' (CIFAR-10) or 'fine_labels'
    and 'coarse_labels' (CIFAR-100). n images per batch. Returns (train x [N,3,32,32], y, test x, y)."""
    import pickle
    rng = np.random.default_rng(seed)
    classes = 10 if name == "cifar10" else 100
    folder = os.path.join(root, "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    os.makedirs(folder, exist_ok=True)

    def batch(fname, rows, label):
        x, y = rng.integers(0, 256, (rows, 3072), dtype=np.uint8), rng.integers(0, classes, rows).tolist()
        labels = {"labels": y} if name == "cifar10" else {"fine_labels": y, "coarse_labels": [c // 5 for c in y]}
        with open(os.path.join(folder, fname), "wb") as f:
            pickle.dump({"batch_label": fname, "data": x, "filenames": [f"{i}.png" for i in range(rows)]} | labels, f, 2)
        return x.reshape(-1, 3, 32, 32), y
    if name == "cifar10":
        parts = [batch(f"data_batch_{i}", n, "labels") for i in range(1, 6)]
        test = batch("test_batch", n, "labels")
        meta = ("batches.meta", {"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": n, "num_vis": 3072})
    else:
        parts, test = [batch("train", 5 * n, "fine_labels")], batch("test", n, "fine_labels")
        meta = ("meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                         "coarse_label_names": [f"k{i}" for i in range(20)]})
    with open(os.path.join(folder, meta[0]), "wb") as f:
        pickle.dump(meta[1], f, 2)
    return np.concatenate([p[0] for p in parts]), sum((p[1] for p in parts), []), *test


@pytest.fixture
def no_checksums(monkeypatch):
    """torchvision checks the real files' md5 sums; the tests' files have other bytes."""
    import torchvision.datasets.cifar as tv_cifar
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))


def _normalised_by_hand(x, train_x):
    """numpy: (x / 255 - mean) / std with the training images' per-channel mean and population std."""
    mean = train_x.astype(np.float64).mean((0, 2, 3)) / 255
    std = train_x.astype(np.float64).std((0, 2, 3)) / 255
    return (x / 255.0 - mean[:, None, None]) / std[:, None, None], mean, std


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reads_the_pickled_batches(tmp_path, no_checksums, name):
    xtr, ytr, xte, yte = write_cifar(str(tmp_path), name)
    for data_dir in (tmp_path, tmp_path / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")):
        data = resnet.load_data(resnet.defaults | dict(dataset=name, data_dir=str(data_dir)))
        want, mean, std = _normalised_by_hand(xtr, xtr)
        assert data["kind"] == "tensor" and data["size"] == 32 and data["in_channels"] == 3 and data["augment"]
        assert data["num_classes"] == (10 if name == "cifar10" else 100)
        assert np.allclose(data["train"][0].numpy(), want, atol=1e-5) and data["train"][1].tolist() == ytr
        assert np.allclose(data["val"][0].numpy(), _normalised_by_hand(xte, xtr)[0], atol=1e-5)   # train's statistics
        assert data["val"][1].tolist() == yte
        assert np.allclose(data["fill"], -mean / std)        # zero padding in pixel space, as torchvision's RandomCrop
    os.remove(tmp_path / ("cifar-10-batches-py/test_batch" if name == "cifar10" else "cifar-100-python/test"))
    with pytest.raises(UserError, match="missing or incomplete .* or pass --download=True"):
        resnet.load_data(resnet.defaults | dict(dataset=name, data_dir=str(tmp_path)))


def test_padding_is_zero_pixels_in_every_channel(tmp_path, no_checksums):
    """Normalise-then-pad (gpu_augment with data['fill']) equals pad-with-black-then-normalise, the
    order of torchvision's RandomCrop(32, padding=4) -> ToTensor -> Normalize."""
    xtr = torch.from_numpy(write_cifar(str(tmp_path), "cifar10")[0])
    data = resnet.load_data(resnet.defaults | dict(dataset="cifar10", data_dir=str(tmp_path)))
    mean, std = resnet.channel_stats(xtr)
    got = resnet.gpu_augment(data["train"][0][:16], torch.Generator().manual_seed(3), fill=data["fill"])
    pixel_space = resnet.gpu_augment(xtr[:16].float(), torch.Generator().manual_seed(3), fill=0.0)
    assert (pixel_space == 0).any()                          # the crops reach into the padding
    assert torch.allclose(got, resnet.normalised(pixel_space, mean, std), atol=1e-5)


def test_download_fetches_into_data_dir(tmp_path, monkeypatch, no_checksums):
    """--download=True hands torchvision the folder (here a stand-in for the network writes the files);
    without the network the error is one line."""
    import torchvision.datasets.cifar as tv_cifar
    calls = []

    def fetch(url, root, filename, md5):
        calls.append((url, root))
        write_cifar(root, "cifar100")
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", fetch)
    out = str(tmp_path / "run")
    resnet.main(["--dataset=cifar100", f"--data_dir={tmp_path / 'c100'}", "--download=True", "--width=4", "--epochs=2",
                 "--warmup_epochs=0.5", "--batch_size=20", "--importance=False", "--device=cpu", f"--out_dir={out}"])
    assert calls == [(tv_cifar.CIFAR100.url, str(tmp_path / "c100"))]
    assert rundir.read_model_config(out)[1] == {"num_classes": 100, "in_channels": 3, "small_stem": True, "width": 4}

    def offline(url, root, filename, md5):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    with pytest.raises(UserError, match="cannot download cifar10 into .*: <urlopen error"):
        resnet.main(["--dataset=cifar10", f"--data_dir={tmp_path / 'c10'}", "--download=True", "--device=cpu",
                     f"--out_dir={tmp_path / 'run2'}"])
    assert not (tmp_path / "run2").exists()


def write_image_folder(root, sizes, seed=0):
    """<root>/<split>/<class>/<i>.png of random RGB pixels; sizes: {split: [(w, h) per image]}, the
    images dealt to classes 'a', 'b' in turn. Returns {split: [(array [3, h, w], label)] in ImageFolder's order}."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    out = {}
    for split, whs in sizes.items():
        items = []
        for i, (w, h) in enumerate(whs):
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            cls = "ab"[i % 2]
            os.makedirs(os.path.join(root, split, cls), exist_ok=True)
            Image.fromarray(arr).save(os.path.join(root, split, cls, f"{i:03d}.png"))
            items.append((cls, f"{i:03d}", arr.transpose(2, 0, 1), "ab".index(cls)))
        out[split] = [(a, y) for _, _, a, y in sorted(items, key=lambda t: (t[0], t[1]))]
    return out


def test_small_image_folder_gets_the_small_image_recipe(tmp_path):
    imgs = write_image_folder(str(tmp_path), {"train": [(32, 32)] * 8, "val": [(32, 32)] * 4})
    data = resnet.load_data(resnet.defaults | dict(dataset="folder", data_dir=str(tmp_path), num_workers=0))
    xtr = np.stack([a for a, _ in imgs["train"]])
    assert data["kind"] == "tensor" and data["size"] == 32 and data["num_classes"] == 2 and data["augment"]
    assert np.allclose(data["train"][0].numpy(), _normalised_by_hand(xtr, xtr)[0], atol=1e-5)
    assert data["train"][1].tolist() == [y for _, y in imgs["train"]]
    # validation at the images' own size: every pixel as stored, nothing rescaled
    val = np.stack([a for a, _ in imgs["val"]])
    assert np.allclose(data["val"][0].numpy(), _normalised_by_hand(val, xtr)[0], atol=1e-5)
    out = str(tmp_path / "run")      # the 3x3 stem; 8 images are too few for a batch of 16, and nothing is written
    with pytest.raises(UserError, match="8 training images are fewer than batch_size=16: lower --batch_size"):
        resnet.main(["--dataset=folder", f"--data_dir={tmp_path}", "--batch_size=16", "--num_workers=0", "--device=cpu",
                     f"--out_dir={out}"])
    assert not os.path.exists(out)
    write_image_folder(str(tmp_path / "mixed"), {"train": [(32, 32), (32, 32), (28, 30)], "val": [(32, 32)] * 2})
    with pytest.raises(UserError, match=r"002.png is 28x30 px, .*000.png 32x32: the small-image recipe needs images"):
        resnet.load_data(resnet.defaults | dict(dataset="folder", data_dir=str(tmp_path / "mixed"), num_workers=0))


def test_large_image_folder_gets_the_imagenet_recipe(tmp_path, monkeypatch):
    """Above 64 px: RandomResizedCrop(image_size) for training; for evaluation ImageNet's resize and
    center crop, except for an image that already is image_size x image_size (left as stored)."""
    from PIL import Image
    from torchvision.transforms import functional as TF
    imgs = write_image_folder(str(tmp_path), {"train": [(80, 72)] * 4, "test": [(48, 48), (90, 70)]})
    monkeypatch.setattr(resnet.os, "sched_getaffinity", lambda pid: {0}, raising=False)   # a 1-core machine
    data = resnet.load_data(resnet.defaults | dict(dataset="folder", data_dir=str(tmp_path), image_size=48))
    assert data["kind"] == "folder" and data["size"] == 48 and data["workers"] == 1     # num_workers=8, capped
    assert data["train"][0][0].shape == (3, 48, 48)
    norm = lambda t: TF.normalize(t, resnet.IMAGENET_MEAN, resnet.IMAGENET_STD)
    exact, other = imgs["test"][0][0], imgs["test"][1][0]           # class 'a': the 48x48 image; class 'b': 90x70
    assert torch.allclose(data["val"][0][0], norm(torch.from_numpy(exact).float() / 255), atol=1e-6)
    pil = Image.fromarray(other.transpose(1, 2, 0))
    by_hand = TF.center_crop(TF.resize(pil, 48 * 256 // 224), 48)   # shorter side 70 -> 54, then the center 48x48
    assert torch.allclose(data["val"][1][0], norm(TF.to_tensor(by_hand)), atol=1e-6)
    with pytest.raises(UserError, match="test/b/001.png is 90x70 px, .*the small-image recipe needs images of one size"):
        resnet.load_data(resnet.defaults | dict(dataset="folder", data_dir=str(tmp_path), augment="small"))


def test_loader_workers_are_capped_by_the_cores(monkeypatch):
    monkeypatch.setattr(resnet.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert [resnet.loader_workers(n) for n in (0, 1, 2, 8)] == [0, 1, 2, 2]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")               # torchrun: 4 ranks share the 2 cores
    assert resnet.loader_workers(8) == 1


def test_fanin_analyses_a_stopped_or_killed_run(tmp_path, no_checksums, monkeypatch, capsys):
    """A CIFAR-10 run stopped at --stop_iter (a checkpoint, no importance yet), the same after
    --analyse=True, and a run killed before its first checkpoint: fanin.py reads each from what it wrote."""
    import fanin
    write_cifar(str(tmp_path), "cifar10")
    common = ["--dataset=cifar10", f"--data_dir={tmp_path}", "--width=4", "--batch_size=8", "--epochs=3",
              "--warmup_epochs=1.0", "--log_interval=2", "--device=cpu"]       # 40 images: 5 steps an epoch
    out = str(tmp_path / "stopped")
    resnet.main(common + [f"--out_dir={out}", "--stop_iter=7"])
    log = open(os.path.join(out, "log.txt")).read()
    assert "10 classes, 3 ch, small stem" in log and "40 train / 8 val images of 32 px" in log
    assert f"stopped at step 7 of 15: continue with --init_from=resume; python fanin.py {out}" in log
    capsys.readouterr()
    r = fanin.main([out, "--fig_dir", str(tmp_path / "f1")])["runs"][0]
    assert "has no importance.json: share vs theory only" in capsys.readouterr().out
    assert r["step_range"] == [0, 6] and "rho" not in r and len(r["share"]) == 16
    resnet.main([f"--out_dir={out}", "--analyse=True", "--device=cpu"])
    r = fanin.main([out, "--fig_dir", str(tmp_path / "f2")])["runs"][0]
    assert r["step_range"] == [0, 6] and len(r["importance"]) == 16 and "rho" in r
    assert r["importance"] == json.load(open(os.path.join(out, "importance.json")))["importance"]

    batches = resnet.train_batches

    def killed(data, cfg, start, *a):   # Ctrl-C at step 3: the dump was flushed at step 2, no checkpoint yet
        for step, xy in enumerate(batches(data, cfg, start, *a), start):
            if step == 3:
                raise KeyboardInterrupt
            yield xy
    monkeypatch.setattr(resnet, "train_batches", killed)
    out = str(tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        resnet.main(common + [f"--out_dir={out}"])
    assert not rundir.has_checkpoint(out)
    r = fanin.main([out, "--fig_dir", str(tmp_path / "f3")])["runs"][0]
    assert r["step_range"] == [0, 1] and len(r["share"]) == 16 and "rho_theory" in r


def test_image_folder_trains_without_a_worker_warning(tmp_path, monkeypatch):
    """The ImageNet recipe's DataLoader path end to end on a 1-core machine: num_workers=8 (the
    default) is capped at 1, so PyTorch has nothing to warn about."""
    import warnings
    write_image_folder(str(tmp_path), {"train": [(72, 72)] * 8, "val": [(72, 72)] * 2})
    monkeypatch.setattr(resnet.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    out = str(tmp_path / "run")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resnet.main(["--dataset=folder", f"--data_dir={tmp_path}", "--image_size=32", "--width=4", "--batch_size=4",
                     "--epochs=2", "--warmup_epochs=0.5", "--importance=False", "--device=cpu", f"--out_dir={out}"])
    assert not [w for w in caught if "worker" in str(w.message)], [str(w.message) for w in caught]
    log = open(os.path.join(out, "log.txt")).read()
    assert "2 classes, 3 ch, small stem" in log and "8 train / 2 val images of 32 px" in log
    assert "DataLoader workers: 1 per rank (num_workers=8" in log and len(_losses(out)) == 2


@pytest.mark.gpu
def test_cifar_on_the_gpu_in_bf16(tmp_path, no_checksums):
    """The GPU path of the paper's CIFAR-10 run: images held on the GPU, augmented there, channels_last,
    compile, --dtype=bfloat16; the run's importance and dump are complete."""
    write_cifar(str(tmp_path), "cifar10", n=64)
    out = str(tmp_path / "run")
    resnet.main(["--dataset=cifar10", f"--data_dir={tmp_path}", "--width=16", "--batch_size=64", "--epochs=2",
                 "--warmup_epochs=0.5", "--dtype=bfloat16", "--device=cuda", f"--out_dir={out}"])
    log = open(os.path.join(out, "log.txt")).read()
    assert "bfloat16, compile=True" in log and "320 train / 64 val images of 32 px" in log
    assert load_grad_dump(out)["norms"].shape == (10, 18) and np.isfinite(load_grad_dump(out)["norms"]).all()
    assert len(json.load(open(os.path.join(out, "importance.json")))["importance"]) == 16
