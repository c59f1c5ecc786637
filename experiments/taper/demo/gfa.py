# Made by taper.py: profile gfa, parts both, strength 1
# budget 3,966,720 FLOPs/token forward at 128 tokens (the base with 7 uniform layers); this model 3,966,720 (+0.00 %)
# python taper.py config/demo.py --profile gfa --target_layers 7 --out experiments/taper/demo/gfa.py
# Every width is set here; a scale file before it sets the training budget: python train.py config/demo.py experiments/taper/demo/gfa.py

vocab_size = 256
block_size = 128
d_model = 128
n_layer = 8
head_dim = 8
n_head = [23, 20, 18, 15, 13, 10, 8, 5]
d_ffn = [704, 640, 576, 512, 384, 320, 256, 192]
d_attn0 = 184
S_d = 0
F_d = 0
d_ffn0 = 704
S_f = 0
