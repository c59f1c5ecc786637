# Made by taper.py: profile increasing, parts both, strength 1
# budget 3,966,720 FLOPs/token forward at 128 tokens (the base with 7 uniform layers); this model 3,966,720 (+0.00 %)
# python taper.py config/demo.py --profile increasing --target_layers 7 --out experiments/taper/demo/increasing.py
# Every width is set here; a scale file before it sets the training budget: python train.py config/demo.py experiments/taper/demo/increasing.py

vocab_size = 256
block_size = 128
d_model = 128
n_layer = 8
head_dim = 8
n_head = [9, 11, 12, 13, 15, 16, 17, 19]
d_ffn = [128, 192, 320, 384, 512, 576, 704, 768]
d_attn0 = 72
S_d = 0
F_d = 0
d_ffn0 = 128
S_f = 0
