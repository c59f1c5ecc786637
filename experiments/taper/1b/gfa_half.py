# Made by taper.py: profile gfa, parts both, strength 0.5
# budget 2,345,103,360 FLOPs/token forward at 2048 tokens (the base with 15 uniform layers); this model 2,345,103,360 (+0.00 %)
# python taper.py config/vanilla_16l.py --profile gfa --strength 0.5 --target_layers 15 --out experiments/taper/1b/gfa_half.py
# Every width is set here; a scale file before it sets the training budget: python train.py config/small.py experiments/taper/1b/gfa_half.py

vocab_size = 50280
block_size = 2048
d_model = 2048
n_layer = 16
head_dim = 64
n_head = [42, 40, 39, 37, 36, 34, 32, 31, 29, 28, 26, 24, 23, 21, 20, 18]
d_ffn = [10688, 10304, 9920, 9472, 9088, 8704, 8256, 7872, 7488, 7104, 6656, 6272, 5888, 5440, 5056, 4672]
d_attn0 = 2688
S_d = 0
F_d = 0
d_ffn0 = 10688
S_f = 0
