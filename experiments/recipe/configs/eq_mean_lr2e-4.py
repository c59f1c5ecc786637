# eq_lr2e-4.py with the factors over their mean (train.py equalize_via='lr_mean'): written after eq_lr2e-4
# diverged in both seeds (experiments/recipe/README.md). Each layer's lr at a step is the schedule's times its
# factor / the layers' mean factor, so the layers' mean lr stays the paper's 2e-4; the weak layers still take
# the larger steps. Gradients and the clip are left alone.
learning_rate = 2e-4
min_lr = 2e-6
eval_interval = 250
equalize = True
equalize_via = "lr_mean"
