# Vanilla-16L: the uniform 16-layer baseline
# A variant: alone it is the paper's 1.2B model (Table 3; train.py's defaults are Table 5);
# after a scale file it is that scale's model: python train.py config/small.py config/vanilla_16l.py
# Table 2 parameter count at the paper's scale: 1.280 B (both embeddings included)

n_layer = 16
