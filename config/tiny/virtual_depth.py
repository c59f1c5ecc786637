# Virtual depth (Section 4.4): 8 physical layers, the last four repeated with shared
# parameters. The paper's text says repeats 2,3,3,4 for layers 5-8, but its fan-in numbers
# (18,17,16,15,27,33,24,20) only come out with [1,1,1,1,2,3,3,5] (17 virtual positions), so
# that is what we use (see SPEC.md)
# Scale: CPU scale-down of the paper model: widths / 16 (head_dim 8 keeps the paper's head counts and taper
# ratios), byte-level vocabulary (the embedded Shakespeare dataset), a few M params

out_dir = 'out/tiny_virtual_depth'
dataset = 'shakespeare'

n_layer = 8
d_model = 128
head_dim = 8
vocab_size = 256
block_size = 128
d_attn0 = 128    # 16 heads
S_d = 8    # 1 head per taper step
F_d = 0
d_ffn0 = 512
S_f = 0
repeats = [1, 1, 1, 1, 2, 3, 3, 5]

batch_size = 16
max_iters = 300
warmup_iters = 30
learning_rate = 3e-3
eval_interval = 100
eval_iters = 8
log_interval = 10
