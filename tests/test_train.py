"""train.py on CPU: learning, exact resume, DDP == one process, the gradient-norm dump, norm
equalisation, the data preparers, and the one-line errors for bad input. Tiny models, fast."""
import json
import os
import subprocess
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402
from common import get_batch, load_grad_dump, load_tokens  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

torch.set_num_threads(1)   # tiny models: threads only add overhead (and contention on small machines)

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


def test_dumped_norms_equal_hand_computed(tmp_path):
    _, out = run(tmp_path, "a", "--max_iters=1", "--n_layer=2", "--repeats=[1, 2]", "--deep_supervision=True")
    dump = load_grad_dump(out)
    cfg = GPTConfig(n_layer=2, d_model=32, head_dim=8, d_attn0=32, S_d=8, d_ffn0=64, vocab_size=256, block_size=32,
                    repeats=[1, 2], deep_supervision=True)
    torch.manual_seed(train.seed)
    model = GPT(cfg)
    x, y = get_batch(load_tokens(os.path.join(ROOT, "data/shakespeare/train.bin")), 8, 32, step=0, seed=train.seed)
    model(x, y)[1].backward()
    groups = model.param_groups_by_layer()
    hand = [torch.sqrt(sum((p.grad.double() ** 2).sum() for p in groups[n])).item() for n in dump["names"]]
    assert dump["names"] == ["embed", "layer.0", "layer.1", "head"]
    np.testing.assert_allclose(dump["norms"][0], hand, rtol=1e-5)
    layers = np.array(hand[1:-1])   # Eq. 2 over the transformer layers only (not embed / head)
    np.testing.assert_allclose(dump["share"], layers / layers.sum(), rtol=1e-5)


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


def test_local_preparer_bytes_and_gpt2(tmp_path, gpt2_cache, monkeypatch):
    src = tmp_path / "corpus.jsonl"
    docs = [f"Document number {i}: to be, or not to be. ü" for i in range(20)]
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    r = cli("data/prepare_local.py", "--out_dir", str(tmp_path / "bytes"), "--tokenizer", "bytes",
            "--val_fraction", "0.1", "--workers", "2", str(src))
    assert r.returncode == 0, r.stderr
    train_ids = np.fromfile(tmp_path / "bytes/train.bin", dtype=np.uint16)
    val_ids = np.fromfile(tmp_path / "bytes/val.bin", dtype=np.uint16)
    n = [len(d.encode()) + 1 for d in docs]
    assert len(val_ids) == n[9] + n[19] and len(train_ids) == sum(n) - len(val_ids)   # docs 9 and 19 held out
    assert bytes(train_ids[:n[0] - 1].astype(np.uint8)).decode() == docs[0] and train_ids[n[0] - 1] == 0
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", gpt2_cache)
    r = cli("data/prepare_local.py", "--out_dir", str(tmp_path / "gpt2"), "--val_fraction", "0.1",
            "--workers", "2", str(src), env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    val_ids = np.fromfile(tmp_path / "gpt2/val.bin", dtype=np.uint16)
    assert list(val_ids) == enc.encode_ordinary(docs[9]) + [50256] + enc.encode_ordinary(docs[19]) + [50256]


def test_dolma_preparer_streams_through_datasets(tmp_path, gpt2_cache, monkeypatch):
    """data/dolma/prepare.py's real `datasets` streaming path, on local jsonl.gz shards."""
    import gzip
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", gpt2_cache)
    docs = [f"Shard document {i}: the quick brown fox." for i in range(30)]
    shard = tmp_path / "shard-0000.json.gz"
    with gzip.open(shard, "wt") as f:
        f.write("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    r = cli("data/dolma/prepare.py", "--data_files", str(shard), "--out_dir", str(tmp_path / "dolma"),
            "--val_fraction", "0.1", "--workers", "2", env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    ids = lambda ds: [t for d in ds for t in enc.encode_ordinary(d) + [50256]]
    val = np.fromfile(tmp_path / "dolma/val.bin", dtype=np.uint16).tolist()
    train = np.fromfile(tmp_path / "dolma/train.bin", dtype=np.uint16).tolist()
    assert sorted(val + train) == sorted(ids(docs)) and len(val) > 0
    assert train[:len(ids(docs[:1]))] == ids(docs[:1])


def test_bad_inputs_give_one_line_errors(tmp_path):
    base = [*TINY, "--max_iters=4", "--eval_interval=2"]

    def fails(*extra, expect):
        r = cli("train.py", *base, *extra)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
        err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
        assert len(err) == 1 and expect in err[0], r.stderr[-2000:]
        return err[0]

    fails(f"--data_dir={tmp_path / 'nowhere'}", f"--out_dir={tmp_path / 'x'}", expect="does not exist")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/train.bin").write_bytes(b"")
    (tmp_path / "empty/val.bin").write_bytes(b"")
    fails(f"--data_dir={tmp_path / 'empty'}", f"--out_dir={tmp_path / 'x'}", expect="is empty")
    fails("--vocab_size=100", f"--out_dir={tmp_path / 'x'}", expect="vocab_size is 100")
    fails("--batch_size=7", "--gradient_accumulation_steps=2", f"--out_dir={tmp_path / 'x'}", expect="batch_size=7")
    out = str(tmp_path / "run")
    train.main(TINY + ["--max_iters=4", "--eval_interval=2", "--stop_iter=2", f"--out_dir={out}"])
    fails("--n_layer=4", "--init_from=resume", f"--out_dir={out}", expect="n_layer (checkpoint 3, requested 4)")
    fails("--init_from=resume", f"--out_dir={tmp_path / 'none'}", expect="does not exist")
    fails("--init_from=resume", "--equalize=True", f"--out_dir={out}", expect="trained with equalize=False")
    msg = fails("--init_from=resume", "--learning_rate=1e30", "--max_iters=8", f"--out_dir={out}", expect="non-finite")
    step = int(msg.split("at step ")[1].split(":")[0])
    assert step == 3   # resumed at 2; step 2's lr-1e30 update makes step 3's loss non-finite (not a restart from 0)
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert ckpt["iter_num"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
