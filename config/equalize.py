# Norm-equalisation intervention (Appendix A.2.2): Vanilla-16L trained with per-layer
# gradient norms rescaled to the largest one; the clip norm is multiplied by equalize_clip_factor,
# derived as the paper does (0: the ratio of the largest gradient norms of an equalised and a standard
# pilot from the same initialisation; --equalize_reference=<vanilla run> takes the standard one from
# that run's dump, train.py's docstring says how)
# A variant: alone it is the paper's 1.2B model (Table 3; train.py's defaults are Table 5);
# after a scale file it is that scale's model: python train.py config/small.py config/equalize.py

n_layer = 16
equalize = True
equalize_clip_factor = 0.0
