# CascadeFormer-F1 (Table 4): FFN taper, S_f = d_ffn0 / 64 per layer (the paper: 128,
# FFN 8192 down to 6272)
# A variant: alone it is the paper's 1.2B model (Table 3; train.py's defaults are Table 5);
# after a scale file it is that scale's model: python train.py config/small.py config/cascade_f1.py
# Table 2 parameter count at the paper's scale: 1.185 B (both embeddings included)

n_layer = 16
S_f = d_ffn0 // 64
