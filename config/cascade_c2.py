# CascadeFormer-C2 (Table 4): A2 + F2
# A variant: alone it is the paper's 1.2B model (Table 3; train.py's defaults are Table 5);
# after a scale file it is that scale's model: python train.py config/small.py config/cascade_c2.py
# Table 2 parameter count at the paper's scale: 1.032 B (both embeddings included)

n_layer = 16
F_d = 2
S_f = d_ffn0 // 32
