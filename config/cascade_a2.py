# CascadeFormer-A2 (Table 4): attention taper, F_d = 2 (two heads fewer every 2 layers)
# Scale: the paper's 1.2B scale (Table 3); training hyperparameters are train.py's defaults (Table 5)
# Table 2 parameter count: 1.221 B (both embeddings included)

out_dir = 'out/cascade_a2'
dataset = 'dolma'

n_layer = 16
d_model = 2048
head_dim = 64
vocab_size = 50280
block_size = 2048
d_attn0 = 2048    # 32 heads
S_d = 128    # 2 heads per taper step
F_d = 2
d_ffn0 = 8192
S_f = 0
