# Recipe arm: a dose between the paper's 2e-4 and the study's 1e-3; min lr peak/100.
learning_rate = 5e-4
min_lr = 5e-6
eval_interval = 250
