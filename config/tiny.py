# The CPU scale: every width of the paper model / 16 (head_dim 8 keeps the paper's head counts and
# taper ratios), byte-level vocabulary (the embedded Shakespeare, prepared on first use), a few M
# params. A scale sets the widths and the training budget; a variant after it sets the model:
#   python train.py config/tiny.py config/layerskip.py            # -> out/tiny_layerskip

dataset = 'shakespeare'

d_model = 128
head_dim = 8
vocab_size = 256
block_size = 128
d_attn0 = 128    # 16 heads
S_d = 8          # 1 head per taper step
d_ffn0 = 512

batch_size = 16
max_iters = 300
warmup_iters = 30
learning_rate = 3e-3
eval_interval = 100
eval_iters = 8
log_interval = 10
