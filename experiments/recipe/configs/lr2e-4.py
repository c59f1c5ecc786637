# Recipe arm: the paper's peak learning rate (Table 5: 2e-4); min lr peak/100, as the pilot.
# Applied after config/small.py config/vanilla_16l.py and the study's settings (experiments/recipe/run.sh).
learning_rate = 2e-4
min_lr = 2e-6
eval_interval = 250   # held-out PPL every 250 steps: the matched-loss comparison reads it
