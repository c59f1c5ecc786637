"""prune.py against planted answers and hand computations on tiny CPU models: each heuristic
finds the layer it must find, Taylor / HellaSwag / perplexity equal hand-written versions,
passthrough pruning equals the physically smaller model, and bad input gives one-line errors."""
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fanin
import prune
from common import GradNormDump, UserError, eval_batches, evaluate, load_model
from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent.parent
N = 4


def tiny_model(seed=0, n_layer=N, vocab=256, block=32):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab, block_size=block, d_model=32, n_layer=n_layer, head_dim=8,
                    d_attn0=32, S_d=8, d_ffn0=64)
    return GPT(cfg).eval()


def zero_branch(model, layer):
    with torch.no_grad():
        model.blocks[layer].attn.proj.weight.zero_()
        model.blocks[layer].ffn.down.weight.zero_()


def text_tokens(n, seed):
    # byte "text" with structure (repeated words) so the model's numbers are not degenerate
    rng = np.random.default_rng(seed)
    words = [b"the ", b"cat ", b"sat ", b"on ", b"a ", b"mat. ", b"dog ", b"ran "]
    out = b"".join(words[i] for i in rng.integers(0, len(words), n))
    return np.frombuffer(out[:n], dtype=np.uint8).astype(np.uint16)


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "bytes"
    d.mkdir()
    text_tokens(6000, 1).tofile(d / "train.bin")
    text_tokens(3000, 2).tofile(d / "val.bin")
    return d


def make_run(path, model, data_dir, share_min=None, dump=True):
    """A fake train.py run dir: ckpt.pt + grad_norms.npz (layer share_min gets the smallest norms)."""
    os.makedirs(path, exist_ok=True)
    names = list(model.param_groups_by_layer())
    d = GradNormDump(names, os.path.join(path, "grad_norms.npz"))
    rng = np.random.default_rng(0)
    for step in range(5):
        row = 1.0 + rng.random(len(names))
        if share_min is not None:
            row[names.index(f"layer.{share_min}")] = 0.1
        d.record(step, torch.tensor(row, dtype=torch.float32))
    if dump:
        d.flush()
    ckpt = {"model": model.state_dict(), "model_config": asdict(model.config), "iter_num": 5,
            "train_config": {"dataset": str(data_dir), "block_size": model.config.block_size, "seed": 0,
                             "n_layer": model.config.n_layer},
            "grad_dump": d.state_dict() if dump else None}
    torch.save(ckpt, os.path.join(path, "ckpt.pt"))
    return str(path)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


HS_ROWS = [{"ctx": "the cat sat on", "endings": [" a mat.", " the dog ran far", " mat", " cat cat"], "label": 0},
           {"ctx": "a dog", "endings": [" ran", " sat on the mat.", " x", " the"], "label": 1}]


def batches(data_dir, n=2, B=4, T=32, seed=0):
    from common import get_batch, load_tokens
    train = load_tokens(str(data_dir / "train.bin"), 256)
    return [get_batch(train, B, T, s, seed) for s in range(n)]


# ---- planted answers -----------------------------------------------------------------------------
def test_magnitude_picks_zeroed_branch():
    m = tiny_model()
    zero_branch(m, 2)
    s = prune.magnitude_scores(m)
    assert prune.lowest(s, 1) == [2]
    # the score is the sum of |W| of the block (per-output sums, then summed)
    assert s[1] == pytest.approx(sum(p.abs().sum().item() for p in m.blocks[1].parameters()), rel=1e-6)


def test_similarity_picks_zeroed_branch(data_dir):
    m = tiny_model()
    zero_branch(m, 1)
    D = prune.angular_distances(m, batches(data_dir), "cpu", torch.autocast("cpu", enabled=False))
    l, cand = prune.similarity_block(D, 1)
    assert l == 1 and cand[1] < 1e-3 < cand.min(initial=1, where=np.arange(len(cand)) != 1)
    # k=2: the blocks [0,2) and [1,3) contain the identity layer; the one chosen must be one of them
    l2, _ = prune.similarity_block(D, 2)
    assert l2 in (0, 1)
    # distance by hand for one pair on one batch: all tokens, arccos(cos)/pi
    x, _ = batches(data_dir, n=1)[0]
    h = {}
    hooks = [m.blocks[0].register_forward_pre_hook(lambda mod, a: h.update({0: a[0]}) if 0 not in h else None),
             m.norm_f.register_forward_pre_hook(lambda mod, a: h.update({N: a[0]}))]
    with torch.no_grad():
        m(x)
    for hk in hooks:
        hk.remove()
    want = (torch.arccos(F.cosine_similarity(h[0], h[N], dim=-1).clamp(-1, 1)) / math.pi).mean().item()
    D1 = prune.angular_distances(m, [(x, None)], "cpu", torch.autocast("cpu", enabled=False))
    assert D1[0, N] == pytest.approx(want, rel=1e-4)


def test_cfp_picks_smallest_share(tmp_path, data_dir):
    run = make_run(tmp_path / "run", tiny_model(), data_dir, share_min=3)
    share = prune.cfp_share(run, N)
    assert prune.lowest(share, 1) == [3] and share.sum() == pytest.approx(1.0)
    # given the ckpt.pt itself, the grad_norms.npz beside it is still the source
    ckpt = torch.load(os.path.join(run, "ckpt.pt"), weights_only=False)
    torch.save(dict(ckpt, grad_dump=None), os.path.join(run, "ckpt.pt"))
    assert np.allclose(prune.cfp_share(os.path.join(run, "ckpt.pt"), N), share)
    torch.save(ckpt, os.path.join(run, "ckpt.pt"))
    os.remove(os.path.join(run, "grad_norms.npz"))   # falls back to the dump inside the checkpoint
    assert np.allclose(prune.cfp_share(run, N), share)


def test_taylor_matches_hand_computation(data_dir):
    m = tiny_model()
    (x, y), = batches(data_dir, n=1)
    got = prune.taylor_scores(m, [(x, y)], "cpu", torch.autocast("cpu", enabled=False))
    logits, _ = m(x)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
    for i, b in enumerate(m.blocks):
        ps = list(b.parameters())
        gs = torch.autograd.grad(loss, ps, retain_graph=True)
        want = sum((p * g).abs().sum().item() for p, g in zip(ps, gs))
        assert got[i] == pytest.approx(want, rel=1e-5)
    # two batches: the elementwise |W*g| are summed over batches
    two = batches(data_dir, n=2)
    got2 = prune.taylor_scores(m, two, "cpu", torch.autocast("cpu", enabled=False))
    parts = sum(prune.taylor_scores(m, [b], "cpu", torch.autocast("cpu", enabled=False)) for b in two)
    assert np.allclose(got2, parts, rtol=1e-5)
    assert all(p.requires_grad for p in m.parameters())   # flags restored


def test_taylor_restores_the_model_after_an_error(data_dir):
    m = tiny_model().train()
    m.tok_emb.weight.requires_grad_(False)
    (x, y), = batches(data_dir, n=1)
    with pytest.raises(IndexError):   # token ids past the vocabulary: the forward fails mid-way
        prune.taylor_scores(m, [(x, y), (x + 1000, y)], "cpu", torch.autocast("cpu", enabled=False))
    assert m.training and not m.tok_emb.weight.requires_grad
    assert all(p.requires_grad for n, p in m.named_parameters() if n != "tok_emb.weight")


# ---- evaluation ---------------------------------------------------------------------------------------
def test_hellaswag_matches_hand_logprobs(tmp_path):
    m = tiny_model(block=16)
    items = prune.load_hellaswag(write_jsonl(tmp_path / "hs.jsonl", HS_ROWS))
    enc = prune.get_encoder(256)
    # tiny token budget: several batches, ragged padding
    got = prune.hellaswag_logprobs(m, items, enc, "cpu", torch.autocast("cpu", enabled=False), max_tokens=40)
    for i, row in enumerate(HS_ROWS):
        for j, e in enumerate(row["endings"]):
            toks = list((row["ctx"] + e).encode())[-17:]   # left-truncated to block_size + 1
            n = min(len(e.encode()), len(toks) - 1)
            with torch.no_grad():
                logits, _ = m(torch.tensor([toks[:-1]]))
            lp = F.log_softmax(logits[0].double(), -1)
            want = sum(lp[t - 1, toks[t]].item() for t in range(len(toks) - n, len(toks)))
            assert got[i, j] == pytest.approx(want, abs=1e-4)
    acc, acc_norm = prune.hellaswag_accuracy(got, items)
    chars = np.array([[len(e.strip()) for e in r["endings"]] for r in HS_ROWS])
    labels = np.array([r["label"] for r in HS_ROWS])
    assert acc == np.mean(got.argmax(1) == labels) and acc_norm == np.mean((got / chars).argmax(1) == labels)
    # the same numbers in one big batch
    big = prune.hellaswag_logprobs(m, items, enc, "cpu", torch.autocast("cpu", enabled=False))
    assert np.allclose(big, got, atol=1e-4)


@pytest.mark.gpu
def test_hellaswag_on_gpu_matches_cpu(tmp_path):
    # the CUDA path (pinned, non-blocking index copies; results copied back after the loop)
    m = tiny_model(block=16)
    items = prune.load_hellaswag(write_jsonl(tmp_path / "hs.jsonl", HS_ROWS))
    enc, off = prune.get_encoder(256), torch.autocast("cpu", enabled=False)
    cpu = prune.hellaswag_logprobs(m, items, enc, "cpu", off, max_tokens=40)
    gpu = prune.hellaswag_logprobs(m.cuda(), items, enc, "cuda", off, max_tokens=40)
    assert np.allclose(gpu, cpu, atol=1e-4)


def test_perplexity_is_exp_mean_ce(data_dir):
    m = tiny_model()
    from common import load_tokens
    val = load_tokens(str(data_dir / "val.bin"), 256)
    a = evaluate(m, val, 32, 4, 3, "cpu")
    assert a == evaluate(m, val, 32, 4, 3, "cpu")   # same numbers every call
    nll = []
    for x, y in eval_batches(val, 32, 4, 3):
        with torch.no_grad():
            lp = F.log_softmax(m(x)[0].double(), -1)
        nll.append(-lp.gather(-1, y[..., None]).flatten())
    assert math.exp(a) == pytest.approx(math.exp(torch.cat(nll).mean().item()), rel=1e-5)


# ---- end to end -----------------------------------------------------------------------------------------
def test_cli_table_two_seeds_and_save_pruned(tmp_path, data_dir, monkeypatch):
    evaluated = []   # the removed set of every perplexity evaluation
    real_evaluate = prune.evaluate

    def counting_evaluate(model, *a, **kw):
        evaluated.append(model.passthrough)
        return real_evaluate(model, *a, **kw)
    monkeypatch.setattr(prune, "evaluate", counting_evaluate)
    runs = []
    for seed in (0, 1):
        m = tiny_model(seed)
        zero_branch(m, 2)
        runs.append(make_run(tmp_path / f"seed{seed}", m, data_dir, share_min=1))
    hs = write_jsonl(tmp_path / "hs.jsonl", HS_ROWS)
    out = tmp_path / "table"
    res = prune.main(["--runs", *runs, "--k", "1,2", "--hellaswag", hs, "--eval_batches", "2", "--batch_size", "4",
                      "--calib_batches", "2", "--device", "cpu", "--out", str(out)])
    text = (out / "table1.md").read_text()
    assert (out / "table1_ppl.png").stat().st_size > 0 and "acc_norm" in text and "± " in text
    assert "Ranking stability" in text
    stab = json.loads((out / "results.json").read_text())["stability"]
    for m in prune.METHODS:   # two runs: one pair, its rho is the mean
        rho = fanin.spearman(res[0]["scores"][m], res[1]["scores"][m])[0]
        assert stab[m][0] == pytest.approx(rho, nan_ok=True) and stab[m][1] == [pytest.approx(rho, nan_ok=True)]
    assert any(0 < abs(stab[m][0]) < 1 for m in prune.METHODS)   # not only the trivial +-1 cases
    for r in res:
        assert r["cells"]["cfp/1"]["layers"] == [1]
        assert r["cells"]["magnitude/1"]["layers"] == [2] and r["cells"]["similarity/1"]["layers"] == [2]
    # identical removed sets share one evaluation: per run, one per distinct set (baseline included)
    distinct = [{frozenset()} | {frozenset(c["layers"]) for c in r["cells"].values()} for r in res]
    n0 = len(distinct[0])
    assert len(evaluated) == n0 + len(distinct[1])
    assert set(evaluated[:n0]) == distinct[0] and set(evaluated[n0:]) == distinct[1]   # each set once
    # the pruned checkpoint is physically smaller and scores what passthrough scored
    small = tmp_path / "small"
    r = prune.main(["--runs", runs[0], "--k", "2", "--methods", "cfp", "--hellaswag", "none", "--eval_batches", "2",
                    "--batch_size", "4", "--device", "cpu", "--out", str(tmp_path / "t2"), "--save_pruned", str(small)])
    model, ckpt = load_model(str(small))
    assert model.config.n_layer == N - 2 and ckpt["pruned_from"]["removed_layers"] == r[0]["cells"]["cfp/2"]["layers"]
    r2 = prune.main(["--runs", str(small), "--k", "1", "--methods", "cfp,magnitude", "--hellaswag", "none",
                     "--eval_batches", "2", "--batch_size", "4", "--device", "cpu", "--out", str(tmp_path / "t3")])
    assert r2[0]["baseline"]["ppl"] == pytest.approx(r[0]["cells"]["cfp/2"]["ppl"], rel=1e-5)


# ---- bad input: one-line errors ---------------------------------------------------------------------------
def _err(argv):
    with pytest.raises(UserError) as e:
        prune.main(argv + ["--device", "cpu", "--hellaswag", "none", "--eval_batches", "1", "--batch_size", "2",
                           "--calib_batches", "1"])
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_bad_inputs(tmp_path, data_dir):
    run = make_run(tmp_path / "run", tiny_model(), data_dir)
    assert "k=4" in _err(["--runs", run, "--k", "4"]) and "[1, 3]" in _err(["--runs", run, "--k", "0"])
    assert "--k" in _err(["--runs", run, "--k", "two"])
    assert "--methods" in _err(["--runs", run, "--methods", "cfp,random"])
    assert "does not exist" in _err(["--runs", str(tmp_path / "nope"), "--k", "1"])
    nodump = make_run(tmp_path / "nodump", tiny_model(), data_dir, dump=False)
    assert "gradient dump" in _err(["--runs", nodump, "--k", "1", "--methods", "cfp"])
    _err(["--runs", run, "--k", "1,2", "--methods", "cfp", "--save_pruned", str(tmp_path / "x")])
    good = json.dumps(HS_ROWS[0])
    cases = {"{not json": "not valid JSON", json.dumps({"ctx": "a", "endings": ["b"] * 4}): "label",
             json.dumps({"ctx": "a", "endings": [" b"] * 3, "label": 0}): "4 non-empty",
             json.dumps({"ctx": "a", "endings": [" b"] * 4, "label": 7}): "label must be 0..3"}
    for i, (bad, want) in enumerate(cases.items()):
        path = write_jsonl(tmp_path / f"bad{i}.jsonl", [good, good, bad])
        with pytest.raises(UserError, match=f"line 3: .*{want}"):
            prune.load_hellaswag(path)


def test_cli_prints_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "prune.py"), "--runs", str(tmp_path / "missing"), "--k", "1"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: checkpoint")
