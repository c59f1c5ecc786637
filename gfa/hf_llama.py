"""
HF interop: Llama-architecture checkpoint folders (config.json + safetensors weights, as
transformers' save_pretrained writes them) in and out of this codebase. safetensors is the
format both ways (never pickle); the safetensors package is imported only here, when needed.

Import (read_hf, import_run): a LlamaForCausalLM folder becomes a GPT (model.py), fp32, and
import_run writes it as a run directory (gfa/rundir.py: model_config.json and ckpt.pt, without
optimizer or gradient dump) that every script reads and that train.py can start from.
  config.json         hidden_size -> d_model, num_hidden_layers -> n_layer, num_attention_heads ->
                      n_head, num_key_value_heads -> n_kv_head, head_dim, intermediate_size -> d_ffn,
                      vocab_size, max_position_embeddings -> block_size, rms_norm_eps -> norm_eps,
                      rope_theta and rope_scaling (or transformers 5's rope_parameters; linear and
                      llama3 scaling), tie_word_embeddings -> tie_embeddings
  tensors             q/k/v_proj -> the fused qkv (rows: Q, K, V), gate/up_proj -> the fused gate_up,
                      o_proj -> proj, down_proj -> down, the norms, embed_tokens, lm_head
Anything this codebase's model does not compute (biases, another activation, another RoPE scaling,
pickled .bin weights) is refused with a one-line error, never approximated.

Export (write_hf, export_run): the reverse. A uniform model, one whose layers were physically
pruned (prune.py --save_pruned) or passed through (removed here), or a virtual-depth model (each
repeat written out as its own layer), becomes a plain LlamaForCausalLM folder. A tapered model
(per-layer widths) cannot be one: its config.json says model_type "cascadeformer", carries the
per-layer lists, and the folder holds modeling_cascadeformer.py (gfa/hf_cascadeformer.py: HF's
Llama layers, resized per layer), which AutoModelForCausalLM loads with trust_remote_code=True;
import_run reads it back too. The model's tokenizer is not part of a run: the tokenizer files and
token ids of an imported model's source folder (or of the folder export_run is given) go with the
export; for this codebase's GPT-2 BPE runs use the `gpt2` tokenizer.
"""
import json
import os
import shutil
from dataclasses import asdict

import torch

from gfa import rundir
from gfa.cli import UserError
from gfa.training import EXPLODED, check_state
from model import GPT, GPTConfig, ROPE_SCALING, drop_layers, rope_tables

WEIGHTS, INDEX, CONFIG = "model.safetensors", "model.safetensors.index.json", "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json")
REMOTE_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_cascadeformer.py")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# our parameter names inside a block <-> HF Llama's, for the tensors that are not fused
BLOCK_NAMES = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
               "attn.proj.weight": "self_attn.o_proj.weight", "ffn.down.weight": "mlp.down_proj.weight"}


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise UserError("HF checkpoints need the safetensors package: pip install safetensors "
                        "(or pip install -r requirements-hf.txt)") from None
    return safetensors.torch


# ---- config.json ------------------------------------------------------------------------------------
def read_hf_config(folder):
    path = os.path.join(folder, CONFIG)
    if not os.path.isfile(path):
        raise UserError(f"{folder} holds no {CONFIG}: give the folder save_pretrained wrote (config.json and "
                        f"model.safetensors)")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({type(e).__name__}: {e})") from None


def _rope_from_hf(hf, where):
    """(rope_theta, rope_scaling) from transformers 4's rope_theta / rope_scaling or 5's rope_parameters."""
    params = dict(hf.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = dict(hf.get("rope_scaling") or params)
    scaling.pop("rope_theta", None)
    kind = scaling.pop("rope_type", scaling.pop("type", "default"))
    if kind == "default":
        return theta, {}
    if kind not in ROPE_SCALING:
        raise UserError(f"{where}: RoPE scaling {kind!r} is not supported (this codebase computes "
                        f"{', '.join(ROPE_SCALING)} and none)")
    return theta, {"rope_type": kind, **{k: scaling[k] for k in ROPE_SCALING[kind] if k in scaling}}


def config_from_hf(hf, where="config.json", block_size=None):
    """The GPTConfig of an HF Llama config (a dict); block_size: the context to keep (default: the
    model's max_position_embeddings; it sizes the RoPE tables and is the training length)."""
    kind = hf.get("model_type")
    if kind not in ("llama", "cascadeformer"):
        raise UserError(f"{where}: model_type {kind!r}: only Llama-architecture checkpoints (model_type 'llama', or "
                        f"this codebase's tapered 'cascadeformer' export) can be imported")
    bad = [k for k in ("attention_bias", "mlp_bias") if hf.get(k)]
    if bad or hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{where}: " + (f"{', '.join(bad)} set" if bad else f"hidden_act {hf['hidden_act']!r}")
                        + ": this codebase's Llama has no biases and a SiLU-gated FFN")
    N = hf["num_hidden_layers"]
    heads = hf.get("num_attention_heads_per_layer") or [hf["num_attention_heads"]] * N
    kv = hf.get("num_key_value_heads_per_layer") or [hf.get("num_key_value_heads") or h for h in heads]
    if kv != heads and len(set(kv)) > 1:
        raise UserError(f"{where}: the layers share their K/V heads differently; this codebase needs one "
                        f"n_kv_head for every layer (or K/V heads = query heads)")
    theta, scaling = _rope_from_hf(hf, where)
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    return GPTConfig(vocab_size=hf["vocab_size"], block_size=int(block_size or hf["max_position_embeddings"]),
                     d_model=hf["hidden_size"], n_layer=N, head_dim=head_dim,
                     n_head=list(heads), n_kv_head=0 if kv == heads else kv[0],
                     d_ffn=list(hf.get("intermediate_size_per_layer") or [hf["intermediate_size"]] * N),
                     d_attn0=heads[0] * head_dim, S_d=0, d_ffn0=hf["intermediate_size"],   # unused: explicit lists
                     norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
                     tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def is_plain_llama(model):
    """One width for every layer (after exportable(): no repeats or skipped layers left): a plain Llama."""
    return len(set(model.heads)) == 1 and len(set(model.ffns)) == 1


def hf_config(model, source=None):
    """config.json for a model whose repeats are written out and passthrough layers removed
    (exportable()); source: the imported model's own config.json, whose token ids it keeps."""
    c = model.config
    eot = 0 if c.vocab_size == 256 else 50256 if c.vocab_size >= 50257 else None   # this codebase's tokenizers
    src = source or {}
    out = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
           "hidden_size": c.d_model, "num_hidden_layers": c.n_layer, "num_attention_heads": model.heads[0],
           "num_key_value_heads": model.kv_heads[0], "head_dim": c.head_dim, "intermediate_size": model.ffns[0],
           "max_position_embeddings": c.block_size, "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
           "rope_scaling": dict(c.rope_scaling) or None, "tie_word_embeddings": c.tie_embeddings,
           "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
           "bos_token_id": src.get("bos_token_id", eot), "eos_token_id": src.get("eos_token_id", eot),
           "pad_token_id": src.get("pad_token_id"), "use_cache": True}
    if not is_plain_llama(model):
        out.update(architectures=["CascadeFormerForCausalLM"], model_type="cascadeformer",
                   auto_map={"AutoConfig": "modeling_cascadeformer.CascadeFormerConfig",
                             "AutoModelForCausalLM": "modeling_cascadeformer.CascadeFormerForCausalLM"},
                   num_attention_heads_per_layer=list(model.heads), num_key_value_heads_per_layer=list(model.kv_heads),
                   intermediate_size_per_layer=list(model.ffns))
    return out


# ---- tensors ------------------------------------------------------------------------------------------
def state_from_hf(tensors, cfg, where):
    """Our state dict from HF Llama tensors (any dtype; copied into the fp32 model by load_state_dict)."""
    pre = "model."
    sd = {"tok_emb.weight": tensors.pop(pre + "embed_tokens.weight", None),
          "norm_f.weight": tensors.pop(pre + "norm.weight", None)}
    head = tensors.pop("lm_head.weight", None)
    sd["lm_head.weight"] = sd["tok_emb.weight"] if cfg.tie_embeddings else head
    for l in range(cfg.n_layer):
        hf = lambda name: tensors.pop(f"{pre}layers.{l}.{name}", None)
        q, k, v = hf("self_attn.q_proj.weight"), hf("self_attn.k_proj.weight"), hf("self_attn.v_proj.weight")
        gate, up = hf("mlp.gate_proj.weight"), hf("mlp.up_proj.weight")
        sd[f"blocks.{l}.attn.qkv.weight"] = None if None in (q, k, v) else torch.cat([q, k, v])
        sd[f"blocks.{l}.ffn.gate_up.weight"] = None if None in (gate, up) else torch.cat([gate, up])
        sd.update({f"blocks.{l}.{ours}": hf(theirs) for ours, theirs in BLOCK_NAMES.items()})
    missing = [k for k, v in sd.items() if v is None]
    if missing or tensors:
        raise UserError(f"{where}: the weights do not match a Llama of its config.json ("
                        + (f"missing {missing[0]}" if missing else f"unexpected {sorted(tensors)[0]}")
                        + (f" and {len(missing) + len(tensors) - 1} more" if len(missing) + len(tensors) > 1 else "")
                        + ")")
    return sd


def state_to_hf(model, dtype=torch.float32):
    """HF Llama tensors of a model without passthrough layers; a block repeated r times is written
    as r layers (copies), so a virtual-depth model becomes the plain Llama it computes."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    used = {"tok_emb.weight", "norm_f.weight", "lm_head.weight"}
    out = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["norm_f.weight"]}
    if not model.config.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    layer = 0
    for i, (h, kv, r) in enumerate(zip(model.heads, model.kv_heads, model.repeats)):
        hd = model.config.head_dim
        q, k, v = sd[f"blocks.{i}.attn.qkv.weight"].split([h * hd, kv * hd, kv * hd])
        gate, up = sd[f"blocks.{i}.ffn.gate_up.weight"].chunk(2)
        used |= {f"blocks.{i}.{name}" for name in ["attn.qkv.weight", "ffn.gate_up.weight", *BLOCK_NAMES]}
        for _ in range(r):
            pre = f"model.layers.{layer}."
            out.update({pre + "self_attn.q_proj.weight": q, pre + "self_attn.k_proj.weight": k,
                        pre + "self_attn.v_proj.weight": v, pre + "mlp.gate_proj.weight": gate,
                        pre + "mlp.up_proj.weight": up})
            out.update({pre + theirs: sd[f"blocks.{i}.{ours}"] for ours, theirs in BLOCK_NAMES.items()})
            layer += 1
    if set(sd) - used:   # a weight a Llama layer has no place for: the model computes something else
        raise UserError(f"{sorted(set(sd) - used)[0]} has no place in an HF Llama layer: this model cannot be "
                        f"exported as one")
    # safetensors stores each tensor on its own: no shared or strided views
    return {k: t.to("cpu", dtype).contiguous().clone() for k, t in out.items()}


def check_llama_blocks(model):
    """A UserError unless every block is HF Llama's: Pre-LN, norms unscaled, a plain residual (the
    normalisation switches of GPTConfig have no HF Llama counterpart)."""
    c = model.config
    if c.residual_scale != 1.0 or any(b.post_ln or b.norm_scale != 1.0 for b in model.blocks):
        raise UserError(f"the model normalises otherwise than HF Llama (norm_placement={c.norm_placement!r}, "
                        f"residual_scale={c.residual_scale:g}, or per-layer post_ln / norm_scale): an HF Llama layer "
                        f"is Pre-LN with a plain residual; only such models have an HF twin")


def exportable(model):
    """The model as HF Llama layers compute it: passthrough layers physically removed, each repeat
    written out as its own layer (same weights), so config and tensors describe every layer run."""
    check_llama_blocks(model)
    if model.passthrough:
        model = drop_layers(model, sorted(model.passthrough))
    if set(model.repeats) != {1}:
        unrolled = [i for i, r in enumerate(model.repeats) for _ in range(r)]
        cfg = asdict(model.config)
        cfg.update(n_layer=len(unrolled), n_head=[model.heads[i] for i in unrolled], F_d=0,
                   d_ffn=[model.ffns[i] for i in unrolled], S_f=0, repeats=[], ds_alpha=[])
        flat = GPT(GPTConfig(**cfg))
        flat.load_state_dict(state_from_hf(state_to_hf(model), flat.config, "repeats"))
        model = flat
    return model


def read_weights(folder):
    """{name: tensor} of model.safetensors, or of the shards model.safetensors.index.json names."""
    st = _safetensors()
    if os.path.isfile(os.path.join(folder, WEIGHTS)):
        files = [WEIGHTS]
    elif os.path.isfile(os.path.join(folder, INDEX)):
        try:
            with open(os.path.join(folder, INDEX)) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{os.path.join(folder, INDEX)} cannot be read ({type(e).__name__})") from None
    else:
        pickled = [f for f in ("pytorch_model.bin", "pytorch_model.bin.index.json")
                   if os.path.isfile(os.path.join(folder, f))]
        raise UserError(f"{folder} holds no {WEIGHTS}" + (f" (only {pickled[0]}: pickled weights are not read; "
                                                          f"save the model with safe_serialization=True)"
                                                          if pickled else ""))
    tensors = {}
    for name in files:
        try:
            tensors.update(st.load_file(os.path.join(folder, name)))
        except Exception as e:
            raise UserError(f"{os.path.join(folder, name)} cannot be read ({type(e).__name__}: {e})") from None
    return tensors


# ---- import and export --------------------------------------------------------------------------------------
def read_hf(folder, block_size=None):
    """(GPT in fp32, its HF config dict) of an HF Llama folder."""
    hf = read_hf_config(folder)
    try:
        cfg = config_from_hf(hf, os.path.join(folder, CONFIG), block_size)
    except KeyError as e:
        raise UserError(f"{os.path.join(folder, CONFIG)} lacks {e.args[0]}: not a Llama config") from None
    sd = state_from_hf(read_weights(folder), cfg, folder)
    check_state(sd, folder, fix="these weights are unusable (a damaged or diverged checkpoint): nothing imported")
    with torch.device("meta"):   # no random init of weights about to be replaced
        model = GPT(cfg)
    model.to_empty(device="cpu")
    if cfg.tie_embeddings:   # to_empty gives each module its own tensor
        model.lm_head.weight = model.tok_emb.weight
    model.load_state_dict(sd)
    model.rope_cos, model.rope_sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta, cfg.rope_scaling)
    return model, hf


def import_run(folder, run, block_size=None, overwrite=False):
    """An HF Llama folder as a run directory (model_config.json, ckpt.pt with iter_num 0 and no
    optimizer: train.py starts a new run from it). Returns the model."""
    model, hf = read_hf(folder, block_size)
    with rundir.RunStart() as start:   # one writer; a failed import leaves nothing behind
        start.claim(run)
        rundir.start_run(run, "gpt", asdict(model.config), overwrite)
        rundir.save_gpt(run, model, {}, 0, imported_from={"path": os.path.abspath(folder), "hf_config": hf})
        start.started()
    return model


def source_tokenizer(ckpt, given=None):
    """The HF folder whose tokenizer.json a model's text goes through: given (a --tokenizer option), else
    the folder an imported model came from when it still holds one; else None (this codebase's own)."""
    path = given or (ckpt.get("imported_from") or {}).get("path")
    return path if path and (given or os.path.isfile(os.path.join(path, "tokenizer.json"))) else None


def write_hf(model, folder, dtype="float32", source=None):
    """model as an HF folder (config.json, model.safetensors; modeling_cascadeformer.py when tapered;
    the tokenizer files of the source folder an imported model came from). Written beside the target
    and renamed into place: a failure leaves no half folder. Returns the HF config written."""
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        raise UserError(f"{folder} already exists and is not empty: give a new folder")
    model = exportable(model)
    limit = min(EXPLODED, torch.finfo(DTYPES[dtype]).max)   # float16: 65504; a larger weight would be written as inf
    check_state(model.state_dict(), f"exporting as {dtype}", limit, fix="nothing written" + (
        "; export as bfloat16 or float32, which hold it" if dtype == "float16" else ""))
    src_cfg = (source or {}).get("hf_config")
    config = hf_config(model, src_cfg) | {"torch_dtype": dtype}
    tensors = state_to_hf(model, DTYPES[dtype])
    st = _safetensors()
    tmp = f"{os.path.abspath(folder).rstrip(os.sep)}.tmp{os.getpid()}"
    try:
        os.makedirs(tmp)
        st.save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(config, f, indent=2)
        if not is_plain_llama(model):
            shutil.copyfile(REMOTE_CODE, os.path.join(tmp, "modeling_cascadeformer.py"))
        src = (source or {}).get("path")
        for name in TOKENIZER_FILES if src and os.path.isdir(src) else ():
            if os.path.isfile(os.path.join(src, name)):
                shutil.copyfile(os.path.join(src, name), os.path.join(tmp, name))
        if os.path.isdir(folder):
            os.rmdir(folder)   # empty (checked above)
        os.replace(tmp, folder)
    except OSError as e:
        raise rundir.cannot_write(folder, e) from None
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return config


def export_run(run, folder, dtype="float32", tokenizer=None):
    """A run directory's model as an HF folder (write_hf). tokenizer: the HF folder whose tokenizer files
    and token ids go with it (default: the folder an imported run came from). Returns (config, model)."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    if tokenizer and not os.path.isdir(tokenizer):
        raise UserError(f"--tokenizer {tokenizer} is not a folder: give the HF model folder the run came from")
    model, ckpt = rundir.load_gpt(run)
    source = ({"path": tokenizer, "hf_config": read_hf_config(tokenizer) if os.path.isfile(os.path.join(
        tokenizer, CONFIG)) else {}} if tokenizer else ckpt.get("imported_from"))
    return write_hf(model, folder, dtype, source), model
