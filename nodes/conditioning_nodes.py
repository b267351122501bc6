"""Text encoding and edit references."""

import logging

from ..unipic_core.models.text_encoding import encode_prompts
from .host.conditioning import SIZE_INPUTS, attach_reference, sized_image, to_conditioning

log = logging.getLogger("unipic2")


class UniPic2TextEncode:
    CATEGORY = "UniPic2/conditioning"
    DESCRIPTION = "Encodes a prompt and a negative prompt with the checkpoint's CLIP-L, CLIP-G and T5."
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoders": ("UNIPIC2_TEXT", {"tooltip": "From Load UniPic2 Kontext."}),
            "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "What to generate, or the edit "
                                  "instruction (e.g. 'make the sky purple')."}),
            "negative_prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "What to steer away from; "
                                           "used when guidance > 1."}),
        }}

    def encode(self, text_encoders, prompt, negative_prompt):
        both = encode_prompts(text_encoders.on_device(), [prompt, negative_prompt])
        positive = type(both)(both.tokens[:1], both.pooled[:1])
        negative = type(both)(both.tokens[1:], both.pooled[1:])
        return to_conditioning(positive), to_conditioning(negative)


class UniPic2EditReference:
    CATEGORY = "UniPic2/conditioning"
    DESCRIPTION = ("Attaches the image to edit to both conditionings and gives the matching empty latent. "
                   "The image is resized so the output has the same size as the reference (as UniPic2 was trained).")
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")
    FUNCTION = "attach"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("VAE", {"tooltip": "The SD3 VAE: from a UniPic2 loader, or Load VAE with the checkpoint's "
                            "vae file."}),
            "image": ("IMAGE", {"tooltip": "The image to edit (at least 64 px per side)."}),
            "positive": ("CONDITIONING", {"tooltip": "The edit instruction's conditioning."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt's conditioning."}),
            **SIZE_INPUTS,
        }}

    def attach(self, vae, image, positive, negative, size_policy, longer_edge, multiple_of):
        image = sized_image(image, "UniPic2 Edit Reference", "image", size_policy, longer_edge, multiple_of)
        return attach_reference(vae, image, positive, negative)
