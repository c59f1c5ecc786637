"""prune.py end to end on tiny CPU models (each method's scores are tested in tests/gfa/test_pruning.py):
the table over seeds, passthrough pruning equals the physically smaller model, the early-exit curve
equals the model cut above each exit, healing and timing run train.py and bench.py on the saved
models (and resume), bad input gives one-line errors."""
import importlib.util
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

import bench
import prune
import train
from gfa import rundir
from gfa.cli import UserError
from gfa.data import load_tokens
from gfa.evaluation import Tokenizer, choice_accuracy, encode_items, ending_logprobs, evaluate, load_multiple_choice
from gfa.theory import spearman
from helpers import (Exited, one_line_error, scripts_in_process, tiny_model, write_jsonl, write_local_task, write_run,
                     zero_branch)

N = 4


FIGURE_TESTS = {"test_cli_table_two_seeds_and_save_pruned", "test_exits_curve_equals_the_models_cut_above_each_exit",
                "test_new_baselines_heal_modes_and_the_kept_table"}


@pytest.fixture(autouse=True)
def figures_only_where_checked(request, monkeypatch):
    """prune.py draws its figures (~0.3 s each on 2 cores) only in the tests that check them: the rest of
    its output is what the other tests are about."""
    if request.node.originalname not in FIGURE_TESTS:
        for name in ("plot", "plot_kept", "plot_exits"):
            monkeypatch.setattr(prune, name, lambda *args: None)


def make_run(path, model, data_dir, share_min=None, dump=True, iter_num=5):
    """A run directory whose layer share_min gets the smallest gradient norms."""
    names = list(model.param_groups_by_layer())
    rows = 1.0 + np.random.default_rng(0).random((5, len(names)))
    if share_min is not None:
        rows[:, names.index(f"layer.{share_min}")] = 0.1
    return write_run(path, model, data_dir, rows=rows, iter_num=iter_num, dump=dump)


HS_ROWS = [{"ctx": "the cat sat on", "endings": [" a mat.", " the dog ran far", " mat", " cat cat"], "label": 0},
           {"ctx": "a dog", "endings": [" ran", " sat on the mat.", " x", " the"], "label": 1}]


# ---- end to end -----------------------------------------------------------------------------------------
def test_cli_table_two_seeds_and_save_pruned(tmp_path, byte_data, monkeypatch):
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
        runs.append(make_run(tmp_path / f"seed{seed}", m, byte_data, share_min=1))
    old_style = torch.load(os.path.join(runs[0], "ckpt.pt"), weights_only=False)   # as earlier versions wrote it
    old_style["train_config"]["n_layer"] = N
    torch.save(old_style, os.path.join(runs[0], "ckpt.pt"))
    hs = write_jsonl(tmp_path / "hs.jsonl", HS_ROWS)
    out = tmp_path / "table"
    res = prune.main(["--runs", *runs, "--k", "1,2", "--hellaswag", hs, "--eval_batches", "2", "--batch_size", "4",
                      "--calib_batches", "2", "--device", "cpu", "--out", str(out)])
    text = (out / "table1.md").read_text()
    assert (out / "table1_ppl.png").stat().st_size > 0 and "acc_norm" in text and "± " in text
    assert "Ranking stability" in text
    stab = json.loads((out / "results.json").read_text())["stability"]
    for m in prune.PAPER_METHODS:   # two runs: one pair, its rho is the mean
        rho = spearman(res[0]["scores"][m], res[1]["scores"][m])[0]
        assert stab[m][0] == pytest.approx(rho, nan_ok=True) and stab[m][1] == [pytest.approx(rho, nan_ok=True)]
    assert any(0 < abs(stab[m][0]) < 1 for m in prune.PAPER_METHODS)   # not only the trivial +-1 cases
    for r in res:
        assert r["cells"]["cfp/1"]["layers"] == [1]
        assert r["cells"]["magnitude/1"]["layers"] == [2] and r["cells"]["similarity/1"]["layers"] == [2]
    # the same table from the two runs pruned apart, then combined (as seeds trained on different machines)
    common = ["--k", "1,2", "--hellaswag", hs, "--eval_batches", "2", "--batch_size", "4", "--calib_batches", "2",
              "--device", "cpu"]
    n_joint = len(evaluated)
    for i, run in enumerate(runs):
        prune.main(["--runs", run, *common, "--out", str(tmp_path / f"apart{i}")])
    apart = [str(tmp_path / f"apart{i}" / "results.json") for i in (0, 1)]
    n_evaluations = len(evaluated)
    prune.main(["--combine", *apart, "--out", str(tmp_path / "combined")])
    assert len(evaluated) == n_evaluations   # nothing is evaluated again
    assert (tmp_path / "combined" / "table1.md").read_text() == text
    prune.main(["--runs", runs[0], *common, "--magnitude", "sum", "--out", str(tmp_path / "other")])
    with pytest.raises(UserError, match="other --k, --methods"):
        prune.main(["--combine", apart[0], str(tmp_path / "other" / "results.json")])
    del evaluated[n_joint:]
    # identical removed sets share one evaluation: per run, one per distinct set (baseline included)
    distinct = [{frozenset()} | {frozenset(c["layers"]) for c in r["cells"].values()} for r in res]
    n0 = len(distinct[0])
    assert len(evaluated) == n0 + len(distinct[1])
    assert set(evaluated[:n0]) == distinct[0] and set(evaluated[n0:]) == distinct[1]   # each set once
    # the pruned checkpoint is physically smaller and scores what passthrough scored
    small = tmp_path / "small"
    r = prune.main(["--runs", runs[0], "--k", "2", "--methods", "cfp", "--hellaswag", "none", "--eval_batches", "2",
                    "--batch_size", "4", "--device", "cpu", "--out", str(tmp_path / "t2"), "--save_pruned", str(small)])
    model, ckpt = rundir.load_gpt(str(small))
    assert model.config.n_layer == N - 2 and ckpt["pruned_from"]["removed_layers"] == r[0]["cells"]["cfp/2"]["layers"]
    assert rundir.read_model_config(str(small))[1]["n_layer"] == N - 2   # the run's files agree
    assert "n_layer" not in ckpt["train_config"]   # a source run of an earlier version kept model keys there
    assert rundir.read_grad_dump(str(small))["layer_names"] == ["layer.0", "layer.1"]
    r2 = prune.main(["--runs", str(small), "--k", "1", "--methods", "cfp,magnitude", "--hellaswag", "none",
                     "--eval_batches", "2", "--batch_size", "4", "--device", "cpu", "--out", str(tmp_path / "t3")])
    assert r2[0]["baseline"]["ppl"] == pytest.approx(r[0]["cells"]["cfp/2"]["ppl"], rel=1e-5)


def test_exits_curve_equals_the_models_cut_above_each_exit(tmp_path, byte_data):
    """--exits on two different models: exit E's PPL and multiple-choice log-probs, from one pass per
    batch, equal an evaluation of the model with layers E..N-1 passed through (prune.py's own scoring)."""
    deep = tiny_model(0, deep_supervision=True)
    runs = [make_run(tmp_path / "deep", deep, byte_data), make_run(tmp_path / "three", tiny_model(1, n_layer=3),
                                                                   byte_data)]
    hs = write_jsonl(tmp_path / "hs.jsonl", HS_ROWS)
    out = tmp_path / "exits"
    res = prune.main(["--runs", *runs, "--exits", "--hellaswag", hs, "--eval_batches", "2", "--batch_size", "4",
                      "--device", "cpu", "--out", str(out)])
    assert [len(r["exits"]) for r in res] == [4, 3] and (out / "exits.png").stat().st_size > 0
    assert json.loads((out / "exits.json").read_text())["runs"] == json.loads(json.dumps(res))
    assert len((out / "exits.md").read_text().splitlines()) == 4 + 4   # title, blank, header, rule, E = 1..4
    # each run's curve measured apart (one machine per run), then --combine: the same table and runs
    for i, run in enumerate(runs):
        prune.main(["--runs", run, "--exits", "--hellaswag", hs, "--eval_batches", "2", "--batch_size", "4",
                    "--device", "cpu", "--out", str(tmp_path / f"apart{i}")])
    both = prune.main(["--combine", *[str(tmp_path / f"apart{i}" / "exits.json") for i in (0, 1)],
                       "--out", str(tmp_path / "joined")])
    assert json.loads(json.dumps(both)) == json.loads(json.dumps(res))
    assert (tmp_path / "joined" / "exits.md").read_text() == (out / "exits.md").read_text()
    with pytest.raises(UserError, match="exits.json files only"):
        prune.main(["--combine", str(tmp_path / "joined" / "exits.json"),
                    write_jsonl(tmp_path / "table1.json", [{"ks": [1], "runs": [{"n_layer": 4}]}])])
    with pytest.raises(UserError, match="cannot read it as JSON"):
        prune.main(["--combine", str(tmp_path / "absent.json")])
    val = load_tokens(str(byte_data / "val.bin"), 256)
    items = load_multiple_choice(hs)
    no_autocast = torch.autocast("cpu", enabled=False)
    encoded = encode_items(items, Tokenizer(256))
    every_exit = ending_logprobs(deep, encoded, "cpu", no_autocast, exits=True)
    for E in (1, 3, 4):
        deep.set_passthrough(range(E, N))
        loss = evaluate(deep, val, 32, 4, 2, "cpu", no_autocast)
        lp = ending_logprobs(deep, encoded, "cpu", no_autocast)
        got = res[0]["exits"][E - 1]
        assert got["exit"] == E and got["loss"] == pytest.approx(loss, rel=1e-6)
        assert np.allclose(every_exit[E - 1], lp, rtol=1e-6)
        assert (got["acc"], got["acc_norm"]) == choice_accuracy(lp, items)


def test_heal_speed_and_tasks_for_every_pruned_model(tmp_path, byte_data, monkeypatch):
    """--heal_tokens: every distinct pruned model is saved, healed by train.py for that many tokens and
    measured again (checked here against the healed run itself); --speed: bench.py times one saved model per
    architecture; --tasks (with lm-eval installed): a local lm-eval task scores every model. The scripts run
    in process; only the healed runs' logs and dumps stay. A call stopped half-way goes on where it stopped."""
    with_lm_eval = importlib.util.find_spec("lm_eval") is not None
    val = load_tokens(str(byte_data / "val.bin"), 256)
    calls, healed_loss = [], {}

    def in_process(script, argv, check=True):
        calls.append((script, argv))
        try:
            {"train.py": train.main, "bench.py": bench.main}[script](argv)
        except UserError:
            if check:
                raise
            return 2
        if script == "train.py":   # the healed run, measured here before prune.py removes its checkpoint
            out = next(a.split("=", 1)[1] for a in argv if a.startswith("--out_dir="))
            healed_loss[out] = evaluate(rundir.load_gpt(out)[0], val, 32, 4, 2, "cpu")
        return 0
    monkeypatch.setattr(prune, "run_script", in_process)   # bench.py
    scripts_in_process(monkeypatch, prune, in_process)      # train.py's heals
    runs = [make_run(tmp_path / f"seed{s}", tiny_model(s), byte_data, share_min=1) for s in (0, 1)]
    mc = write_jsonl(tmp_path / "mc.jsonl", HS_ROWS)
    tasks = ["--tasks", "tiny_mc", "--include_path", write_local_task(tmp_path / "tasks", mc)] if with_lm_eval else []
    out = tmp_path / "table"
    res = prune.main(["--runs", *runs, "--k", "1", "--methods", "cfp,magnitude", "--hellaswag", mc, *tasks,
                      "--eval_batches", "2", "--batch_size", "4", "--device", "cpu", "--heal_tokens", "640",
                      "--heal_lr", "1e-2", "--heal_args", "--eval_iters=1 --eval_batch_size=2", "--speed",
                      "--bench_args", "--runs 1 --warmup 0 --dtype fp32", "--out", str(out)])
    heals = [argv for script, argv in calls if script == "train.py"]
    assert len(heals) == sum(len({frozenset(c["layers"]) for c in r["cells"].values()}) for r in res)
    assert all("--max_iters=5" in a and "--learning_rate=0.01" in a for a in heals)   # 640 tokens / (4 x 32)
    for r in res:
        for cell in r["cells"].values():
            h = cell["healed"]
            assert h["ppl"] == pytest.approx(math.exp(healed_loss[h["run_dir"]]), rel=1e-6) and h["ppl"] < cell["ppl"]
            assert os.path.isfile(os.path.join(h["run_dir"], "log.txt"))
            assert not os.path.exists(os.path.join(h["run_dir"], "ckpt.pt"))
            assert cell["speed"]["forward_ms"] > 0 and cell["speed"]["decode_ms_per_token"] > 0
            if with_lm_eval:
                assert cell["zero_shot_mean"] == cell["tasks"]["tiny_mc"]["acc_norm"]
                assert cell["healed"]["tasks"]["tiny_mc"].keys() == {"acc", "acc_norm"}
    timed = [argv for script, argv in calls if script == "bench.py"]
    assert [a[2] for a in timed] == ["--mode=inference", "--mode=decode"]   # the 4- and the 3-layer model, once
    assert res[0]["cells"]["cfp/1"]["speed"] == res[1]["cells"]["magnitude/1"]["speed"] != res[0]["baseline"]["speed"]
    assert not (out / "models").exists() and (out / "speed" / "inference.json").is_file()
    forward_compile = json.loads((out / "speed" / "inference.json").read_text())["meta"]["compile"]
    assert res[0]["baseline"]["speed"]["forward_compile"] == forward_compile   # named in the table's legend
    text = (out / "table1.md").read_text()
    assert "Healed (the pruned model" in text and "Speed of the physically pruned model" in text
    assert ("tiny_mc acc_norm" in text) == with_lm_eval
    # the seeds pruned apart and only one of them timed (speed is per architecture): the same table
    joint = json.loads((out / "results.json").read_text())
    for i, r in enumerate(joint["runs"]):
        part = dict(joint, runs=[r])
        if i:
            part["settings"] = dict(part["settings"], speed=False, bench_args="")
            for cell in [r["baseline"], *r["cells"].values()]:
                del cell["speed"]
        (tmp_path / f"part{i}.json").write_text(json.dumps(part))
    prune.main(["--combine", str(tmp_path / "part0.json"), str(tmp_path / "part1.json"), "--out", str(tmp_path / "c")])
    assert (tmp_path / "c" / "table1.md").read_text() == text
    # both seeds timed, the second another way (10x slower): the table shows the first file's timing, not a mean
    joint = json.loads((out / "results.json").read_text())   # afresh: the parts above took the speed out
    slow = dict(joint, runs=[joint["runs"][1]])
    for cell in [slow["runs"][0]["baseline"], *slow["runs"][0]["cells"].values()]:
        cell["speed"] = {k: v * 10 if k == "forward_ms" else v for k, v in cell["speed"].items()}
    (tmp_path / "slow.json").write_text(json.dumps(slow))
    prune.main(["--combine", str(tmp_path / "part0.json"), str(tmp_path / "slow.json"), "--out", str(tmp_path / "c2")])
    assert (tmp_path / "c2" / "table1.md").read_text() == text
    # a call stopped after some heals (one healed.json missing): the same call again heals only that one,
    # and every number is what the uninterrupted call gave; other heal settings heal everything again
    first = res[0]["cells"]["cfp/1"]["healed"]["run_dir"]
    os.remove(os.path.join(first, "healed.json"))
    again = ["--runs", *runs, "--k", "1", "--methods", "cfp,magnitude", "--hellaswag", mc, *tasks, "--eval_batches", "2",
             "--batch_size", "4", "--device", "cpu", "--heal_tokens", "640", "--heal_args",
             "--eval_iters=1 --eval_batch_size=2", "--out", str(out)]
    calls.clear()
    res2 = prune.main(again + ["--heal_lr", "1e-2"])
    assert [a for s, a in calls if s == "train.py"] == [heals[0]] and f"--out_dir={first}" in heals[0]
    assert [[c["healed"] for c in r["cells"].values()] for r in res2] == \
        [[c["healed"] for c in r["cells"].values()] for r in res]
    calls.clear()
    prune.main(again + ["--heal_lr", "2e-2"])
    assert len([a for s, a in calls if s == "train.py"]) == len(heals)


# ---- bad input: one-line errors ---------------------------------------------------------------------------
def test_bad_inputs(tmp_path, byte_data, capsys):
    run = make_run(tmp_path / "run", tiny_model(), byte_data)
    fixed = ["--device", "cpu", "--hellaswag", "none", "--eval_batches", "1", "--batch_size", "2", "--calib_batches", "1"]
    err = lambda *argv: one_line_error(prune.main, [*fixed, *argv], capsys)   # later options win
    assert "k=4" in err("--runs", run, "--k", "4") and "[1, 3]" in err("--runs", run, "--k", "0")
    assert "--k" in err("--runs", run, "--k", "two")
    assert "--methods" in err("--runs", run, "--methods", "cfp,random")
    assert "--cfp_steps -1: must be >= 0" in err("--runs", run, "--k", "1", "--cfp_steps", "-1")
    assert err("--runs", tmp_path / "missing", "--k", "1").startswith("error: checkpoint")
    nodump = make_run(tmp_path / "nodump", tiny_model(), byte_data, dump=False)
    assert "gradient dump" in err("--runs", nodump, "--k", "1", "--methods", "cfp")
    assert "one --k" in err("--runs", run, "--k", "1,2", "--methods", "cfp", "--save_pruned", tmp_path / "x")
    good = json.dumps(HS_ROWS[0])
    cases = {"{not json": "not a JSON object", json.dumps({"ctx": "a", "endings": ["b"] * 4}): "label",
             json.dumps({"ctx": "a", "endings": [" b"], "label": 0}): "2 or more non-empty",
             json.dumps({"ctx": "a", "endings": [" b"] * 4, "label": 7}): "label must be 0..3"}
    for i, (bad, want) in enumerate(cases.items()):
        path = write_jsonl(tmp_path / f"bad{i}.jsonl", [good, good, bad])
        line = err("--runs", run, "--k", "1", "--hellaswag", path)
        assert f"bad{i}.jsonl:3 " in line and want in line, line
    # a physically pruned run: k counts its own layers
    small = tmp_path / "small"
    prune.save_pruned(str(small), rundir.load_gpt(run)[0], rundir.read_checkpoint(run), [0, 1], run, ["cfp/2"])
    assert "[1, 1] for the 2-layer model" in err("--runs", small, "--k", "2") and "already pruned: [0, 1]" in \
        err("--runs", small, "--k", "2")
    assert "prune.py sets init_from" in err("--runs", run, "--k", "1", "--heal_tokens", "100",
                                            "--heal_args=--max_iters=3")
    assert "--task_limit" in err("--runs", run, "--k", "1", "--task_limit", "-1")
    mc = json.loads((small / "model_config.json").read_text())   # weights and config of two different models
    mc["config"]["d_ffn"] = [48, 48]
    (small / "model_config.json").write_text(json.dumps(mc))
    assert "does not hold the model" in err("--runs", small, "--k", "1", "--heal_tokens", "100")
    assert not os.path.exists(tmp_path / "run" / "prune") and not os.path.exists(small / "prune")   # nothing written


def test_tasks_without_lm_eval_is_a_one_line_error(tmp_path, byte_data, capsys, monkeypatch):
    run = make_run(tmp_path / "run", tiny_model(), byte_data)
    monkeypatch.setitem(sys.modules, "lm_eval", None)   # as if not installed
    monkeypatch.delitem(sys.modules, "gfa.lm_eval_adapter", raising=False)
    line = one_line_error(prune.main, ["--runs", run, "--k", "1", "--tasks", "piqa", "--device", "cpu"], capsys)
    assert "lm-eval is not installed" in line and "leave out --tasks" in line
    assert not os.path.exists(tmp_path / "run" / "prune")


def test_a_registered_method_is_all_prune_py_needs(tmp_path, byte_data, monkeypatch, capsys):
    """A method added to gfa/pruning.py's registry (one function) is chosen by --methods, ranked, evaluated,
    labelled in the table and listed in --help, with no edit to prune.py."""
    from gfa import pruning

    def keep_first_layers(model, ks, inp):   # drops the last k layers
        N = model.config.n_layer
        return pruning.by_lowest(-np.arange(N, dtype=float), ks, "minus depth")
    monkeypatch.setattr(pruning, "METHODS", dict(pruning.METHODS))   # registered for this test only
    monkeypatch.setattr(prune, "REGISTRY", pruning.METHODS)
    pruning.method("last_out", "Last out", "the last k layers go")(keep_first_layers)
    run = make_run(tmp_path / "run", tiny_model(0), byte_data)
    res = prune.main(["--runs", run, "--k", "1,2", "--methods", "last_out,magnitude", "--hellaswag", "none",
                      "--eval_batches", "1", "--batch_size", "2", "--out", str(tmp_path / "t")])
    assert res[0]["cells"]["last_out/2"]["layers"] == [2, 3]
    assert "| k | metric | Magnitude | Last out |" in (tmp_path / "t" / "table1.md").read_text()   # registry order
    with pytest.raises(SystemExit):
        prune.main(["--help"])
    assert "last_out: the last k layers go" in capsys.readouterr().out


def test_new_baselines_heal_modes_and_the_kept_table(tmp_path, byte_data, monkeypatch):
    """reverse and replaceme pruned, healed in the three modes (train.py in process, its tune keys), and Table 1
    in the field's form: % of the dense accuracy and perplexity kept, checked against the cells by hand."""
    calls = []

    def in_process(script, argv):
        calls.append(argv)
        train.main(argv + ["--compile=False"])
        return 0
    scripts_in_process(monkeypatch, prune, in_process)
    run = make_run(tmp_path / "run", tiny_model(5), byte_data)
    mc = write_jsonl(tmp_path / "mc.jsonl", HS_ROWS)
    out = tmp_path / "t"
    res = prune.main(["--runs", run, "--k", "1,2", "--methods", "reverse,replaceme", "--hellaswag", mc,
                      "--eval_batches", "1", "--batch_size", "2", "--calib_batches", "2", "--device", "cpu",
                      "--heal_tokens", "64", "--heal_mode", "full,partial,lora", "--heal_last_layers", "1",
                      "--heal_args", "--eval_iters=1 --eval_batch_size=2", "--out", str(out)])[0]
    assert res["cells"]["reverse/2"]["layers"] == [2, 3] and "edited" in res["cells"]["replaceme/1"]
    for cell in res["cells"].values():
        assert {"healed", "healed_partial", "healed_lora"} <= cell.keys()
    assert len(calls) == 3 * 4   # 4 distinct pruned models (ReplaceMe's edited ones are its own), 3 modes each
    assert sum("--tune=partial" in a and "--tune_last=1" in a for a in calls) == 4
    assert sum("--tune=lora" in a and "--lora_rank=8" in a for a in calls) == 4
    text = (out / "table1.md").read_text()
    assert "Healed, lora (the pruned model" in text and (out / "table1_kept.png").is_file()
    row = next(line for line in text.splitlines() if line.startswith("| ReplaceMe | healed partial"))
    c, base = res["cells"]["replaceme/2"]["healed_partial"], res["baseline"]
    acc_kept, ppl_kept = 100 * c["acc_norm"] / base["acc_norm"], 100 * base["ppl"] / c["ppl"]
    assert row.split(" | ")[-2:] == [f"{acc_kept:.1f} ± 0.0", f"{ppl_kept:.1f} ± 0.0 |"]   # k=2 (50 %)
    assert "k=1 (25 % removed) acc kept %" in text


def test_calibration_gradient_methods_over_seeds_combine_to_the_same_table(tmp_path, byte_data):
    runs = [make_run(tmp_path / f"s{s}", tiny_model(s), byte_data) for s in (0, 1)]
    common = ["--k", "1,2", "--methods", "cfp,cfp_calib,early_grad", "--hellaswag", write_jsonl(tmp_path / "m.jsonl",
              HS_ROWS), "--eval_batches", "1", "--batch_size", "2", "--calib_batches", "2", "--device", "cpu"]
    prune.main(["--runs", *runs, *common, "--out", str(tmp_path / "joint")])
    joint = json.loads((tmp_path / "joint" / "results.json").read_text())
    for i, r in enumerate(joint["runs"]):   # as if each seed had been pruned on its own machine
        (tmp_path / f"p{i}.json").write_text(json.dumps(dict(joint, runs=[r])))
    prune.main(["--combine", str(tmp_path / "p0.json"), str(tmp_path / "p1.json"), "--out", str(tmp_path / "c")])
    joint, combined = ((tmp_path / d / "table1.md").read_text() for d in ("joint", "c"))
    assert combined == joint and "| Early gradient | pruned (no training) |" in joint
    assert "CFP (calibration)" in joint
    rows = json.loads((tmp_path / "joint" / "results.json").read_text())["runs"]
    rhos = [spearman(r["scores"]["early_grad"], r["scores"]["cfp"])[0] for r in rows]
    assert f"| Early gradient | {rhos[0]:.3f}, {rhos[1]:.3f} | {np.mean(rhos):.3f} |" in joint


def test_bad_heal_and_method_options(tmp_path, byte_data, capsys):
    run = make_run(tmp_path / "run", tiny_model(), byte_data)
    err = lambda *argv: one_line_error(prune.main, ["--runs", run, "--hellaswag", "none", "--device", "cpu", *argv],
                                       capsys)
    assert "--heal_mode 'fast'" in err("--heal_tokens", "100", "--heal_mode", "fast")
    assert "--heal_last_layers, --heal_lora_rank and --heal_jobs must be >= 1" in err("--heal_last_layers", "0")
    assert "--heal_jobs must be >= 1" in err("--heal_jobs", "0")
    assert "choose from" in err("--methods", "replace_me")
    assert "prune.py sets init_from" in err("--heal_args=--tune=lora")   # the mode is --heal_mode's


def test_heal_jobs_give_the_numbers_of_one_at_a_time_and_a_failure_keeps_the_finished(tmp_path, byte_data,
                                                                                       monkeypatch):
    """--heal_jobs=3: the same heals and numbers as one at a time (train.py in process here), each child's
    output in <healed>.log, removed once it is measured. A heal that fails: one line naming its log, no
    heal started after it, the heals already running finished and kept (healed.json), so a second call
    heals only what is left."""
    calls, fail_call = [], [0]

    def in_process(script, argv):
        calls.append(argv)
        if len(calls) == fail_call[0]:
            return 1
        train.main(argv + ["--compile=False"])
        return 0
    scripts_in_process(monkeypatch, prune, in_process)
    run = make_run(tmp_path / "run", tiny_model(5), byte_data)
    common = ["--runs", run, "--k", "1", "--methods", "reverse,magnitude,similarity", "--hellaswag", "none",
              "--eval_batches", "1", "--batch_size", "2", "--device", "cpu", "--heal_tokens", "64",
              "--heal_args", "--eval_iters=1 --eval_batch_size=2"]
    one = prune.main(common + ["--out", str(tmp_path / "one")])[0]
    n = len(calls)
    assert n == len({frozenset(c["layers"]) for c in one["cells"].values()}) >= 2, one["cells"]
    three = prune.main(common + ["--heal_jobs", "3", "--out", str(tmp_path / "three")])[0]
    assert calls[n:] == [[a.replace("/one/", "/three/") for a in c] for c in calls[:n]]
    for name, cell in one["cells"].items():
        a, b = cell["healed"], three["cells"][name]["healed"]
        assert {k: v for k, v in a.items() if k != "run_dir"} == {k: v for k, v in b.items() if k != "run_dir"}
    assert not list((tmp_path / "three" / "healed").glob("*.log"))

    calls.clear()
    fail_call[0] = 2   # the second heal fails while the first runs beside it
    with pytest.raises(UserError, match=r"train.py failed healing (\S+) \(exit status 1; its error is in \1\.log\)"):
        prune.main(common + ["--heal_jobs", "2", "--out", str(tmp_path / "fails")])
    assert len(calls) == 2 and len(list((tmp_path / "fails" / "healed").glob("*/healed.json"))) == 1
    fail_call[0] = 0
    calls.clear()
    again = prune.main(common + ["--heal_jobs", "2", "--out", str(tmp_path / "fails")])[0]
    assert len(calls) == n - 1 and again["cells"].keys() == one["cells"].keys()


def test_start_script_sends_a_childs_output_to_its_log(tmp_path, monkeypatch, capsys):
    (tmp_path / "child.py").write_text("import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)\n")
    monkeypatch.setattr(prune, "SCRIPTS", str(tmp_path))
    log = tmp_path / "child.log"
    assert prune.start_script("child.py", ["--x=1"], str(log)).wait() == 3
    assert log.read_text().split() == ["out", "err"] and f"$ python child.py --x=1 > {log}" in capsys.readouterr().out


def test_an_error_while_healing_stops_the_heals_still_running(tmp_path, byte_data, monkeypatch):
    """The first heal never ends; the second 'ends' without writing its run, so measuring it fails: prune.py
    stops the first child (nothing left holding the device) and the error goes on up."""
    class Forever:
        returncode = None

        def poll(self):
            return self.returncode

        def terminate(self):
            self.returncode = -15

        def wait(self):
            return self.returncode
    children = []
    monkeypatch.setattr(prune, "start_script", lambda script, argv, log=None:
                        children.append(Forever() if not children else Exited(0)) or children[-1])
    run = make_run(tmp_path / "run", tiny_model(5), byte_data)
    with pytest.raises(Exception) as e:
        prune.main(["--runs", run, "--k", "1", "--methods", "reverse,magnitude", "--hellaswag", "none",
                    "--eval_batches", "1", "--batch_size", "2", "--device", "cpu", "--heal_tokens", "64",
                    "--heal_jobs", "2", "--out", str(tmp_path / "p")])
    assert len(children) == 2 and children[0].returncode == -15, e.value
