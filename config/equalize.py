# Norm-equalisation intervention (Appendix A.2.2): Vanilla-16L trained with per-layer
# gradient norms rescaled to the largest one; the clip norm is multiplied by equalize_clip_factor
# Scale: the paper's 1.2B scale (Table 3); training hyperparameters are train.py's defaults (Table 5)

out_dir = 'out/equalize'
dataset = 'dolma'

n_layer = 16
d_model = 2048
head_dim = 64
vocab_size = 50280
block_size = 2048
d_attn0 = 2048    # 32 heads
S_d = 128    # 2 heads per taper step
F_d = 0
d_ffn0 = 8192
S_f = 0

equalize = True
equalize_clip_factor = 1.0
