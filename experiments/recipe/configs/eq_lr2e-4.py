# Equalisation that acts on AdamW's updates (experiments/recipe/README.md): Pre-LN at the paper's peak lr
# (lr2e-4.py), each layer's learning rate multiplied at every step by its equalisation factor (the largest
# layer gradient norm over its own; train.py equalize_via='lr'). Gradients and the clip are left alone.
learning_rate = 2e-4
min_lr = 2e-6
eval_interval = 250
equalize = True
equalize_via = "lr"
