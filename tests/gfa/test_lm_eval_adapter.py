"""gfa/lm_eval_adapter.py (lm-eval is an extra: requirements-extra.txt): on a local task YAML over a
local jsonl, lm-eval through the adapter picks the same ending of every item as the in-house scorer,
for a physically pruned and a passthrough checkpoint; rolling log-likelihood and greedy generation
equal hand computations; the `python -m gfa.lm_eval_adapter` command line works offline; bad tasks
are one-line errors."""
import json
import os
import runpy
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval")
import lm_eval.tasks   # noqa: E402
from lm_eval.api.registry import get_model   # noqa: E402
from lm_eval.evaluator import evaluate   # noqa: E402

from gfa import lm_eval_adapter as adapter   # noqa: E402
from gfa.cli import UserError   # noqa: E402
from gfa.evaluation import Tokenizer, choice_accuracy, encode_items, ending_logprobs, load_multiple_choice  # noqa: E402
from helpers import TASK_HEAD, tiny_model, write_jsonl, write_local_task, write_run, write_word_level_tokenizer   # noqa: E402
from model import drop_layers   # noqa: E402

# endings with their joining space (the in-house verbatim reading): helpers.LOCAL_TASK trims them again
ROWS = [{"ctx": "the cat sat on", "endings": [" a mat.", " the dog ran far"], "label": 0},
        {"ctx": "a dog ran", "endings": [" on", " the mat.", " x"], "label": 1},
        {"ctx": "on the mat", "endings": [" sat a cat.", " ran", " dog", " the", " on a"], "label": 4},
        {"ctx": "the dog", "endings": [" sat", " ran", " on the mat. the cat", " a"], "label": 2}]
@pytest.fixture
def local_tasks_only(monkeypatch):
    """lm-eval's task index without its thousands of built-in tasks (seconds to build): the local YAMLs."""
    class LocalTasksOnly(lm_eval.tasks.TaskManager):
        def __init__(self, *a, **kw):
            super().__init__(*a, **{**kw, "include_defaults": False})
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalTasksOnly)


def local_task(tmp_path, rows=ROWS):
    """A task folder for --include_path: tiny_mc.yaml over tmp_path/mc.jsonl (written when rows given)."""
    if rows is not None:
        write_jsonl(tmp_path / "mc.jsonl", rows)
    return write_local_task(tmp_path / "tasks", tmp_path / "mc.jsonl")


def checkpoints(tmp_path, byte_data):
    """A physically pruned run and a passthrough run of one trained-looking tiny model."""
    m = tiny_model(seed=3)
    pruned = write_run(tmp_path / "pruned", drop_layers(m, [2]), byte_data)
    m.set_passthrough([1])
    return {"pruned": pruned, "passthrough": write_run(tmp_path / "passthrough", m, byte_data)}


def test_lm_eval_and_the_in_house_scorer_choose_alike(tmp_path, byte_data):
    include = local_task(tmp_path)
    tasks = adapter.load_tasks(["tiny_mc"], include)
    items = load_multiple_choice(str(tmp_path / "mc.jsonl"))
    for name, run in checkpoints(tmp_path, byte_data).items():
        lm = get_model("gfa").create_from_arg_string(f"ckpt={run}/ckpt.pt,device=cpu")
        res = evaluate(lm, tasks, log_samples=True, bootstrap_iters=0)
        samples = sorted(res["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
        theirs = [np.array([r[0] for r in s["filtered_resps"]]) for s in samples]
        ours = ending_logprobs(lm.model, encode_items(items, Tokenizer(256)), "cpu", None)
        for t, o in zip(theirs, ours):
            assert np.allclose(t, o[:len(t)], atol=1e-4), name
            assert t.argmax() == o.argmax(), name   # the same choice, item by item
        acc, acc_norm = choice_accuracy(ours, items)
        assert res["results"]["tiny_mc"]["acc,none"] == pytest.approx(acc)
        assert res["results"]["tiny_mc"]["acc_norm,none"] == pytest.approx(acc_norm)
        # the passthrough checkpoint runs without its layer 1, the pruned one has 3 layers
        assert lm.model.passthrough == ({1} if name == "passthrough" else set())
        assert lm.model.config.n_layer == (4 if name == "passthrough" else 3)
    assert adapter.evaluate_tasks(lm.model, tasks, "cpu")["tiny_mc"] == {"acc": acc, "acc_norm": acc_norm}


class Request:   # what lm-eval hands a model: .args
    def __init__(self, *args):
        self.args = args


def test_rolling_loglikelihood_and_greedy_generation_equal_hand_computations():
    m = tiny_model(block_size=16)
    with torch.no_grad():   # only ASCII bytes but EOT (0) can win the argmax: the text decodes exactly
        m.lm_head.weight[128:] = 0
        m.lm_head.weight[0] = 0
    lm = adapter.GFALM(model=m, device="cpu")

    def hand_lp(context, targets):   # summed log-prob of targets after context, one unbatched forward
        seq = context + targets
        with torch.no_grad():
            lp = F.log_softmax(m(torch.tensor([seq[:-1]]))[0][0].double(), -1)
        return sum(lp[len(context) - 1 + i, t].item() for i, t in enumerate(targets))
    short, long = "the cat sat", "the cat sat on a mat. " * 3   # 11 and 66 bytes (block_size 16)
    ids = list(long.encode())
    # lm-eval's disjoint windows, written out: EOT then the first 16 bytes; then 16 bytes after the one
    # before them; the last 2 bytes with as much context as fits (15 bytes)
    windows = [([0], ids[:16]), (ids[15:16], ids[16:32]), (ids[31:32], ids[32:48]), (ids[47:48], ids[48:64]),
               (ids[49:64], ids[64:66])]
    got = lm.loglikelihood_rolling([Request(short), Request(long)])
    assert got[0] == pytest.approx(hand_lp([0], list(short.encode())), abs=1e-4)
    assert got[1] == pytest.approx(sum(hand_lp(c, t) for c, t in windows), abs=1e-3)
    # greedy generation through the KV cache equals argmax decoding without a cache
    ctx = list(b"the cat")
    seq = list(ctx)
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(m(torch.tensor([seq]))[0][0, -1].argmax()))
    text = bytes(seq[len(ctx):]).decode()
    assert lm.generate_until([Request("the cat", {"until": [], "max_gen_toks": 8})]) == [text]
    stop = text[4:6]
    assert lm.generate_until([Request("the cat", {"until": [stop], "max_gen_toks": 8})]) == [text.split(stop)[0]]
    out = lm.loglikelihood([Request("the cat", bytes(seq[len(ctx):len(ctx) + 3]).decode()),
                            Request("the cat", "zzz")])
    assert out[0][1] is True and out[1][1] is False and out[0][0] > out[1][0]


@pytest.mark.gpu
def test_on_the_gpu_the_same_scores_and_text():
    m = tiny_model(block_size=16)
    cpu, gpu = adapter.GFALM(model=m, device="cpu"), adapter.GFALM(model=tiny_model(block_size=16).cuda(), device="cuda")
    reqs = [Request("the cat", " sat on"), Request("", "a mat"), Request("the dog ran on the mat " * 2, ". the")]
    for (a, ga), (b, gb) in zip(cpu.loglikelihood(reqs), gpu.loglikelihood(reqs)):
        assert a == pytest.approx(b, abs=1e-3) and ga == gb
    rolling = [Request("the cat sat on a mat. " * 3)]
    assert cpu.loglikelihood_rolling(rolling)[0] == pytest.approx(gpu.loglikelihood_rolling(rolling)[0], abs=1e-2)
    gen = [Request("the cat", {"until": [], "max_gen_toks": 6})]
    assert cpu.generate_until(gen) == gpu.generate_until(gen)


@pytest.mark.filterwarnings("ignore:'gfa.lm_eval_adapter' found in sys.modules")   # runpy, run in process
def test_the_command_line_offline(tmp_path, byte_data, monkeypatch, local_tasks_only):
    """`python -m gfa.lm_eval_adapter --model gfa ...`, run in process: lm-eval's own command line with the
    model registered, on the local task."""
    include = local_task(tmp_path)
    run = checkpoints(tmp_path, byte_data)["pruned"]
    out = tmp_path / "lm_eval_out"
    monkeypatch.setattr(sys, "argv", ["lm_eval", "--model", "gfa", "--model_args", f"ckpt={run},device=cpu",
                                      "--tasks", "tiny_mc", "--include_path", include, "--output_path", str(out)])
    runpy.run_module("gfa.lm_eval_adapter", run_name="__main__")
    result, = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f.startswith("results")]
    with open(result) as f:
        acc = json.load(f)["results"]["tiny_mc"]["acc,none"]
    model = get_model("gfa")(ckpt=run, device="cpu").model
    items = load_multiple_choice(str(tmp_path / "mc.jsonl"))
    assert acc == pytest.approx(choice_accuracy(ending_logprobs(model, encode_items(items, Tokenizer(256)), "cpu",
                                                                None), items)[0])


def test_bad_tasks_are_one_line_errors(tmp_path, local_tasks_only):
    include = local_task(tmp_path)
    with pytest.raises(UserError, match="lm-eval task 'no_such_task' is unknown"):
        adapter.load_tasks(["tiny_mc", "no_such_task"], include)
    (tmp_path / "other").mkdir()
    missing = local_task(tmp_path / "other", rows=None)   # the YAML names a data file that is not there
    with pytest.raises(UserError, match="cannot load the data of tiny_mc") as e:
        adapter.load_tasks(["tiny_mc"], missing)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="not a folder"):
        adapter.load_tasks(["tiny_mc"], str(tmp_path / "mc.jsonl"))
    with pytest.raises(UserError, match="needs ckpt="):
        get_model("gfa").create_from_arg_string("device=cpu")


def test_lm_eval_missing_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)   # as if not installed
    monkeypatch.delitem(sys.modules, "gfa.lm_eval_adapter")
    with pytest.raises(UserError, match="lm-eval is not installed.*requirements-extra.txt"):
        import gfa.lm_eval_adapter   # noqa: F401


def test_an_imported_run_is_read_through_its_own_tokenizer(tmp_path):
    """A run hf.py imported records the HF folder it came from: the adapter encodes text with that folder's
    tokenizer.json and its eos (a word-level vocabulary written here, so the ids are known by hand), and
    tokenizer=<folder> names one for any other run; a plain run keeps its vocabulary's (bytes)."""
    pytest.importorskip("tokenizers")
    from gfa import rundir
    folder = tmp_path / "hf"
    write_word_level_tokenizer(str(folder))
    imported, plain = str(tmp_path / "imported"), str(tmp_path / "plain")
    rundir.save_gpt(imported, tiny_model(), {}, 0, imported_from={"path": str(folder)})
    rundir.save_gpt(plain, tiny_model(), {}, 0)
    lm = adapter.GFALM(ckpt=imported, device="cpu")
    assert (lm.tok_encode("not to be"), lm.eot_token_id) == ([5, 2, 3], 1)
    assert adapter.GFALM(ckpt=plain, device="cpu", tokenizer=str(folder)).tok_encode("to be") == [2, 3]
    assert adapter.GFALM(ckpt=plain, device="cpu").tok_encode("to") == [116, 111]


WINO_ROWS = [{"sentence": "the cat sat on the mat because _ was tired.", "option1": "the cat", "option2": "the mat",
              "answer": "1"},
             {"sentence": "a dog ran to _ and sat.", "option1": "the cat", "option2": "a mat", "answer": "2"},
             {"sentence": "_ sat on the dog.", "option1": "the cat", "option2": "a mat", "answer": "1"}]
WINO_TASK = TASK_HEAD + """doc_to_text: !function preprocess_winogrande.doc_to_text
doc_to_target: !function preprocess_winogrande.doc_to_target
doc_to_choice: !function preprocess_winogrande.doc_to_choice
metric_list:
  - metric: acc
"""


def test_partial_scoring_equals_lm_evals_winogrande(tmp_path, byte_data):
    """WinoGrande rows: the in-house scorer's partial scoring (a context per option, the shared continuation
    scored under each) gives lm-eval's requests, log-likelihoods and acc, with lm-eval's own winogrande
    preprocessing."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    src = os.path.join(os.path.dirname(lm_eval.tasks.__file__), "winogrande", "preprocess_winogrande.py")
    (tasks / "preprocess_winogrande.py").write_text(open(src).read())   # lm-eval's own, as its winogrande task uses
    write_jsonl(tmp_path / "wino.jsonl", WINO_ROWS)
    write_local_task(tasks, tmp_path / "wino.jsonl", "tiny_wino", WINO_TASK)
    run = write_run(tmp_path / "run", tiny_model(seed=7), byte_data)
    lm = get_model("gfa").create_from_arg_string(f"ckpt={run}/ckpt.pt,device=cpu")
    res = evaluate(lm, adapter.load_tasks(["tiny_wino"], str(tasks)), log_samples=True, bootstrap_iters=0)
    samples = sorted(res["samples"]["tiny_wino"], key=lambda s: s["doc_id"])
    items = load_multiple_choice(str(tmp_path / "wino.jsonl"))
    assert items[0] == (["the cat sat on the mat because the cat", "the cat sat on the mat because the mat"],
                        [" was tired."] * 2, 0)
    for s, (contexts, ends, _) in zip(samples, items):   # lm-eval's requests: these contexts, one continuation
        assert [tuple(a) for a in s["arguments"]] == list(zip(contexts, ends))
    ours = ending_logprobs(lm.model, encode_items(items, Tokenizer(256)), "cpu", None)
    theirs = np.array([[r[0] for r in s["filtered_resps"]] for s in samples])
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    acc, acc_norm = choice_accuracy(ours, items)
    assert res["results"]["tiny_wino"]["acc,none"] == pytest.approx(acc) and acc_norm == acc
