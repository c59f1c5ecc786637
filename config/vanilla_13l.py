# Vanilla-13L: uniform, 13 layers
# A variant: alone it is the paper's 1.2B model (Table 3; train.py's defaults are Table 5);
# after a scale file it is that scale's model: python train.py config/small.py config/vanilla_13l.py
# Table 2 parameter count at the paper's scale: 1.078 B (both embeddings included)

n_layer = 13
