"""SD3 triple text encoding (CLIP-L, CLIP-G, T5-XXL) into the Kontext DiT's conditioning.

Same recipe as diffusers' StableDiffusion3Pipeline.encode_prompt (and ComfyUI's SD3 CLIP): both CLIPs' penultimate
hidden states side by side, zero-padded to T5's width, followed by T5's tokens; pooled = both CLIP projections.
"""

from dataclasses import dataclass

import torch

from ..inference.sampling import PromptEmbeds

CLIP_MAX_TOKENS = 77
T5_MAX_TOKENS = 256


@dataclass
class SD3TextEncoders:
    """The Kontext folder's text_encoder{,_2,_3} with tokenizer{,_2,_3}; t5 may be None (zeros stand in)."""

    clip_l: torch.nn.Module
    tokenizer_l: object
    clip_g: torch.nn.Module
    tokenizer_g: object
    t5: torch.nn.Module | None
    tokenizer_t5: object | None
    joint_dim: int  # the DiT's joint_attention_dim (T5's width, 4096 for the real model)
    # Where inputs go, set by whoever places the modules: with ComfyUI's partial loading some weights stay on the
    # offload device, so the modules' own .device does not say where they compute.
    device: torch.device = torch.device("cpu")

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.clip_l, self.clip_g, self.t5) if m is not None]


def _clip_embeds(encoder, tokenizer, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ids = tokenizer(prompts, padding="max_length", max_length=CLIP_MAX_TOKENS, truncation=True,
                    return_tensors="pt").input_ids
    out = encoder(ids.to(device), output_hidden_states=True)
    return out.hidden_states[-2], out[0]


def _t5_embeds(encoders: SD3TextEncoders, prompts: list[str], max_tokens: int) -> torch.Tensor:
    if encoders.t5 is None:
        return torch.zeros(len(prompts), CLIP_MAX_TOKENS, encoders.joint_dim, device=encoders.device,
                           dtype=encoders.clip_l.dtype)
    ids = encoders.tokenizer_t5(prompts, padding="max_length", max_length=max_tokens, truncation=True,
                                add_special_tokens=True, return_tensors="pt").input_ids
    return encoders.t5(ids.to(encoders.device))[0]


@torch.no_grad()
def encode_prompts(encoders: SD3TextEncoders, prompts: list[str], max_t5_tokens: int = T5_MAX_TOKENS) -> PromptEmbeds:
    """prompts -> PromptEmbeds(tokens [B, 77 + max_t5_tokens, joint_dim], pooled [B, D_L + D_G]), float32 on CPU."""
    tokens_l, pooled_l = _clip_embeds(encoders.clip_l, encoders.tokenizer_l, prompts, encoders.device)
    tokens_g, pooled_g = _clip_embeds(encoders.clip_g, encoders.tokenizer_g, prompts, encoders.device)
    t5 = _t5_embeds(encoders, prompts, max_t5_tokens)
    clip = torch.cat([tokens_l, tokens_g], dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    tokens = torch.cat([clip.to(t5.dtype), t5], dim=-2)
    pooled = torch.cat([pooled_l, pooled_g], dim=-1)
    return PromptEmbeds(tokens.float().cpu(), pooled.float().cpu())
