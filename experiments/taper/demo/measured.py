# Made by taper.py: profile measured (experiments/cpu_previews/norm_placement/demo_pre_s1), parts both, strength 1
# budget 3,966,720 FLOPs/token forward at 128 tokens (the base with 7 uniform layers); this model 3,966,720 (+0.00 %)
# python taper.py config/demo.py --profile measured --run experiments/cpu_previews/norm_placement/demo_pre_s1 --target_layers 7 --out experiments/taper/demo/measured.py
# Every width is set here; a scale file before it sets the training budget: python train.py config/demo.py experiments/taper/demo/measured.py

vocab_size = 256
block_size = 128
d_model = 128
n_layer = 8
head_dim = 8
n_head = [36, 6, 7, 7, 12, 13, 19, 12]
d_ffn = [1472, 384, 256, 256, 256, 256, 320, 384]
d_attn0 = 288
S_d = 0
F_d = 0
d_ffn0 = 1472
S_f = 0
