# The study's own recipe (peak 1e-3, min lr 2e-5, 200 warm-up steps) re-run with held-out PPL every 250
# steps: the reference curve for the matched-loss comparison (the study's runs evaluated every 1000).
eval_interval = 250
