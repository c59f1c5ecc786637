# The README demo: a tiny 8-layer Vanilla model (the tiny scale's widths, spelled out here so the
# demo reads in one file) on the embedded byte-level Shakespeare; trains on a laptop CPU in a few
# minutes, then `python fanin.py out/demo` compares its measured gradient shares with the fan-in
# theory. Equivalent to config/tiny.py config/vanilla_8l.py with min_lr and log_interval below.

out_dir = 'out/demo'
dataset = 'shakespeare'

n_layer = 8
d_model = 128
head_dim = 8
vocab_size = 256
block_size = 128
d_attn0 = 128    # 16 heads
S_d = 8
d_ffn0 = 512

batch_size = 16
max_iters = 300
warmup_iters = 30
learning_rate = 3e-3
min_lr = 3e-4
eval_interval = 100
eval_iters = 8
log_interval = 25
