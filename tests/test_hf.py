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
