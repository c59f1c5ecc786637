# Virtual depth (Section 4.4): 8 physical layers, the last four repeated with shared
# parameters. The paper's text says repeats 2,3,3,4 for layers 5-8, but its fan-in numbers
# (18,17,16,15,27,33,24,20) only come out with [1,1,1,1,2,3,3,5] (17 virtual positions), so
# that is what we use (docs/paper_notes.md)
# A variant: alone it is the paper's 1.2B model (Table 3; train.py's defaults are Table 5);
# after a scale file it is that scale's model: python train.py config/small.py config/virtual_depth.py

n_layer = 8
repeats = [1, 1, 1, 1, 2, 3, 3, 5]
