"""gfa/hf_llama.py against HF transformers itself, a second implementation: randomly initialised
LlamaForCausalLMs saved with save_pretrained import with the same logits (float32, tight
tolerance), and exported models (uniform, pruned, passed through, repeated, tied, grouped-query,
RoPE-scaled) load with from_pretrained with the same logits; a tapered export loads through the
modeling file written beside it. transformers and safetensors are optional (requirements-hf.txt;
CI installs them)."""
import importlib.util
import json

import pytest
import torch

from gfa import hf_llama, rundir
from model import GPT, GPTConfig, drop_layers

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

# all three branches of Llama 3.1's scaling at head_dim 8: wavelengths 6.3 (kept, < 64/4), 35 (smoothed)
# and 199, 1117 (divided, > 64/1); the inputs run past position 64
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
BASE = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5)


def randomise(model, seed):
    """Weights (norm gains too) large enough that a wrong head, layer or RoPE order shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


def hf_logits(model, x):
    with torch.no_grad():
        return model(x).logits


def ours_logits(model, x):
    with torch.no_grad():
        return model.eval()(x)[0]


def to_transformers4_config(folder):
    """Rewrite config.json the way transformers 4 wrote it: rope_theta and rope_scaling (legacy 'type')."""
    path = folder / "config.json"
    c = json.loads(path.read_text())
    if "rope_parameters" not in c:   # transformers 4 wrote it
        return
    params = c.pop("rope_parameters") or {}
    c["rope_theta"] = params.pop("rope_theta", c.get("rope_theta", 10000.0))
    kind = params.pop("rope_type", "default")
    c["rope_scaling"] = None if kind == "default" else {"type": kind, **params}
    path.write_text(json.dumps(c))


@pytest.mark.parametrize("over, shard, legacy", [
    (dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000.0, rope_scaling=LLAMA3), False, False),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), True, True)])
def test_import_equals_hf_llama(tmp_path, over, shard, legacy):
    ref = randomise(transformers.LlamaForCausalLM(transformers.LlamaConfig(**(BASE | over))), 0)
    ref.save_pretrained(tmp_path / "hf", max_shard_size="20KB" if shard else "10GB")
    if shard:
        assert (tmp_path / "hf" / hf_llama.INDEX).is_file()
    if legacy:
        to_transformers4_config(tmp_path / "hf")
    model, _ = hf_llama.read_hf(str(tmp_path / "hf"))
    assert model.config.n_kv_head == (2 if "num_key_value_heads" in over else 0)
    assert model.config.tie_embeddings == over.get("tie_word_embeddings", False)
    assert model.config.rope_scaling["rope_type"] == over["rope_scaling"]["rope_type"]
    x = torch.randint(0, 61, (2, 100), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours_logits(model, x), hf_logits(ref, x), rtol=1e-5, atol=1e-5)
    # and back out: the exported folder loads in transformers with the same logits
    hf_llama.write_hf(model, str(tmp_path / "out"))
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(hf_logits(back, x), hf_logits(ref, x), rtol=1e-5, atol=1e-5)


def tiny_gpt(seed=0, **over):
    cfg = dict(vocab_size=61, block_size=64, d_model=32, n_layer=4, head_dim=8, d_attn0=32, S_d=8, d_ffn0=48) | over
    return randomise(GPT(GPTConfig(**cfg)), seed)


def test_export_uniform_pruned_passed_through_and_repeated(tmp_path):
    """What leaves as a plain Llama: a uniform model, one pruned physically, one with passthrough
    layers (removed on export), a virtual-depth model (each repeat written out as a layer)."""
    x = torch.randint(0, 61, (2, 30), generator=torch.Generator().manual_seed(2))
    base = tiny_gpt()
    skipped = tiny_gpt(passthrough=[1, 2])
    models = {"uniform": base, "pruned": drop_layers(base, [0, 2]), "passthrough": skipped,
              "repeats": tiny_gpt(repeats=[1, 2, 1, 3])}
    for name, model in models.items():
        config = hf_llama.write_hf(model, str(tmp_path / name))
        assert config["model_type"] == "llama" and config["num_hidden_layers"] == {
            "uniform": 4, "pruned": 2, "passthrough": 2, "repeats": 7}[name]
        loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / name).eval()
        torch.testing.assert_close(hf_logits(loaded, x), ours_logits(model, x), rtol=1e-5, atol=1e-5)


def test_tapered_export_loads_through_its_modeling_file(tmp_path):
    model = tiny_gpt(n_head=[4, 4, 2, 2], d_ffn=[48, 40, 32, 16], S_d=0, n_kv_head=2, tie_embeddings=True)
    config = hf_llama.write_hf(model, str(tmp_path / "tapered"), dtype="float32")
    assert config["model_type"] == "cascadeformer" and config["num_attention_heads_per_layer"] == [4, 4, 2, 2]
    spec = importlib.util.spec_from_file_location("modeling_cascadeformer",
                                                  tmp_path / "tapered" / "modeling_cascadeformer.py")
    code = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(code)
    assert {v.split(".")[1] for v in config["auto_map"].values()} <= set(vars(code))   # trust_remote_code finds them
    loaded = code.CascadeFormerForCausalLM.from_pretrained(tmp_path / "tapered").eval()
    x = torch.randint(0, 61, (2, 30), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(hf_logits(loaded, x), ours_logits(model, x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():   # HF's own generation (its KV cache, per-layer K/V widths) agrees too
        assert torch.equal(loaded.generate(x[:1, :6], max_new_tokens=8, do_sample=False),
                           model.generate(x[:1, :6], 8, temperature=0))
    back, _ = hf_llama.read_hf(str(tmp_path / "tapered"))   # and this codebase reads it back as it was
    assert back.config.n_head == [4, 4, 2, 2] and back.config.n_kv_head == 2 and back.config.tie_embeddings
    torch.testing.assert_close(ours_logits(back, x), ours_logits(model, x), rtol=0, atol=0)


def test_import_run_is_a_run_directory(tmp_path):
    """import_run writes a standard run (gfa.rundir: step 0, no optimizer, no dump) with the HF model's
    logits; its export keeps the source's token ids and copies its tokenizer files."""
    ref = randomise(transformers.LlamaForCausalLM(transformers.LlamaConfig(**(BASE | dict(
        num_key_value_heads=1, bos_token_id=5, eos_token_id=7)))), 4)
    ref.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text('{"planted": true}')
    hf_llama.import_run(str(tmp_path / "hf"), str(tmp_path / "run"), block_size=48)
    model, ckpt = rundir.load_gpt(str(tmp_path / "run"))
    assert ckpt["iter_num"] == 0 and "optimizer" not in ckpt and model.config.block_size == 48
    assert ckpt["imported_from"]["hf_config"]["eos_token_id"] == 7
    x = torch.randint(0, 61, (1, 48), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours_logits(model, x), hf_logits(ref, x), rtol=1e-5, atol=1e-5)
    config, _ = hf_llama.export_run(str(tmp_path / "run"), str(tmp_path / "out"), "bfloat16")
    assert (config["bos_token_id"], config["eos_token_id"]) == (5, 7)
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"planted": true}'
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32) \
        if int(transformers.__version__.split(".")[0]) >= 5 else \
        transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", torch_dtype=torch.float32)
    from safetensors.torch import load_file
    assert load_file(str(tmp_path / "out" / "model.safetensors"))["model.embed_tokens.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(loaded.model.embed_tokens.weight, model.tok_emb.weight.bfloat16().float())
