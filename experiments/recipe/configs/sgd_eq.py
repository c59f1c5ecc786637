# sgd.py with the paper's equalisation (A.2.2): each layer's gradient rescaled to the largest layer norm, the
# clip factor derived by pilots (train.py equalize_via='grad'). Under SGD the rescaling reaches the update.
optimizer = "sgd"
momentum = 0.9
eval_interval = 250
equalize = True
