# Made by taper.py: profile gfa, parts both, strength 0.5
# budget 193,059,840 FLOPs/token forward at 1024 tokens (the base with 15 uniform layers); this model 193,059,840 (+0.00 %)
# python taper.py config/small.py config/vanilla_16l.py --profile gfa --strength 0.5 --target_layers 15 --out experiments/taper/small/gfa_half.py
# Every width is set here; a scale file before it sets the training budget: python train.py config/small.py experiments/taper/small/gfa_half.py

vocab_size = 50280
block_size = 1024
d_model = 512
n_layer = 16
head_dim = 32
n_head = [21, 20, 19, 19, 18, 17, 16, 15, 15, 14, 13, 12, 11, 11, 10, 9]
d_ffn = [2688, 2560, 2496, 2368, 2304, 2176, 2048, 1984, 1856, 1792, 1664, 1536, 1472, 1344, 1280, 1152]
d_attn0 = 672
S_d = 0
F_d = 0
d_ffn0 = 2688
S_f = 0
