# The one-GPU scale: every width of the paper model / 4 (head_dim 32, so the head counts and the
# taper steps keep the paper's ratios), GPT-2 BPE vocabulary, ~50-120M params. A scale sets the
# widths and the training budget; a variant after it sets the model (its layers and tapers):
#   python train.py config/small.py config/cascade_a2.py          # -> out/small_cascade_a2
# Data: a 100M-token Dolma slice (docs/data.md), or any corpus in GPT-2 tokens via --data_dir=...

dataset = 'dolma_100m'

d_model = 512
head_dim = 32
vocab_size = 50280
block_size = 1024
d_attn0 = 512    # 16 heads
S_d = 32         # 1 head per taper step
d_ffn0 = 2048

batch_size = 32
max_iters = 5000
warmup_iters = 200
learning_rate = 1e-3
eval_interval = 500
eval_iters = 20
log_interval = 50
dtype = 'bfloat16'
