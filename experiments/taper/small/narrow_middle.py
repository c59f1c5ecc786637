# Made by taper.py: profile narrow_middle, parts both, strength 1
# budget 193,059,840 FLOPs/token forward at 1024 tokens (the base with 15 uniform layers); this model 193,059,840 (+0.00 %)
# python taper.py config/small.py config/vanilla_16l.py --profile narrow_middle --target_layers 15 --out experiments/taper/small/narrow_middle.py
# Every width is set here; a scale file before it sets the training budget: python train.py config/small.py experiments/taper/small/narrow_middle.py

vocab_size = 50280
block_size = 1024
d_model = 512
n_layer = 16
head_dim = 32
n_head = [20, 18, 17, 16, 14, 13, 12, 10, 10, 12, 13, 14, 16, 17, 18, 20]
d_ffn = [2496, 2368, 2176, 1984, 1856, 1664, 1472, 1344, 1344, 1472, 1664, 1856, 1984, 2176, 2368, 2496]
d_attn0 = 640
S_d = 0
F_d = 0
d_ffn0 = 2496
S_f = 0
