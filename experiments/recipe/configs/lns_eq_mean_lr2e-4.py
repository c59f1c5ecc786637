# eq_mean_lr2e-4.py on LayerNorm scaling (lns_lr2e-4.py): per-layer lr multipliers = the factors over their mean.
learning_rate = 2e-4
min_lr = 2e-6
eval_interval = 250
norm_placement = "scaled"
equalize = True
equalize_via = "lr_mean"
