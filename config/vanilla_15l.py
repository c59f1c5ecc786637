# Vanilla-15L: uniform, 15 layers (Table 2's reference row for CascadeFormer-A2)
# A variant: alone it is the paper's 1.2B model (Table 3; train.py's defaults are Table 5);
# after a scale file it is that scale's model: python train.py config/small.py config/vanilla_15l.py
# Table 2 parameter count at the paper's scale: 1.213 B (both embeddings included)

n_layer = 15
