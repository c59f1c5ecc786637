# Virtual depth (Section 4.4): 8 physical layers, the last four repeated with shared
# parameters. The paper's text says repeats 2,3,3,4 for layers 5-8, but its fan-in numbers
# (18,17,16,15,27,33,24,20) only come out with [1,1,1,1,2,3,3,5] (17 virtual positions), so
# that is what we use (see SPEC.md)
# Scale: one-GPU scale-down of the paper model: every width / 4 (head_dim 32 so the head counts and the taper
# steps keep the paper's ratios), GPT-2 BPE vocabulary, ~50-120M params

out_dir = 'out/small_virtual_depth'
dataset = 'minipile'

n_layer = 8
d_model = 512
head_dim = 32
vocab_size = 50280
block_size = 1024
d_attn0 = 512    # 16 heads
S_d = 32    # 1 head per taper step
F_d = 0
d_ffn0 = 2048
S_f = 0
repeats = [1, 1, 1, 1, 2, 3, 3, 5]

batch_size = 32
max_iters = 5000
warmup_iters = 200
learning_rate = 1e-3
eval_interval = 500
eval_iters = 20
log_interval = 50
dtype = 'bfloat16'
