"""UniPic2-MetaQuery conditioner: learnable queries read by Qwen2.5-VL, turned into the DiT's conditioning.

Weight-compatible with the official `conditioner/` folder: `meta_queries` [Q, D_llm]; `projector_1` D_llm -> D_c;
`connector`, a pre-LayerNorm bidirectional transformer encoder (module names connector.layers.N.{self_attn.
{q,k,v,out}_proj, layer_norm1, mlp.fc1, mlp.fc2, layer_norm2} -- exactly SigLIP's encoder, which we reuse);
`projector_2` (token mean -> pooled) and `projector_3` (per token -> DiT joint attention width).
"""

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from transformers import SiglipVisionConfig
from transformers.models.siglip.modeling_siglip import SiglipEncoder

# The official ConnectorConfig's defaults; a checkpoint's connector_config overrides them.
CONNECTOR_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, attention_dropout=0.0)


def build_connector_config(settings: dict) -> SiglipVisionConfig:
    """The connector's encoder config from a checkpoint's connector_config (attention backend chosen here)."""
    values = {**CONNECTOR_DEFAULTS, **{k: v for k, v in settings.items() if k in CONNECTOR_DEFAULTS}}
    config = SiglipVisionConfig(**values)
    config._attn_implementation = "sdpa"  # the checkpoint may name flash_attention_2; sdpa runs everywhere
    return config


class MetaQueryConditioner(ModelMixin, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(self, connector_config: dict, num_queries: int = 256, llm_hidden_size: int = 3584,
                 pooled_projection_dim: int = 2048, joint_attention_dim: int = 4096):
        super().__init__()
        encoder_config = build_connector_config(connector_config)
        width = encoder_config.hidden_size
        self.connector = SiglipEncoder(encoder_config)
        self.projector_1 = nn.Linear(llm_hidden_size, width)
        self.projector_2 = nn.Linear(width, pooled_projection_dim)
        self.projector_3 = nn.Linear(width, joint_attention_dim)
        self.meta_queries = nn.Parameter(torch.zeros(num_queries, llm_hidden_size))

    def forward(self, query_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MLLM hidden states at the query positions [B, Q, D_llm] -> (tokens [B, Q, D_joint], pooled [B, D_pooled])."""
        x = self.connector(self.projector_1(query_states)).last_hidden_state
        return self.projector_3(x), self.projector_2(x.mean(dim=1))
