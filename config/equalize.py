# Norm-equalisation intervention (Appendix A.2.2): Vanilla-16L trained with per-layer
# gradient norms rescaled to the largest one; the clip norm is multiplied by equalize_clip_factor
# A variant: alone it is the paper's 1.2B model (Table 3; train.py's defaults are Table 5);
# after a scale file it is that scale's model: python train.py config/small.py config/equalize.py

n_layer = 16
equalize = True
equalize_clip_factor = 1.0
