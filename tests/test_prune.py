"""prune.py against planted answers and hand computations on tiny CPU models: each heuristic
finds the layer it must find, Taylor and Block Influence equal hand-written versions, SLEB equals a
brute-force greedy search, CFP ranks on the steps the checkpoint saw, passthrough pruning equals the
physically smaller model, healing and timing run train.py and bench.py on the saved models, bad
input gives one-line errors."""
import importlib.util
import json
import math
import os
import sys
import warnings
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bench
import prune
import train
from gfa import rundir
from gfa.cli import UserError
from gfa.data import get_batch, load_tokens
from gfa.evaluation import Tokenizer, choice_accuracy, encode_items, ending_logprobs, evaluate, load_multiple_choice
from gfa.theory import accumulated_share, spearman
from helpers import one_line_error, tiny_model, write_jsonl, write_local_task, write_run

N = 4


def zero_branch(model, layer):
    with torch.no_grad():
        model.blocks[layer].attn.proj.weight.zero_()
        model.blocks[layer].ffn.down.weight.zero_()


def make_run(path, model, data_dir, share_min=None, dump=True, iter_num=5):
    """A run directory whose layer share_min gets the smallest gradient norms."""
    names = list(model.param_groups_by_layer())
    rows = 1.0 + np.random.default_rng(0).random((5, len(names)))
    if share_min is not None:
        rows[:, names.index(f"layer.{share_min}")] = 0.1
    return write_run(path, model, data_dir, rows=rows, iter_num=iter_num, dump=dump)


HS_ROWS = [{"ctx": "the cat sat on", "endings": [" a mat.", " the dog ran far", " mat", " cat cat"], "label": 0},
           {"ctx": "a dog", "endings": [" ran", " sat on the mat.", " x", " the"], "label": 1}]


def batches(data_dir, n=2, B=4, T=32, seed=0):
    train = load_tokens(str(data_dir / "train.bin"), 256)
    return [get_batch(train, B, T, s, seed) for s in range(n)]


# ---- planted answers -----------------------------------------------------------------------------
def test_magnitude_picks_zeroed_branch():
    m = tiny_model()
    zero_branch(m, 2)
    for reading in prune.MAGNITUDE_READINGS:
        assert prune.lowest(prune.magnitude_scores(m, reading), 1) == [2]
    # 'sum': sum of |W| over the block; 'row_l2' (the default): numpy's row norms of each matrix, summed
    s = prune.magnitude_scores(m, "sum")
    assert s[1] == pytest.approx(sum(p.abs().sum().item() for p in m.blocks[1].parameters()), rel=1e-6)
    weights = [p.detach().numpy() for p in m.blocks[1].parameters()]
    by_hand = sum(np.linalg.norm(w, axis=1).sum() if w.ndim == 2 else np.abs(w).sum() for w in weights)
    assert prune.magnitude_scores(m)[1] == pytest.approx(by_hand, rel=1e-6)


def test_magnitude_readings_rank_differently_where_the_reduction_matters():
    # layer 0's weights are spread thinly over each row, layer 1's concentrated in one entry per row:
    # sum |W| ranks layer 1 lower, the per-output L2 norms rank layer 0 lower
    m = tiny_model()
    with torch.no_grad():
        for i, p in enumerate(m.blocks[0].parameters()):
            if p.dim() == 2:
                p.fill_(0.1)
        for p in m.blocks[1].parameters():
            if p.dim() == 2:
                p.zero_()
                p[:, 0] = 0.1 * p.size(1) ** 0.75   # L1 of a row: 0.1 * n^0.75 < 0.1 * n; L2: more than 0.1 * sqrt(n)
    by_sum, by_row = prune.magnitude_scores(m, "sum"), prune.magnitude_scores(m, "row_l2")
    assert by_sum[1] < by_sum[0] and by_row[0] < by_row[1]


def test_similarity_picks_zeroed_branch(byte_data):
    m = tiny_model()
    zero_branch(m, 1)
    D = prune.angular_distances(m, batches(byte_data), "cpu", torch.autocast("cpu", enabled=False))
    l, cand = prune.similarity_block(D, 1)
    assert l == 1 and cand[1] < 1e-3 < cand.min(initial=1, where=np.arange(len(cand)) != 1)
    # k=2: the blocks [0,2) and [1,3) contain the identity layer; the one chosen must be one of them
    l2, _ = prune.similarity_block(D, 2)
    assert l2 in (0, 1)
    # distance by hand for one pair on one batch: the last token (default) or all tokens, arccos(cos)/pi
    x, _ = batches(byte_data, n=1)[0]
    h = {}
    hooks = [m.blocks[0].register_forward_pre_hook(lambda mod, a: h.update({0: a[0]}) if 0 not in h else None),
             m.norm_f.register_forward_pre_hook(lambda mod, a: h.update({N: a[0]}))]
    with torch.no_grad():
        m(x)
    for hk in hooks:
        hk.remove()
    angle = torch.arccos(F.cosine_similarity(h[0], h[N], dim=-1).clamp(-1, 1)) / math.pi   # [B, T]
    no_autocast = torch.autocast("cpu", enabled=False)
    assert prune.angular_distances(m, [(x, None)], "cpu", no_autocast)[0, N] == pytest.approx(
        angle[:, -1].mean().item(), rel=1e-4)
    assert prune.angular_distances(m, [(x, None)], "cpu", no_autocast, "all")[0, N] == pytest.approx(
        angle.mean().item(), rel=1e-4)
    assert abs(angle[:, -1].mean() - angle.mean()) > 1e-3   # the two readings differ here


def test_cfp_picks_smallest_share_over_the_checkpoints_steps(tmp_path, byte_data):
    m = tiny_model()
    names = list(m.param_groups_by_layer())
    rows = 1.0 + np.random.default_rng(0).random((8, len(names)))
    rows[:4, names.index("layer.3")] = 0.1    # the checkpoint (iter_num 4) saw layer 3 starve ...
    rows[4:, names.index("layer.3")] = 50.0   # ... the dump, flushed later, ran on
    run = write_run(tmp_path / "run", m, byte_data, rows=rows, iter_num=4)
    share = prune.cfp_share(run, N, rundir.read_checkpoint(run))
    assert prune.lowest(share, 1) == [3] and share.sum() == pytest.approx(1.0)
    os.remove(os.path.join(run, "grad_norms.npz"))   # falls back to the dump inside the checkpoint
    assert np.allclose(prune.cfp_share(run, N, rundir.read_checkpoint(run)), share)


def test_block_influence_picks_zeroed_branch_and_matches_hand(byte_data):
    m = tiny_model()
    zero_branch(m, 2)
    calib = batches(byte_data)
    bi = prune.block_influence(m, calib, "cpu", nullcontext())
    assert prune.lowest(bi, 1) == [2] and bi[2] < 1e-6 < np.delete(bi, 2).min()
    # by hand: block 1's own input and output (a forward hook), 1 - cos averaged over every token
    io = []
    hook = m.blocks[1].register_forward_hook(lambda mod, a, out: io.append((a[0], out)))
    with torch.no_grad():
        for x, _ in calib:
            m(x)
    hook.remove()
    cos = torch.cat([F.cosine_similarity(i.double(), o.double(), dim=-1).flatten() for i, o in io])
    assert bi[1] == pytest.approx(1 - cos.mean().item(), rel=1e-6)


def calibration_loss(m, removed, calib):
    """Mean CE over the calibration batches with `removed` passed through, one batch at a time."""
    m.set_passthrough(removed)
    with torch.no_grad():
        losses = [F.cross_entropy(m(x)[0].flatten(0, 1).double(), y.flatten(), reduction="sum") for x, y in calib]
    m.set_passthrough([])
    return (sum(losses) / sum(y.numel() for _, y in calib)).item()


def trained_with_identity_layers(data_dir, layers, steps=12):
    """A tiny model trained a little with `layers` held at identity (zero branches, frozen): removing one of
    them changes nothing, removing any other layer of the trained model hurts."""
    m = tiny_model().train()
    for l in layers:
        zero_branch(m, l)
        m.blocks[l].requires_grad_(False)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for x, y in batches(data_dir, n=steps, B=8):
        m(x, y)[1].backward()
        opt.step()
        opt.zero_grad()
    return m.eval().requires_grad_(True)


def test_sleb_removes_planted_layers_in_greedy_order(byte_data):
    m = trained_with_identity_layers(byte_data, [1, 3])
    calib = batches(byte_data)
    order, after, first = prune.sleb_order(m, calib, "cpu", nullcontext(), 3)
    assert sorted(order[:2]) == [1, 3] and not m.passthrough   # the identity layers go first; model restored
    removed = []   # brute force: every round, every remaining layer's calibration loss, the lowest removed
    for r in range(3):
        losses = {l: calibration_loss(m, removed + [l], calib) for l in range(N) if l not in removed}
        best = min(losses, key=losses.get)
        assert order[r] == best and after[r] == pytest.approx(losses[best], rel=1e-6)
        if r == 0:
            assert np.allclose(first, [losses[l] for l in range(N)], rtol=1e-6)
        removed.append(best)


def test_anytime_cfp_ranks_on_a_prefix_of_training(tmp_path, byte_data):
    """--cfp_steps 2: layer 1 starved over the first two steps only, so the share over them removes it,
    while the share over every step the checkpoint saw removes layer 3."""
    m = tiny_model()
    names = list(m.param_groups_by_layer())
    rows = 1.0 + np.random.default_rng(0).random((4, len(names)))
    rows[:, names.index("layer.3")] = 0.1
    rows[:2, names.index("layer.1")] = 0.01
    run = write_run(tmp_path / "run", m, byte_data, rows=rows, iter_num=4)
    ckpt = rundir.read_checkpoint(run)
    early = prune.cfp_share(run, N, ckpt, steps=2)
    np.testing.assert_allclose(early, accumulated_share(rows[:2], names), rtol=1e-6)
    assert prune.lowest(early, 1) == [1] and prune.lowest(prune.cfp_share(run, N, ckpt), 1) == [3]
    with pytest.raises(UserError, match="--cfp_steps 5: the checkpoint of .* has seen 4 steps"):
        prune.cfp_share(run, N, ckpt, steps=5)


def test_taylor_matches_hand_computation(byte_data):
    m = tiny_model()
    (x, y), = batches(byte_data, n=1)
    got = prune.taylor_scores(m, [(x, y)], "cpu", torch.autocast("cpu", enabled=False))
    logits, _ = m(x)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
    for i, b in enumerate(m.blocks):
        ps = list(b.parameters())
        gs = torch.autograd.grad(loss, ps, retain_graph=True)
        want = sum((p * g).abs().sum().item() for p, g in zip(ps, gs))
        assert got[i] == pytest.approx(want, rel=1e-5)
    # two batches: the elementwise |W*g| are summed over batches
    two = batches(byte_data, n=2)
    got2 = prune.taylor_scores(m, two, "cpu", torch.autocast("cpu", enabled=False))
    parts = sum(prune.taylor_scores(m, [b], "cpu", torch.autocast("cpu", enabled=False)) for b in two)
    assert np.allclose(got2, parts, rtol=1e-5)
    assert all(p.requires_grad for p in m.parameters())   # flags restored


def test_taylor_restores_the_model_after_an_error(byte_data):
    m = tiny_model().train()
    m.tok_emb.weight.requires_grad_(False)
    (x, y), = batches(byte_data, n=1)
    with pytest.raises(IndexError):   # token ids past the vocabulary: the forward fails mid-way
        prune.taylor_scores(m, [(x, y), (x + 1000, y)], "cpu", torch.autocast("cpu", enabled=False))
    assert m.training and not m.tok_emb.weight.requires_grad
    assert all(p.requires_grad for n, p in m.named_parameters() if n != "tok_emb.weight")


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
    monkeypatch.setattr(prune, "run_script", in_process)
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


@pytest.mark.gpu
def test_calibrated_methods_do_not_wait_on_the_host_per_layer(byte_data):
    """Block Influence syncs once (its result), SLEB once per round, whatever the number of layers."""
    m = tiny_model(n_layer=6).cuda()
    calib = [(x.cuda(), y.cuda()) for x, y in batches(byte_data)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prune.block_influence(m, calib, "cuda", nullcontext())
            n_bi = len(caught)
            prune.sleb_order(m, calib, "cuda", nullcontext(), 2)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = lambda ws: sum("synchroniz" in str(w.message) for w in ws)
    assert syncs(caught[:n_bi]) <= 1 and syncs(caught[n_bi:]) <= 2   # 6 layers: not one per layer
