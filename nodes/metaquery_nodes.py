"""UniPic2-MetaQuery conditioning and image understanding with the loaded Qwen2.5-VL."""

import logging

import torch

from ..unipic_core.inference.images import check_image
from ..unipic_core.inference.latents import SD3
from ..unipic_core.inference.sampling import PromptEmbeds
from ..unipic_core.models.metaquery import answer_question, encode_metaquery
from .host.conditioning import SIZE_INPUTS, attach_reference, sized_image, to_conditioning

log = logging.getLogger("unipic2")

MLLM_INPUT = ("UNIPIC2_MLLM", {"tooltip": "From Load UniPic2 MetaQuery."})


def first_of_batch(image: torch.Tensor, node: str, name: str) -> torch.Tensor:
    if image.shape[0] > 1:
        log.warning("%s: '%s' is a batch of %d; the first image is used", node, name, image.shape[0])
    return image[:1]


class UniPic2MetaQueryEncode:
    CATEGORY = "UniPic2/conditioning"
    DESCRIPTION = ("Encodes the prompt (and, for editing, the image) with Qwen2.5-VL and the MetaQuery connector. "
                   "Give it the image and the VAE to edit: the image then conditions both the MLLM and the DiT (the "
                   "paper's best setting), and 'latent' is the matching empty latent for the sampler.")
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "mllm": MLLM_INPUT,
                "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "What to generate, or the edit "
                                      "instruction."}),
                "negative_prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "What to steer away from "
                                               "(same path, same images); used when guidance > 1."}),
                **SIZE_INPUTS,
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "The image to edit: read by the MLLM, and by the DiT when a VAE is "
                                    "connected."}),
                "vae": ("VAE", {"tooltip": "Connect (the loader's VAE) to attach the image as the DiT's reference "
                                "(editing)."}),
                "image2": ("IMAGE", {"tooltip": "A second image for the MLLM only (e.g. a style or object source)."}),
            },
        }

    def encode(self, mllm, prompt, negative_prompt, size_policy, longer_edge, multiple_of, image=None, vae=None,
               image2=None):
        node = "UniPic2 MetaQuery Encode"
        sized = [sized_image(first_of_batch(img, node, name), node, name, size_policy, longer_edge, multiple_of)
                 for name, img in (("image", image), ("image2", image2)) if img is not None]
        both = encode_metaquery(mllm.on_device(), [prompt, negative_prompt], [img[0] for img in sized])
        positive = to_conditioning(PromptEmbeds(both.tokens[:1], both.pooled[:1]))
        negative = to_conditioning(PromptEmbeds(both.tokens[1:], both.pooled[1:]))
        if image is not None and vae is not None:
            return attach_reference(vae, sized[0], positive, negative)
        if image is not None:
            log.info("%s: no VAE connected, so the image conditions the MLLM only (no DiT reference)", node)
        # text-to-image: a square latent for convenience
        return positive, negative, {"samples": SD3.empty(1, longer_edge, longer_edge)}


class UniPic2Understand:
    CATEGORY = "UniPic2/understanding"
    DESCRIPTION = "Answers a question about the image(s) with the loaded Qwen2.5-VL (the unified model's understanding)."
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("answer",)
    OUTPUT_NODE = True
    FUNCTION = "answer"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "mllm": MLLM_INPUT,
                "image": ("IMAGE", {"tooltip": "The image to ask about (the first of a batch)."}),
                "question": ("STRING", {"multiline": True, "default": "Describe this image in detail.",
                                        "tooltip": "The question or instruction."}),
                "max_new_tokens": ("INT", {"default": 256, "min": 1, "max": 4096, "tooltip": "Longest answer, in "
                                           "tokens."}),
                "do_sample": ("BOOLEAN", {"default": False, "tooltip": "Off: greedy, the most likely answer. On: "
                                          "sample with temperature and top_p."}),
                "temperature": ("FLOAT", {"default": 0.7, "min": 0.01, "max": 2.0, "step": 0.05, "tooltip": "Sampling "
                                          "temperature (do_sample only)."}),
                "top_p": ("FLOAT", {"default": 0.9, "min": 0.05, "max": 1.0, "step": 0.05, "tooltip": "Nucleus "
                                    "sampling mass (do_sample only)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": "Sampling seed; the "
                                 "same seed gives the same answer."}),
            },
            "optional": {"image2": ("IMAGE", {"tooltip": "A second image to ask about."})},
        }

    def answer(self, mllm, image, question, max_new_tokens, do_sample, temperature, top_p, seed, image2=None):
        node = "UniPic2 Understand"
        pictures = []
        for name, img in (("image", image), ("image2", image2)):
            if img is not None:
                check_image(img, f"{node}: '{name}'")
                pictures.append(first_of_batch(img, node, name)[0])
        text = answer_question(mllm.mllm_on_device(), pictures, question, max_new_tokens, do_sample, temperature, top_p,
                               seed % 2**63)
        return {"ui": {"text": [text]}, "result": (text,)}
