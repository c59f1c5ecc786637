# Recipe arm: the study's peak lr 1e-3 and min lr 2e-5, reached after 1500 warm-up steps instead of 200.
warmup_iters = 1500
eval_interval = 250
