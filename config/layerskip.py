# LayerSkip: Vanilla-16L with deep supervision (an auxiliary LM loss after every block,
# L_N + sum_k alpha_k L_k, alpha = 1); --ds_scale=sum (or uniform, linear, sqrt, inv, inv_sqrt) trains
# with LayerSkip's own normalised exit weights instead (model.py, GPTConfig.exit_weights)
# A variant: alone it is the paper's 1.2B model (Table 3; train.py's defaults are Table 5);
# after a scale file it is that scale's model: python train.py config/small.py config/layerskip.py

n_layer = 16
deep_supervision = True
