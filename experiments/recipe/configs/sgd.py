# Equalisation baseline under SGD (experiments/recipe/README.md, rules 6-7): Pre-LN, SGD with momentum 0.9.
# The peak lr, min lr and weight decay come from the sweep's pick: run.sh adds `aggregate.py --sgd_args=picked`
# (sgd_sweep.sh the same arguments at each lr of the sweep).
optimizer = "sgd"
momentum = 0.9
eval_interval = 250
