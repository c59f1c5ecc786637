# Made by taper.py: profile measured (docs/runs/study/small_vanilla_16l_s1), parts both, strength 1
# budget 2,345,103,360 FLOPs/token forward at 2048 tokens (the base with 15 uniform layers); this model 2,344,841,344 (-0.01 %)
# python taper.py config/vanilla_16l.py --profile measured --run docs/runs/study/small_vanilla_16l_s1 --target_layers 15 --out docs/taper/1b/measured.py
# Every width is set here; a scale file before it sets the training budget: python train.py config/small.py docs/taper/1b/measured.py

vocab_size = 50280
block_size = 2048
d_model = 2048
n_layer = 16
head_dim = 64
n_head = [92, 21, 19, 19, 21, 20, 21, 23, 26, 29, 29, 31, 30, 32, 32, 36]
d_ffn = [23424, 5376, 4800, 4928, 5248, 5056, 5440, 5888, 6720, 7296, 7424, 8000, 7744, 8064, 8192, 9152]
d_attn0 = 5888
S_d = 0
F_d = 0
d_ffn0 = 23424
S_f = 0
