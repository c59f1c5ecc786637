# Equalisation baseline (experiments/recipe/README.md): LayerNorm scaling (each norm's output times
# 1/sqrt(l + 1); its late layers are weak under the same fan-in) at the paper's peak lr, as lr2e-4.py.
learning_rate = 2e-4
min_lr = 2e-6
eval_interval = 250
norm_placement = "scaled"
