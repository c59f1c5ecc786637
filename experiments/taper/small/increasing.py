# Made by taper.py: profile increasing, parts both, strength 1
# budget 193,059,840 FLOPs/token forward at 1024 tokens (the base with 15 uniform layers); this model 193,059,840 (+0.00 %)
# python taper.py config/small.py config/vanilla_16l.py --profile increasing --target_layers 15 --out experiments/taper/small/increasing.py
# Every width is set here; a scale file before it sets the training budget: python train.py config/small.py experiments/taper/small/increasing.py

vocab_size = 50280
block_size = 1024
d_model = 512
n_layer = 16
head_dim = 32
n_head = [10, 11, 11, 12, 13, 13, 14, 15, 15, 16, 17, 17, 18, 19, 19, 20]
d_ffn = [448, 640, 832, 1024, 1216, 1408, 1600, 1792, 2048, 2240, 2432, 2624, 2816, 3008, 3200, 3392]
d_attn0 = 320
S_d = 0
F_d = 0
d_ffn0 = 448
S_f = 0
