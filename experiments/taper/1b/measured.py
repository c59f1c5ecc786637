# Made by taper.py: profile measured (experiments/study/runs/small_vanilla_16l_keep_s1), parts both, strength 1
# budget 2,345,103,360 FLOPs/token forward at 2048 tokens (the base with 15 uniform layers); this model 2,345,103,360 (+0.00 %)
# python taper.py config/vanilla_16l.py --profile measured --run experiments/study/runs/small_vanilla_16l_keep_s1 --target_layers 15 --out experiments/taper/1b/measured.py
# Every width is set here; a scale file before it sets the training budget: python train.py config/small.py experiments/taper/1b/measured.py

vocab_size = 50280
block_size = 2048
d_model = 2048
n_layer = 16
head_dim = 64
n_head = [104, 23, 18, 19, 22, 19, 21, 22, 27, 30, 30, 31, 29, 30, 29, 26]
d_ffn = [20160, 3968, 3648, 4160, 4480, 4992, 5568, 5888, 6528, 7168, 7680, 8512, 8768, 9344, 10048, 11968]
d_attn0 = 6656
S_d = 0
F_d = 0
d_ffn0 = 20160
S_f = 0
