# Made by taper.py: profile gfa, parts both, strength 1
# budget 2,345,103,360 FLOPs/token forward at 2048 tokens (the base with 15 uniform layers); this model 2,345,103,360 (+0.00 %)
# python taper.py config/vanilla_16l.py --profile gfa --target_layers 15 --out experiments/taper/1b/gfa.py
# Every width is set here; a scale file before it sets the training budget: python train.py config/small.py experiments/taper/1b/gfa.py

vocab_size = 50280
block_size = 2048
d_model = 2048
n_layer = 16
head_dim = 64
n_head = [54, 51, 47, 44, 41, 38, 35, 32, 28, 25, 22, 19, 16, 13, 9, 6]
d_ffn = [13760, 12928, 12096, 11328, 10496, 9728, 8896, 8064, 7296, 6464, 5632, 4864, 4032, 3264, 2432, 1600]
d_attn0 = 3456
S_d = 0
F_d = 0
d_ffn0 = 13760
S_f = 0
