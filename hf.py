"""
HF interop: Llama-architecture checkpoints (the folders transformers' save_pretrained writes) in and out.

    python hf.py import path/to/SmolLM2-135M out/smollm2       # an HF Llama folder -> a run directory
    python hf.py export out/s1_cfp4 hf/s1_cfp4                  # a run (pruned, tapered, ...) -> an HF folder
    python hf.py export out/s1_cfp4 hf/s1_cfp4_bf16 --dtype bfloat16

import: config.json + model.safetensors (or its shards) become a run directory (model_config.json,
ckpt.pt at step 0 without optimizer state) that every script reads: fanin.py, prune.py, bench.py,
and train.py --init_from=<run>/ckpt.pt for continued training with the gradient dump (then CFP).
Grouped-query attention, tied embeddings and linear / llama3 RoPE scaling are imported as such.

export: config.json + model.safetensors that LlamaForCausalLM.from_pretrained loads with the same
logits. Passthrough layers are removed and repeated layers written out. A tapered model (per-layer
widths) is exported with a per-layer config and modeling_cascadeformer.py, loaded by
AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True). gfa/hf_llama.py has the details.
"""
import os

from gfa.cli import ArgumentParser, UserError, cli
from gfa.hf_llama import DTYPES, export_run, import_run


def main(argv):
    p = ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("action", choices=["import", "export"], help="import: HF folder -> run; export: run -> HF folder")
    p.add_argument("source", help="import: the HF folder (config.json, model.safetensors); export: the run directory")
    p.add_argument("dest", help="import: the run directory to write; export: a new folder")
    p.add_argument("--block_size", type=int, default=0, help="import: the context kept (RoPE tables, training "
                   "length); 0 = the model's max_position_embeddings")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="export: the weights' dtype")
    p.add_argument("--overwrite", action="store_true", help="import: replace a run already in dest")
    p.add_argument("--tokenizer", default=None, help="export: the HF folder whose tokenizer files and token ids go "
                   "with the model (default: the folder an imported run came from)")
    args = p.parse_args(argv)
    if args.block_size < 0:
        raise UserError("--block_size must be >= 1 (or 0: the model's own context)")
    if args.action == "import":
        if not os.path.isdir(args.source):
            raise UserError(f"{args.source} is not a folder: give the folder save_pretrained wrote")
        model = import_run(args.source, args.dest, args.block_size or None, args.overwrite)
        c = model.config
        print(f"imported {args.source} into {args.dest}: {c.n_layer} layers, d_model {c.d_model}, "
              f"{model.num_params() / 1e6:,.1f}M params, vocab {c.vocab_size}, context {c.block_size}"
              + (f", {c.n_kv_head} K/V heads" if c.n_kv_head else "")
              + (", tied embeddings" if c.tie_embeddings else ""))
        return model
    config, model = export_run(args.source, args.dest, args.dtype, args.tokenizer)
    loader = ("AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True) (per-layer widths)"
              if config["model_type"] == "cascadeformer" else "LlamaForCausalLM.from_pretrained(folder)")
    print(f"exported {args.source} to {args.dest} ({config['num_hidden_layers']} layers, {args.dtype}); load it with "
          f"{loader}")
    return config


if __name__ == "__main__":
    cli(main)
