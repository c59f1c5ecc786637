# Made by taper.py: profile linear, parts ffn
# budget 3,966,720 FLOPs/token forward at 128 tokens (the base with 7 uniform layers); this model 3,934,208 (-0.82 %)
# python taper.py config/demo.py --profile linear --target_layers 7 --out experiments/taper/demo/linear.py
# Every width is set here; a scale file before it sets the training budget: python train.py config/demo.py experiments/taper/demo/linear.py

vocab_size = 256
block_size = 128
d_model = 128
n_layer = 8
head_dim = 8
n_head = [16, 16, 16, 16, 16, 16, 16, 16]
d_ffn = [512, 512, 448, 448, 384, 384, 320, 320]
d_attn0 = 128
S_d = 0
F_d = 0
d_ffn0 = 512
S_f = 0
