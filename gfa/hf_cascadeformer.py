"""
CascadeFormer in HF transformers: a Llama whose layers have their own widths (query heads, K/V
heads, FFN size per layer). gfa/hf_llama.py copies this file into the folder of every tapered export as
modeling_cascadeformer.py, and its config.json points AutoConfig and AutoModelForCausalLM here, so

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

loads it (and so do tools built on that call, such as lm-eval's `hf` model with
trust_remote_code=True). Each layer is HF's own LlamaDecoderLayer with its projections resized:
the attention infers its head count from the projection's width, and num_key_value_groups says how
many query heads share a K/V head. Nothing here imports this codebase.
"""
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM


class CascadeFormerConfig(LlamaConfig):
    """LlamaConfig plus num_attention_heads_per_layer, num_key_value_heads_per_layer and
    intermediate_size_per_layer (lists, one entry per layer); the scalar fields hold layer 0's."""
    model_type = "cascadeformer"


class CascadeFormerForCausalLM(LlamaForCausalLM):
    config_class = CascadeFormerConfig

    def __init__(self, config):
        super().__init__(config)
        d, hd = config.hidden_size, config.head_dim
        for layer, h, kv, f in zip(self.model.layers, config.num_attention_heads_per_layer,
                                   config.num_key_value_heads_per_layer, config.intermediate_size_per_layer):
            attn, mlp = layer.self_attn, layer.mlp
            attn.q_proj, attn.o_proj = nn.Linear(d, h * hd, bias=False), nn.Linear(h * hd, d, bias=False)
            attn.k_proj, attn.v_proj = nn.Linear(d, kv * hd, bias=False), nn.Linear(d, kv * hd, bias=False)
            attn.num_key_value_groups = h // kv
            mlp.gate_proj, mlp.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
            mlp.down_proj = nn.Linear(f, d, bias=False)
            mlp.intermediate_size = f
        self.post_init()
