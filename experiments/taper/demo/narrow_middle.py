# Made by taper.py: profile narrow_middle, parts both, strength 1
# budget 3,966,720 FLOPs/token forward at 128 tokens (the base with 7 uniform layers); this model 3,966,720 (+0.00 %)
# python taper.py config/demo.py --profile narrow_middle --target_layers 7 --out experiments/taper/demo/narrow_middle.py
# Every width is set here; a scale file before it sets the training budget: python train.py config/demo.py experiments/taper/demo/narrow_middle.py

vocab_size = 256
block_size = 128
d_model = 128
n_layer = 8
head_dim = 8
n_head = [18, 15, 13, 10, 10, 13, 15, 18]
d_ffn = [576, 512, 384, 320, 320, 384, 512, 576]
d_attn0 = 144
S_d = 0
F_d = 0
d_ffn0 = 576
S_f = 0
