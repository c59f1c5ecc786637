# Made by taper.py: profile increasing, parts both, strength 1
# budget 2,345,103,360 FLOPs/token forward at 2048 tokens (the base with 15 uniform layers); this model 2,345,103,360 (+0.00 %)
# python taper.py config/vanilla_16l.py --profile increasing --target_layers 15 --out experiments/taper/1b/increasing.py
# Every width is set here; a scale file before it sets the training budget: python train.py config/small.py experiments/taper/1b/increasing.py

vocab_size = 50280
block_size = 2048
d_model = 2048
n_layer = 16
head_dim = 64
n_head = [20, 21, 23, 24, 25, 27, 28, 29, 31, 32, 33, 35, 36, 37, 39, 40]
d_ffn = [1728, 2496, 3328, 4096, 4864, 5696, 6464, 7296, 8064, 8896, 9664, 10496, 11264, 12032, 12864, 13632]
d_attn0 = 1280
S_d = 0
F_d = 0
d_ffn0 = 1728
S_f = 0
