"""gfa/evaluation.py: perplexity is exp(mean CE) over the fixed windows, and the multiple-choice
log-probabilities (any number of endings) and greedy flags equal a hand computation (ragged
batches, left truncation), on CPU and CUDA."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gfa.cli import UserError
from gfa.data import eval_batches, load_tokens
from gfa.evaluation import (Tokenizer, choice_accuracy, continuation_logprobs, encode_items, encode_pair,
                            ending_logprobs, evaluate, load_multiple_choice)
from helpers import tiny_model, write_jsonl

HS_ROWS = [{"ctx": "the cat sat on", "endings": [" a mat.", " the dog ran far", " mat", " cat cat"], "label": 0},
           {"ctx": "a dog", "endings": [" ran", " sat on the mat.", " x", " the"], "label": 1}]


def test_endings_match_hand_logprobs(tmp_path):
    m = tiny_model(block_size=16)
    items = load_multiple_choice(write_jsonl(tmp_path / "hs.jsonl", HS_ROWS))
    enc = encode_items(items, Tokenizer(256))
    # tiny token budget: several batches, ragged padding
    got = ending_logprobs(m, enc, "cpu", torch.autocast("cpu", enabled=False), max_tokens=40)
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
    big = ending_logprobs(m, enc, "cpu", torch.autocast("cpu", enabled=False))
    assert np.allclose(big, got, atol=1e-4)


def hand_logprob(m, context, ending):
    """Summed log-prob of ending's bytes after context's, from one unbatched forward."""
    toks = list((context + ending).encode())
    with torch.no_grad():
        lp = F.log_softmax(m(torch.tensor([toks[:-1]]))[0][0].double(), -1)
    return sum(lp[t - 1, toks[t]].item() for t in range(len(context.encode()), len(toks)))


def test_any_number_of_endings(tmp_path):
    # 2 (WinoGrande-style), 3 and 5 endings in one file: each scored by hand, acc and acc_norm over the
    # item's own endings only (an argmax over padding would pick a missing ending)
    rows = [{"ctx": "the cat", "endings": [" sat", " ran on a mat."], "label": 1},
            {"ctx": "a dog ran", "endings": [" on", " the mat.", " x"], "label": 0},
            {"ctx": "on a", "endings": [" mat.", " cat", " dog", " the", " sat on"], "label": 4}]
    m = tiny_model()
    items = load_multiple_choice(write_jsonl(tmp_path / "mc.jsonl", rows))
    got = ending_logprobs(m, encode_items(items, Tokenizer(256)), "cpu", None, max_tokens=30)
    assert got.shape == (3, 5) and np.isneginf(got[0, 2:]).all() and np.isneginf(got[1, 3:]).all()
    want = [[hand_logprob(m, r["ctx"], e) for e in r["endings"]] for r in rows]
    for g, w in zip(got, want):
        assert np.allclose(g[:len(w)], w, atol=1e-4)
    labels = [r["label"] for r in rows]
    acc = np.mean([np.argmax(w) == lab for w, lab in zip(want, labels)])
    acc_norm = np.mean([np.argmax(np.array(w) / [len(e) - 1 for e in r["endings"]]) == r["label"]
                        for w, r in zip(want, rows)])
    assert choice_accuracy(got, items) == (pytest.approx(acc), pytest.approx(acc_norm))


def test_greedy_flag_and_pair_encoding():
    m = tiny_model()
    tok = Tokenizer(256)
    context = list(b"the cat sat")
    with torch.no_grad():   # the greedy continuation, token by token, by hand
        seq = list(context)
        for _ in range(3):
            seq.append(int(m(torch.tensor([seq]))[0][0, -1].argmax()))
    greedy = seq[len(context):]
    other = greedy[:2] + [(greedy[2] + 1) % 256]
    lp, is_greedy = continuation_logprobs(m, [(context, greedy), (context, other)], "cpu")
    assert list(is_greedy) == [True, False] and lp[0] > lp[1]
    # lm-eval's rules: trailing context spaces move to the continuation; an empty context is EOT (byte 0)
    assert encode_pair(tok, "ab  ", "c") == (list(b"ab"), list(b"  c"))
    assert encode_pair(tok, "", "xy") == ([0], list(b"xy"))


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_hellaswag_rows_are_built_as_lm_eval_builds_them():
    # expected strings written out by hand from lm-eval's hellaswag task: query = preprocess("label: ctx_a
    # Ctx_b") on the joined string, choices = preprocess(ending), joined to the query with " "
    (q1, e1, l1), (q2, e2, l2) = load_multiple_choice(str(FIXTURES / "hellaswag_rows.jsonl"))
    assert q1 == ("Work World: How to retract a resignation letter. Format your letter. Set up it up as a standard, "
                  "using a legible font such as times new roman 12 point. Address your letter to the person who "
                  "received your resignation letter.")   # one space after the colon: the [header] went first
    assert e1[0] == (" This could be your direct supervisor or human resources. Remember that business letters are "
                     "set up using block-style paragraphing.")
    assert e1[1] == ("  Include your past employment or financial information such as accounts or salary.. Summarize "
                     "any previous records pertaining to your resignation letter.")   # lm-eval keeps both quirks
    assert l1 == 0
    assert q2 == ("Removing ice from car: Then, the man writes over the snow covering the window of a car, and a woman "
                  "wearing winter clothes smiles. Then")
    assert e2[3] == " , the man continues removing the snow on his car." and l2 == 3


def test_other_files_are_scored_verbatim(tmp_path):
    row = {"ctx": "Q: [see above]  the  answer is", "endings": ["  one", "two [x]", " three", "four"], "label": 1}
    (ctx, endings, label), = load_multiple_choice(write_jsonl(tmp_path / "mc.jsonl", [row]))
    assert ctx == row["ctx"] and endings == row["endings"] and label == 1


def test_truncation_is_counted_in_a_warning(tmp_path, capsys):
    m = tiny_model(block_size=16)
    rows = HS_ROWS + [{"ctx": "ab", "endings": [" c", " d", " e", " f"], "label": 0}]
    items = load_multiple_choice(write_jsonl(tmp_path / "hs.jsonl", rows))
    ending_logprobs(m, encode_items(items, Tokenizer(256)), "cpu", torch.autocast("cpu", enabled=False))
    # "the cat sat on" + " the dog ran far" is 30 bytes, "a dog" + " sat on the mat." 21: both over 17
    assert "warning: 2 of 3 multiple-choice items are longer than the model's context (block_size 16)" \
        in capsys.readouterr().out


@pytest.mark.gpu
def test_endings_on_gpu_match_cpu(tmp_path):
    # the CUDA path (pinned, non-blocking index copies; results copied back after the loop)
    m = tiny_model(block_size=16)
    items = load_multiple_choice(write_jsonl(tmp_path / "hs.jsonl", HS_ROWS))
    enc, off = encode_items(items, Tokenizer(256)), torch.autocast("cpu", enabled=False)
    cpu = ending_logprobs(m, enc, "cpu", off, max_tokens=40)
    gpu = ending_logprobs(m.cuda(), enc, "cuda", off, max_tokens=40)
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




def test_partial_scoring_rows_and_their_errors(tmp_path):
    """A row with contexts + continuation scores the continuation under each context (encode_items pairs
    them); WinoGrande's own rows become that; malformed rows are one-line errors."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"contexts": ["a b", "c"], "continuation": " d", "label": 1}\n'
                    '{"sentence": "x _ y", "option1": "p", "option2": "q", "answer": "2"}\n')
    items = load_multiple_choice(str(path))
    assert items == [(["a b", "c"], [" d", " d"], 1), (["x p", "x q"], [" y", " y"], 1)]
    assert encode_items(items[:1], Tokenizer(256)) == [[(list(b"a b"), list(b" d")), (list(b"c"), list(b" d"))]]
    for bad, says in (('{"contexts": ["a"], "continuation": " d", "label": 0}', "2 or more"),
                      ('{"contexts": ["a", "b"], "continuation": " d", "label": 2}', "label must be 0..1")):
        path.write_text(bad + "\n")
        with pytest.raises(UserError, match=says):
            load_multiple_choice(str(path))
