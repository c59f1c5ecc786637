# LayerSkip: Vanilla-16L with deep supervision (an aux LM loss after every block)
# Scale: CPU scale-down of the paper model: widths / 16 (head_dim 8 keeps the paper's head counts and taper
# ratios), byte-level vocabulary (the embedded Shakespeare dataset), a few M params

out_dir = 'out/tiny_layerskip'
dataset = 'shakespeare'

n_layer = 16
d_model = 128
head_dim = 8
vocab_size = 256
block_size = 128
d_attn0 = 128    # 16 heads
S_d = 8    # 1 head per taper step
F_d = 0
d_ffn0 = 512
S_f = 0
deep_supervision = True

batch_size = 16
max_iters = 300
warmup_iters = 30
learning_rate = 3e-3
eval_interval = 100
eval_iters = 8
log_interval = 10
