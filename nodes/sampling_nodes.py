"""Sampling: UniPic2 Sampler, and the official schedule and the paper's sampler as native SIGMAS and SAMPLER for
SamplerCustomAdvanced."""

from ..unipic_core.inference.sampling import SAMPLERS
from .host.native_sampling import flow_sde_sampler, official_sigmas, sample_latent


class UniPic2Sampler:
    CATEGORY = "UniPic2/sampling"
    DESCRIPTION = ("Denoises a latent with UniPic2-Kontext on the official schedule (exactly diffusers' "
                   "FlowMatchEulerDiscreteScheduler) with euler or the paper's flow-sde, through ComfyUI's own "
                   "sampling: model patches, LoRAs, noise masks (Set Latent Noise Mask), timestep ranges, areas "
                   "and masks of the conditioning apply as in KSampler. A reference latent in the conditioning "
                   "(UniPic2 Edit Reference or native ReferenceLatent) makes it an edit; otherwise it is "
                   "text-to-image.")
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "UniPic2-Kontext: from Load UniPic2 Kontext / MetaQuery, or Load "
                                "Diffusion Model on its transformer file (LoRAs and model patches included)."}),
            "positive": ("CONDITIONING", {"tooltip": "Prompt or edit instruction (UniPic2 Text Encode, or SD3 "
                                          "CLIPTextEncode); may carry the reference image, and several prompts "
                                          "with timestep ranges."}),
            "negative": ("CONDITIONING", {"tooltip": "Negative prompt, used when guidance > 1."}),
            "latent": ("LATENT", {"tooltip": "Sets the output size (and batch); with denoise < 1 also the start. With "
                                  "a noise mask, only where the mask is 1 is regenerated; the rest is kept."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": "Noise seed; the same "
                             "seed gives the same image on any device."}),
            "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip": "Denoising steps (official: 50)."}),
            "guidance": ("FLOAT", {"default": 3.5, "min": 1.0, "max": 30.0, "step": 0.1, "tooltip": "Classifier-free "
                                   "guidance scale (official: 3.5); 1 skips the negative pass."}),
            "sampler": (list(SAMPLERS), {"default": "euler", "tooltip": "euler: deterministic ODE. flow-sde: the "
                                         "Flow-GRPO stochastic sampler, noise set by noise_level."}),
            "noise_level": ("FLOAT", {"default": 0.7, "min": 0.0, "max": 2.0, "step": 0.05, "tooltip": "flow-sde "
                                      "only: SDE noise scale a (paper: 0.7); 0 equals euler."}),
            "shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 20.0, "step": 0.1, "tooltip": "Timestep shift; "
                                "0 uses the model's (the checkpoint's scheduler config: 3.0 for UniPic2-Kontext, or "
                                "a ModelSamplingSD3 node's). Above 0 it replaces it, as ModelSamplingSD3 would."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": "Below 1, "
                                  "starts from the input latent noised to that level (img2img)."}),
        }}

    def sample(self, model, positive, negative, latent, seed, steps, guidance, sampler, noise_level, shift, denoise):
        return (sample_latent(model, positive, negative, latent, seed, steps, guidance, sampler, noise_level, shift,
                              denoise),)


class UniPic2Schedule:
    CATEGORY = "UniPic2/sampling"
    DESCRIPTION = ("The official UniPic2 / SD3 schedule as SIGMAS for SamplerCustomAdvanced: sigma linear from 1 to 0 "
                   "over the steps, shifted by the model's shift (3.0 for UniPic2 and SD3.5; a ModelSamplingSD3 node "
                   "before this one changes it), exactly as diffusers' FlowMatchEulerDiscreteScheduler computes it. "
                   "ComfyUI's own simple / normal schedulers pick sigmas from a 1000-entry table and end higher, so "
                   "they differ slightly from the official schedule.")
    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "schedule"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A flow-matching model (UniPic2, SD3 / SD3.5); its shift sets the "
                                "schedule."}),
            "steps": ("INT", {"default": 50, "min": 1, "max": 10000, "tooltip": "Denoising steps (official: 50)."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": "Below 1, the "
                                  "last steps of a steps/denoise schedule (img2img), as BasicScheduler does."}),
        }}

    def schedule(self, model, steps, denoise):
        return (official_sigmas(model, steps, denoise, "UniPic2 Schedule"),)


class UniPic2FlowSDESampler:
    CATEGORY = "UniPic2/sampling"
    DESCRIPTION = ("The UniPic2 paper's Flow-GRPO SDE sampler as a SAMPLER for SamplerCustomAdvanced: every step adds "
                   "fresh noise scaled by noise_level (0 equals euler), and the last step to sigma 0 is an Euler "
                   "step so no noise is left in the image. The step noise comes from the Noise input's seed, so "
                   "the same seed gives the same image on any device, and UniPic2 Sampler's flow-sde image. For "
                   "flow-matching models (UniPic2, SD3 / SD3.5).")
    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get_sampler"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "noise_level": ("FLOAT", {"default": 0.7, "min": 0.0, "max": 2.0, "step": 0.05, "tooltip": "SDE noise "
                                      "scale a (paper: 0.7); 0 equals euler."}),
        }}

    def get_sampler(self, noise_level):
        return (flow_sde_sampler(noise_level),)
