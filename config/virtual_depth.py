# Virtual depth (Section 4.4): 8 physical layers, the last four repeated with shared
# parameters. The paper's text says repeats 2,3,3,4 for layers 5-8, but its fan-in numbers
# (18,17,16,15,27,33,24,20) only come out with [1,1,1,1,2,3,3,5] (17 virtual positions), so
# that is what we use (see SPEC.md)
# Scale: the paper's 1.2B scale (Table 3); training hyperparameters are train.py's defaults (Table 5)

out_dir = 'out/virtual_depth'
dataset = 'dolma'

n_layer = 8
d_model = 2048
head_dim = 64
vocab_size = 50280
block_size = 2048
d_attn0 = 2048    # 32 heads
S_d = 128    # 2 heads per taper step
F_d = 0
d_ffn0 = 8192
S_f = 0
repeats = [1, 1, 1, 1, 2, 3, 3, 5]
