# sgd_eq.py on LayerNorm scaling (lns_sgd.py): the paper's gradient equalisation under SGD.
optimizer = "sgd"
momentum = 0.9
eval_interval = 250
norm_placement = "scaled"
equalize = True
