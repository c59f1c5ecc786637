# Made by taper.py: profile gfa, parts both, strength 1
# budget 193,059,840 FLOPs/token forward at 1024 tokens (the base with 15 uniform layers); this model 193,059,840 (+0.00 %)
# python taper.py config/small.py config/vanilla_16l.py --profile gfa --target_layers 15 --out experiments/taper/small/gfa.py
# Every width is set here; a scale file before it sets the training budget: python train.py config/small.py experiments/taper/small/gfa.py

vocab_size = 50280
block_size = 1024
d_model = 512
n_layer = 16
head_dim = 32
n_head = [27, 25, 24, 22, 21, 19, 17, 16, 14, 13, 11, 9, 8, 6, 5, 3]
d_ffn = [3456, 3264, 3008, 2816, 2624, 2432, 2240, 2048, 1792, 1600, 1408, 1216, 1024, 832, 576, 384]
d_attn0 = 864
S_d = 0
F_d = 0
d_ffn0 = 3456
S_f = 0
