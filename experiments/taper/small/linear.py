# Made by taper.py: profile linear, parts ffn
# budget 193,059,840 FLOPs/token forward at 1024 tokens (the base with 15 uniform layers); this model 192,864,256 (-0.10 %)
# python taper.py config/small.py config/vanilla_16l.py --profile linear --target_layers 15 --out experiments/taper/small/linear.py
# Every width is set here; a scale file before it sets the training budget: python train.py config/small.py experiments/taper/small/linear.py

vocab_size = 50280
block_size = 1024
d_model = 512
n_layer = 16
head_dim = 32
n_head = [16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16]
d_ffn = [2048, 2048, 1984, 1984, 1920, 1920, 1920, 1856, 1856, 1792, 1792, 1728, 1728, 1728, 1664, 1664]
d_attn0 = 512
S_d = 0
F_d = 0
d_ffn0 = 2048
S_f = 0
