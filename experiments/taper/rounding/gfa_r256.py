# Made by taper.py: profile gfa, parts both, strength 1
# budget 2,345,103,360 FLOPs/token forward at 2048 tokens (the base with 15 uniform layers); this model 2,345,103,360 (+0.00 %)
# python taper.py config/vanilla_16l.py --profile gfa --target_layers 15 --head_multiple 4 --ffn_multiple 256 --out experiments/taper/rounding/gfa_r256.py
# Every width is set here; a scale file before it sets the training budget: python train.py config/small.py experiments/taper/rounding/gfa_r256.py

vocab_size = 50280
block_size = 2048
d_model = 2048
n_layer = 16
head_dim = 64
n_head = [52, 52, 48, 44, 40, 36, 36, 32, 28, 24, 24, 20, 16, 12, 8, 8]
d_ffn = [13824, 13056, 12032, 11264, 10496, 9728, 8960, 8192, 7168, 6400, 5632, 4864, 4096, 3328, 2304, 1536]
d_attn0 = 3328
S_d = 0
F_d = 0
d_ffn0 = 13824
S_f = 0
