"""UniPic2-SD3.5M-Kontext DiT: SD3.5-Medium's MMDiT plus one optional reference latent.

The reference latent goes through the same patch embedding and the same cropped absolute position embedding as
the target, its tokens are prepended to the target tokens, every block runs on the joint sequence, and only the
last H*W tokens reach the final norm and projection. Without a reference this is exactly diffusers'
`SD3Transformer2DModel`, so weights, key names, `from_pretrained` and PEFT all carry over unchanged.
"""

import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput


class KontextSD3Transformer(SD3Transformer2DModel):
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        pooled_projections: torch.Tensor = None,
        timestep: torch.Tensor = None,
        ref_hidden_states: torch.Tensor | None = None,
        joint_attention_kwargs: dict | None = None,
        return_dict: bool = True,
        **sd3_kwargs,
    ):
        """Predict the flow velocity.

        hidden_states: [B, C, H, W] target latent (model space); ref_hidden_states: [B, C, H, W] or None,
        same shape as the target (the official model was trained that way); encoder_hidden_states: [B, L, D_joint];
        pooled_projections: [B, D_pooled]; timestep: [B] in 0..1000. Returns [B, C, H, W].
        """
        if ref_hidden_states is None:
            return super().forward(
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                pooled_projections=pooled_projections,
                timestep=timestep,
                joint_attention_kwargs=joint_attention_kwargs,
                return_dict=return_dict,
                **sd3_kwargs,
            )
        if sd3_kwargs:
            raise ValueError(f"KontextSD3Transformer: {sorted(sd3_kwargs)} are not supported with a reference latent")
        if ref_hidden_states.shape != hidden_states.shape:
            raise ValueError(
                f"KontextSD3Transformer: reference latent {tuple(ref_hidden_states.shape)} must match the target "
                f"latent {tuple(hidden_states.shape)}; resize the reference image to the output size"
            )

        height, width = hidden_states.shape[-2:]
        patch = self.config.patch_size
        target_tokens = (height // patch) * (width // patch)

        tokens = torch.cat([self.pos_embed(ref_hidden_states), self.pos_embed(hidden_states)], dim=1).contiguous()
        temb = self.time_text_embed(timestep, pooled_projections)
        context = self.context_embedder(encoder_hidden_states)
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                context, tokens = self._gradient_checkpointing_func(block, tokens, context, temb, joint_attention_kwargs)
            else:
                context, tokens = block(
                    hidden_states=tokens, encoder_hidden_states=context, temb=temb,
                    joint_attention_kwargs=joint_attention_kwargs,
                )

        tokens = tokens[:, -target_tokens:]
        tokens = self.proj_out(self.norm_out(tokens, temb))
        output = unpatchify(tokens, height // patch, width // patch, patch, self.out_channels)
        return Transformer2DModelOutput(sample=output) if return_dict else (output,)


def unpatchify(tokens: torch.Tensor, grid_h: int, grid_w: int, patch: int, channels: int) -> torch.Tensor:
    """[B, grid_h*grid_w, patch*patch*C] -> [B, C, grid_h*patch, grid_w*patch], the layout PatchEmbed reads."""
    batch = tokens.shape[0]
    x = tokens.reshape(batch, grid_h, grid_w, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(batch, channels, grid_h * patch, grid_w * patch)
