# sgd.py on LayerNorm scaling (each norm's output times 1/sqrt(l + 1)), the baseline of lns_sgd_eq.py.
optimizer = "sgd"
momentum = 0.9
eval_interval = 250
norm_placement = "scaled"
