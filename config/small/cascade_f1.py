# CascadeFormer-F1 (Table 4): FFN taper, S_f = 128 at full scale
# Scale: one-GPU scale-down of the paper model: every width / 4 (head_dim 32 so the head counts and the taper
# steps keep the paper's ratios), GPT-2 BPE vocabulary, ~50-120M params

out_dir = 'out/small_cascade_f1'
dataset = 'minipile'

n_layer = 16
d_model = 512
head_dim = 32
vocab_size = 50280
block_size = 1024
d_attn0 = 512    # 16 heads
S_d = 32    # 1 head per taper step
F_d = 0
d_ffn0 = 2048
S_f = 32

batch_size = 32
max_iters = 5000
warmup_iters = 200
learning_rate = 1e-3
eval_interval = 500
eval_iters = 20
log_interval = 50
dtype = 'bfloat16'
