"""gfa/evaluation.py: perplexity is exp(mean CE) over the fixed windows, and the multiple-choice
log-probabilities equal a hand computation (ragged batches, left truncation), on CPU and CUDA."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gfa.data import eval_batches, load_tokens
from gfa.evaluation import choice_accuracy, ending_logprobs, evaluate, get_encoder, load_multiple_choice
from helpers import tiny_model, write_jsonl

HS_ROWS = [{"ctx": "the cat sat on", "endings": [" a mat.", " the dog ran far", " mat", " cat cat"], "label": 0},
           {"ctx": "a dog", "endings": [" ran", " sat on the mat.", " x", " the"], "label": 1}]


def test_endings_match_hand_logprobs(tmp_path):
    m = tiny_model(block_size=16)
    items = load_multiple_choice(write_jsonl(tmp_path / "hs.jsonl", HS_ROWS))
    enc = get_encoder(256)
    # tiny token budget: several batches, ragged padding
    got = ending_logprobs(m, items, enc, "cpu", torch.autocast("cpu", enabled=False), max_tokens=40)
    for i, row in enumerate(HS_ROWS):
        for j, e in enumerate(row["endings"]):
            toks = list((row["ctx"] + e).encode())[-17:]   # left-truncated to block_size + 1
            n = min(len(e.encode()), len(toks) - 1)
            with torch.no_grad():
                logits, _ = m(torch.tensor([toks[:-1]]))
            lp = F.log_softmax(logits[0].double(), -1)
            want = sum(lp[t - 1, toks[t]].item() for t in range(len(toks) - n, len(toks)))
            assert got[i, j] == pytest.approx(want, abs=1e-4)
    acc, acc_norm = choice_accuracy(got, items)
    chars = np.array([[len(e.strip()) for e in r["endings"]] for r in HS_ROWS])
    labels = np.array([r["label"] for r in HS_ROWS])
    assert acc == np.mean(got.argmax(1) == labels) and acc_norm == np.mean((got / chars).argmax(1) == labels)
    # the same numbers in one big batch
    big = ending_logprobs(m, items, enc, "cpu", torch.autocast("cpu", enabled=False))
    assert np.allclose(big, got, atol=1e-4)


@pytest.mark.gpu
def test_endings_on_gpu_match_cpu(tmp_path):
    # the CUDA path (pinned, non-blocking index copies; results copied back after the loop)
    m = tiny_model(block_size=16)
    items = load_multiple_choice(write_jsonl(tmp_path / "hs.jsonl", HS_ROWS))
    enc, off = get_encoder(256), torch.autocast("cpu", enabled=False)
    cpu = ending_logprobs(m, items, enc, "cpu", off, max_tokens=40)
    gpu = ending_logprobs(m.cuda(), items, enc, "cuda", off, max_tokens=40)
    assert np.allclose(gpu, cpu, atol=1e-4)


def test_perplexity_is_exp_mean_ce(byte_data):
    m = tiny_model()
    val = load_tokens(str(byte_data / "val.bin"), 256)
    a = evaluate(m, val, 32, 4, 3, "cpu")
    assert a == evaluate(m, val, 32, 4, 3, "cpu")   # same numbers every call
    nll = []
    for x, y in eval_batches(val, 32, 4, 3):
        with torch.no_grad():
            lp = F.log_softmax(m(x)[0].double(), -1)
        nll.append(-lp.gather(-1, y[..., None]).flatten())
    assert math.exp(a) == pytest.approx(math.exp(torch.cat(nll).mean().item()), rel=1e-5)


