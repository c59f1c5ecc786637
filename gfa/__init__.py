"""
Shared modules of the CascadeFormer / GFA scripts. Imports run one way:
scripts (train.py, fanin.py, prune.py, bench.py, resnet.py) -> gfa.* -> model.py.

  cli          the configurator (config files + --key=value) and one-line errors for user mistakes
  rundir       the run directory: checkpoint, model config, gradient dump, importance (the contract)
  data         token files, the deterministic training batches, the fixed held-out windows
  prepare      tokenising documents into train.bin / val.bin (the recipes under data/ share it)
  evaluation   held-out perplexity, log-likelihood and multiple-choice (HellaSwag-style) scoring
  lm_eval_adapter  the lm-evaluation-harness model "gfa" (lm-eval optional; python -m gfa.lm_eval_adapter)
  theory       the paper's fan-in formulas (Appendix B.1), Eq. 2's share, Spearman and fits
  training     LR schedule, AdamW grouping, DDP setup, the optimizer step (per-layer gradient
               norms, norm equalisation, clipping), the non-finite guard
  device       device choice, compute dtype (autocast), peak FLOP/s per GPU
  benchmark    models to time, compile-with-progress, CUDA-event timing, the kernel profile (bench.py)
  hf_llama     HF Llama checkpoint folders (config.json + safetensors) in and out (hf.py);
               hf_cascadeformer is the modeling file a tapered export carries (HF transformers, not ours)
"""
