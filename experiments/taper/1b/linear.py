# Made by taper.py: profile linear, parts ffn
# budget 2,345,103,360 FLOPs/token forward at 2048 tokens (the base with 15 uniform layers); this model 2,343,010,304 (-0.09 %)
# python taper.py config/vanilla_16l.py --profile linear --target_layers 15 --out experiments/taper/1b/linear.py
# Every width is set here; a scale file before it sets the training budget: python train.py config/small.py experiments/taper/1b/linear.py

vocab_size = 50280
block_size = 2048
d_model = 2048
n_layer = 16
head_dim = 64
n_head = [32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32]
d_ffn = [8192, 8064, 8000, 7872, 7808, 7680, 7616, 7488, 7424, 7296, 7232, 7104, 7040, 6912, 6848, 6720]
d_attn0 = 2048
S_d = 0
F_d = 0
d_ffn0 = 8192
S_f = 0
