# Made by taper.py: profile measured (experiments/study/runs/small_vanilla_16l_keep_s1), parts both, strength 1
# budget 193,059,840 FLOPs/token forward at 1024 tokens (the base with 15 uniform layers); this model 193,059,840 (+0.00 %)
# python taper.py config/small.py config/vanilla_16l.py --profile measured --run experiments/study/runs/small_vanilla_16l_keep_s1 --target_layers 15 --out experiments/taper/small/measured.py
# Every width is set here; a scale file before it sets the training budget: python train.py config/small.py experiments/taper/small/measured.py

vocab_size = 50280
block_size = 1024
d_model = 512
n_layer = 16
head_dim = 32
n_head = [52, 11, 9, 10, 11, 9, 11, 11, 14, 15, 15, 15, 14, 15, 15, 13]
d_ffn = [5056, 960, 896, 1024, 1152, 1280, 1408, 1472, 1664, 1792, 1920, 2112, 2176, 2304, 2496, 3008]
d_attn0 = 1664
S_d = 0
F_d = 0
d_ffn0 = 5056
S_f = 0
