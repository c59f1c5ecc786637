# Made by taper.py: profile narrow_middle, parts both, strength 1
# budget 2,345,103,360 FLOPs/token forward at 2048 tokens (the base with 15 uniform layers); this model 2,345,103,360 (+0.00 %)
# python taper.py config/vanilla_16l.py --profile narrow_middle --target_layers 15 --out experiments/taper/1b/narrow_middle.py
# Every width is set here; a scale file before it sets the training budget: python train.py config/small.py experiments/taper/1b/narrow_middle.py

vocab_size = 50280
block_size = 2048
d_model = 2048
n_layer = 16
head_dim = 64
n_head = [39, 37, 34, 31, 29, 26, 23, 21, 21, 23, 26, 29, 31, 34, 37, 39]
d_ffn = [10048, 9344, 8704, 8000, 7360, 6656, 6016, 5312, 5312, 6016, 6656, 7360, 8000, 8704, 9344, 10048]
d_attn0 = 2496
S_d = 0
F_d = 0
d_ffn0 = 10048
S_f = 0
