# Made by taper.py: profile increasing, parts both, strength 1
# budget 2,345,103,360 FLOPs/token forward at 2048 tokens (the base with 15 uniform layers); this model 2,345,103,360 (+0.00 %)
# python taper.py config/vanilla_16l.py --profile increasing --target_layers 15 --head_multiple 4 --ffn_multiple 256 --out experiments/taper/rounding/increasing_r256.py
# Every width is set here; a scale file before it sets the training budget: python train.py config/small.py experiments/taper/rounding/increasing_r256.py

vocab_size = 50280
block_size = 2048
d_model = 2048
n_layer = 16
head_dim = 64
n_head = [20, 20, 24, 24, 24, 28, 28, 28, 32, 32, 32, 36, 36, 36, 40, 40]
d_ffn = [1792, 2560, 3328, 4096, 4864, 5632, 6400, 7168, 8192, 8960, 9728, 10496, 11264, 12032, 12800, 13568]
d_attn0 = 1280
S_d = 0
F_d = 0
d_ffn0 = 1792
S_f = 0
