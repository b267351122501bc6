"""Text encoding and edit references."""

import logging

from ..unipic_core import images
from ..unipic_core.text_encoding import encode_prompts
from .host import memory
from .host.conditioning import to_conditioning, with_reference

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
        memory.load_on_device(*text_encoders.patchers)
        both = encode_prompts(text_encoders.encoders, [prompt, negative_prompt])
        positive = type(both)(both.tokens[:1], both.pooled[:1])
        negative = type(both)(both.tokens[1:], both.pooled[1:])
        return to_conditioning(positive), to_conditioning(negative)


SIZE_INPUTS = {
    "size_policy": (["longer edge", "keep size"], {"default": "longer edge", "tooltip": "longer edge: scale so the "
                    "longer side is 'longer_edge' (official: 512). keep size: only round to the grid."}),
    "longer_edge": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 32, "tooltip": "Target length of the "
                            "longer side with the 'longer edge' policy."}),
    "multiple_of": ("INT", {"default": 32, "min": 16, "max": 128, "step": 16, "tooltip": "Both sides are rounded to "
                            "a multiple of this (16 is the DiT's patch grid; official: 32)."}),
}


def sized_image(image, node: str, name: str, size_policy: str, longer_edge: int, multiple_of: int):
    """The IMAGE resized by the size policy (the official editing scripts' rule by default); says when it resized."""
    images.check_image(image, f"{node}: '{name}'")
    height, width = image.shape[1:3]
    if size_policy == "longer edge":
        edge = max(multiple_of, round(longer_edge / multiple_of) * multiple_of)
        new_w, new_h = images.longer_edge_size(width, height, edge, multiple_of)
    else:
        new_w, new_h = (max(multiple_of, round(s / multiple_of) * multiple_of) for s in (width, height))
    if (new_w, new_h) != (width, height):
        log.warning("%s: '%s' resized from %dx%d to %dx%d (%s, multiple of %d)", node, name, width, height,
                    new_w, new_h, size_policy, multiple_of)
    return images.resize_image(image, new_w, new_h)


def attach_reference(vae, image, positive, negative):
    """Both conditionings with the image's raw VAE latent (native VAE Encode's) attached, and the empty LATENT of
    the same size."""
    raw = vae.encode(image[..., :3]).float()
    return with_reference(positive, raw), with_reference(negative, raw), {"samples": raw.new_zeros(raw.shape)}


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
