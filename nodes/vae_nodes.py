"""VAE Encode / Decode in raw SD3 VAE space, interchangeable with native VAE Encode / Decode of the same VAE."""

import logging

from ..unipic_core import images
from . import host

log = logging.getLogger("unipic2")


class UniPic2VAEEncode:
    CATEGORY = "UniPic2/latent"
    DESCRIPTION = "Encodes an image to a raw SD3 VAE latent (same space as native VAE Encode)."
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("UNIPIC2_VAE", {"tooltip": "From Load UniPic2 Kontext."}),
            "image": ("IMAGE", {"tooltip": "Image to encode; cropped to a multiple of 8 px like native VAE Encode."}),
        }}

    def encode(self, vae, image):
        images.check_image(image, "UniPic2 VAE Encode: 'image'")
        height, width = image.shape[1:3]
        crop_h, crop_w = height // 8 * 8, width // 8 * 8
        if (crop_h, crop_w) != (height, width):
            log.warning("UniPic2 VAE Encode: image %dx%d center-cropped to %dx%d", width, height, crop_w, crop_h)
            top, left = (height - crop_h) // 2, (width - crop_w) // 2
            image = image[:, top:top + crop_h, left:left + crop_w]
        host.load_on_device(vae.patcher)
        return ({"samples": images.vae_encode(vae.vae, image)},)


class UniPic2VAEDecode:
    CATEGORY = "UniPic2/latent"
    DESCRIPTION = "Decodes a raw SD3 VAE latent to an image (same space as native VAE Decode)."
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("UNIPIC2_VAE", {"tooltip": "From Load UniPic2 Kontext."}),
            "samples": ("LATENT", {"tooltip": "A latent from UniPic2 Sampler or native nodes using an SD3 VAE."}),
        }}

    def decode(self, vae, samples):
        raw = samples["samples"]
        images.check_latent(raw, "UniPic2 VAE Decode: 'samples'", "a sampler that diverged: lower its guidance or "
                            "the LoRA strength")
        if raw.shape[1] != vae.vae.config.latent_channels:
            raise ValueError(f"UniPic2 VAE Decode: 'samples' has shape {tuple(raw.shape)}; expected "
                             f"[batch, {vae.vae.config.latent_channels}, h, w] from an SD3-family VAE")
        host.load_on_device(vae.patcher)
        return (images.vae_decode(vae.vae, raw),)
