# Vanilla-8L: uniform, 8 layers (the reference of the virtual-depth intervention)
# A variant: alone it is the paper's 1.2B model (Table 3; train.py's defaults are Table 5);
# after a scale file it is that scale's model: python train.py config/small.py config/vanilla_8l.py

n_layer = 8
