"""hf.py, the command line of gfa/hf_llama.py: import then export keeps every tensor and the config, the
imported run is a run directory the other scripts read, and what cannot be converted is a one-line
error that leaves nothing half-written. Needs safetensors only (transformers: tests/gfa/test_hf.py)."""
import json
import os

import numpy as np
import pytest
import torch

import hf
import prune
from gfa import hf_llama as convert
from gfa import rundir
from gfa.cli import UserError
from helpers import one_line_error, tiny_model

st = pytest.importorskip("safetensors.torch")

LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0,
          "original_max_position_embeddings": 16}


def test_import_export_round_trip(tmp_path, byte_data, monkeypatch):
    model = tiny_model(3, n_kv_head=2, tie_embeddings=True, rope_scaling=LLAMA3, rope_theta=500.0)
    convert.write_hf(model, str(tmp_path / "a"))
    (tmp_path / "a" / "tokenizer.json").write_text("{}")   # the source's tokenizer: found, never parsed here
    run, b = str(tmp_path / "run"), str(tmp_path / "b")
    hf.main(["import", str(tmp_path / "a"), run])
    hf.main(["export", run, b])
    first, second = (st.load_file(os.path.join(f, "model.safetensors")) for f in (tmp_path / "a", b))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert "lm_head.weight" not in first   # tied: stored once, as HF does
    read_config = lambda f: json.loads(open(os.path.join(f, "config.json")).read())
    assert read_config(tmp_path / "a") == read_config(b)
    loaded, _ = rundir.load_gpt(run)
    x = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=0, atol=0)
    assert os.path.isfile(os.path.join(b, "tokenizer.json"))   # an imported run's export carries its tokenizer
    # the other scripts read the run: prune.py's early exit on the imported model, its text through the
    # source folder's tokenizer (recorded here; the bytes encoder stands in for it), or --tokenizer's
    used = []
    byte_tokenizer = prune.Tokenizer(256)
    monkeypatch.setattr(prune, "Tokenizer", lambda vocab, hf_folder=None: used.append(hf_folder) or byte_tokenizer)
    hs = tmp_path / "hs.jsonl"
    hs.write_text(json.dumps({"ctx": "the cat", "endings": [" sat", " ran", " a", " mat"], "label": 0}) + "\n")
    common = ["--runs", run, "--exits", "--data", str(byte_data), "--hellaswag", str(hs), "--eval_batches", "1",
              "--batch_size", "2", "--device", "cpu", "--out", str(tmp_path / "exits")]
    res = prune.main(common)
    prune.main(common + ["--tokenizer", str(tmp_path / "other")])
    assert len(res[0]["exits"]) == 4 and used == [str(tmp_path / "a"), str(tmp_path / "other")]
    # a run that was not imported (a pruned or continued one) takes the tokenizer and token ids from --tokenizer
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text('{"planted": 1}')
    (tmp_path / "tok" / "config.json").write_text(json.dumps({"eos_token_id": 9, "bos_token_id": 8}))
    plain = str(tmp_path / "plain")
    rundir.save_gpt(plain, model, {}, 0)
    config = hf.main(["export", plain, str(tmp_path / "c"), "--tokenizer", str(tmp_path / "tok")])
    assert (config["bos_token_id"], config["eos_token_id"]) == (8, 9)
    assert (tmp_path / "c" / "tokenizer.json").read_text() == '{"planted": 1}'


def write_folder(path, config=None, tensors=None):
    """An HF folder as save_pretrained writes it, from this codebase's export, with config.json edits."""
    convert.write_hf(tiny_model(), str(path))
    if config:
        c = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**c, **config}))
    if tensors:
        st.save_file(tensors(st.load_file(path / "model.safetensors")), path / "model.safetensors")
    return str(path)


def test_bad_inputs(tmp_path, capsys):
    err = lambda *argv: one_line_error(hf.main, argv, capsys)
    run = str(tmp_path / "run")
    assert "not a folder" in err("import", tmp_path / "nowhere", run)
    (tmp_path / "empty").mkdir()
    assert "holds no config.json" in err("import", tmp_path / "empty", run)
    cases = {"gpt2": dict(model_type="gpt2"), "bias": dict(attention_bias=True), "gelu": dict(hidden_act="gelu"),
             "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 2.0})}
    words = {"gpt2": "model_type 'gpt2'", "bias": "attention_bias set", "gelu": "hidden_act 'gelu'",
             "yarn": "RoPE scaling 'yarn' is not supported"}
    for name, config in cases.items():
        assert words[name] in err("import", write_folder(tmp_path / name, config), run)
    missing = write_folder(tmp_path / "missing",
                           tensors=lambda t: {k: v for k, v in t.items() if "layers.2.mlp.up" not in k})
    assert "missing blocks.2.ffn.gate_up.weight" in err("import", missing, run)
    pickled = write_folder(tmp_path / "pickled")
    os.rename(os.path.join(pickled, "model.safetensors"), os.path.join(pickled, "pytorch_model.bin"))
    assert "pickled weights are not read" in err("import", pickled, run)
    assert not os.path.exists(run)   # nothing was written by any of them
    good = write_folder(tmp_path / "good")
    hf.main(["import", good, run])
    assert "already holds a run" in err("import", good, run)
    assert "not empty" in err("export", run, good)
    assert "--dtype" in err("export", run, tmp_path / "x", "--dtype", "int8") and not os.path.exists(tmp_path / "x")
    odd = tiny_model()   # a block weight HF's Llama layer lacks (a norm placement other than Pre-LN, say)
    odd.blocks[1].register_parameter("extra", torch.nn.Parameter(torch.ones(2)))
    with pytest.raises(UserError, match="blocks.1.extra has no place in an HF Llama layer"):
        convert.write_hf(odd, str(tmp_path / "odd"))
    assert not os.path.exists(tmp_path / "odd")
    for over in (dict(norm_placement="mix", mix_post_fraction=0.5), dict(norm_placement="scaled"),
                 dict(residual_scale=0.5)):   # the same weights, computed otherwise than an HF Llama layer
        mixed = str(tmp_path / f"mixed_{over['norm_placement'] if 'norm_placement' in over else 'residual'}")
        rundir.save_gpt(mixed, tiny_model(**over), {}, 0)
        assert "normalises otherwise than HF Llama" in err("export", mixed, tmp_path / "mixed_hf")
    assert not os.path.exists(tmp_path / "mixed_hf")


def test_open_weights_continued_training_then_cfp(tmp_path, byte_data):
    """The paper's limitation lifted for open weights: an HF Llama folder (grouped-query, tied) is imported,
    trained on with the gradient dump on (train.py --init_from: its weights and architecture, a fresh
    optimizer), and CFP ranks its layers from that dump: the layer it removes is the one with the lowest
    Eq. 2 share of the continued run, read here from the dump itself."""
    import train
    convert.write_hf(tiny_model(5, n_kv_head=2, tie_embeddings=True), str(tmp_path / "hf"))
    imported, cont = str(tmp_path / "imported"), str(tmp_path / "cont")
    hf.main(["import", str(tmp_path / "hf"), imported])
    train.main([f"--init_from={imported}", f"--out_dir={cont}", f"--data_dir={byte_data}", "--max_iters=4",
                "--batch_size=4", "--warmup_iters=1", "--eval_iters=1", "--eval_batch_size=2", "--eval_interval=1000",
                "--log_interval=1", "--device=cpu"])
    ckpt = rundir.read_checkpoint(cont)
    assert ckpt["initialised_from"]["path"] == os.path.abspath(imported) and ckpt["iter_num"] == 4
    _, config = rundir.read_model_config(cont)
    assert (config["n_kv_head"], config["tie_embeddings"]) == (2, True)   # the imported architecture
    dump = rundir.read_grad_dump(cont, before_step=4)
    layer_share = [s for n, s in zip(dump["layer_names"], dump["share"]) if n.startswith("layer.")]
    res = prune.main(["--runs", cont, "--k", "1", "--methods", "cfp,block_influence", "--hellaswag", "none",
                      "--eval_batches", "1", "--batch_size", "2", "--calib_batches", "1", "--device", "cpu",
                      "--out", str(tmp_path / "prune")])
    assert res[0]["cells"]["cfp/1"]["layers"] == [int(np.argmin(layer_share))]


def test_cfp_on_an_open_weight_model_end_to_end(tmp_path, byte_data, monkeypatch):
    """A Llama-format checkpoint (a random transformers LlamaForCausalLM, grouped-query, with a tokenizer) is
    imported, CFP scores its layers from gradients over a calibration set (cfp_calib), the layer is removed,
    the model healed (partial), exported, loaded by transformers with the same logits, and scored by lm-eval's
    through the gfa adapter on a local task with transformers' own log-likelihoods. ReplaceMe's
    model (its map folded into the down projection) exports as a plain Llama too."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    pytest.importorskip("lm_eval")
    import train
    from lm_eval.api.registry import get_model
    from lm_eval.evaluator import evaluate

    from gfa import lm_eval_adapter
    from helpers import scripts_in_process, write_jsonl, write_local_task, write_word_level_tokenizer
    torch.manual_seed(0)
    src = tmp_path / "llama"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).save_pretrained(src)
    write_word_level_tokenizer(str(src))
    run = str(tmp_path / "imported")
    hf.main(["import", str(src), run])
    def heal_in_process(script, argv):
        train.main(argv + ["--compile=False"])
        return 0
    scripts_in_process(monkeypatch, prune, heal_in_process)
    common = ["--runs", run, "--data", str(byte_data), "--k", "1", "--hellaswag", "none", "--eval_batches", "1",
              "--batch_size", "2", "--calib_batches", "2", "--device", "cpu"]
    res = prune.main(common + ["--methods", "cfp_calib", "--heal_tokens", "1024", "--heal_mode", "partial",
                               "--heal_last_layers", "1", "--keep_models", "--out", str(tmp_path / "p")])[0]
    share = res["scores"]["cfp_calib"]
    assert res["cells"]["cfp_calib/1"]["layers"] == [int(np.argmin(share))] and sum(share) == pytest.approx(1)
    healed = res["cells"]["cfp_calib/1"]["healed_partial"]["run_dir"]
    out = str(tmp_path / "export")
    hf.main(["export", healed, out, "--tokenizer", str(src)])
    ours, _ = rundir.load_gpt(healed)
    theirs = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours.eval()(x)[0], rtol=1e-4, atol=1e-5)
    assert theirs.config.num_hidden_layers == 3
    rows = [{"ctx": "to be", "endings": [" or not", " be to"], "label": 0},
            {"ctx": "not to", "endings": [" be", " or be or"], "label": 0}]
    tasks = lm_eval_adapter.load_tasks(["tiny_mc"], write_local_task(tmp_path / "tasks", write_jsonl(
        tmp_path / "mc.jsonl", rows)))
    # lm-eval through the gfa adapter on the export read back (lm-eval's own HF model needs accelerate, not a
    # dependency here), against transformers' log-likelihoods of the same tokens computed here by hand
    back = str(tmp_path / "back")
    hf.main(["import", out, back])
    lm = get_model("gfa").create_from_arg_string(f"ckpt={back}/ckpt.pt,device=cpu")
    r = evaluate(lm, tasks, log_samples=True, bootstrap_iters=0)
    scored = [x[0] for s in sorted(r["samples"]["tiny_mc"], key=lambda s: s["doc_id"]) for x in s["filtered_resps"]]
    ids = {"to": 2, "be": 3, "or": 4, "not": 5}
    by_hand = []
    for row in rows:
        for e in row["endings"]:
            c, t = [ids[w] for w in row["ctx"].split()], [ids[w] for w in e.split()]
            with torch.no_grad():
                lp = torch.log_softmax(theirs(torch.tensor([c + t])).logits[0, :-1].double(), -1)
            by_hand.append(float(sum(lp[len(c) - 1 + i, tok] for i, tok in enumerate(t))))
    np.testing.assert_allclose(scored, by_hand, atol=1e-4)
    assert r["results"]["tiny_mc"]["acc,none"] in (0.0, 0.5, 1.0)
    # ReplaceMe: no new module, so the saved model exports and loads as a plain Llama
    prune.main(common + ["--methods", "replaceme", "--save_pruned", str(tmp_path / "rm"), "--out", str(tmp_path / "q")])
    hf.main(["export", str(tmp_path / "rm"), str(tmp_path / "rm_hf")])
    rm, _ = rundir.load_gpt(str(tmp_path / "rm"))
    with torch.no_grad():
        torch.testing.assert_close(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "rm_hf").eval()(x).logits,
                                   rm.eval()(x)[0], rtol=1e-4, atol=1e-5)
