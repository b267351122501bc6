"""Model patches: UniPic2-Kontext's reference ability on a native SD3 MODEL from any loader."""

from .host.native_kontext import with_kontext_reference


class UniPic2KontextReference:
    CATEGORY = "UniPic2/model"
    DESCRIPTION = ("Makes a native SD3.5-M MODEL edit as UniPic2-Kontext: the reference latent in the conditioning "
                   "(ReferenceLatent or UniPic2 Edit Reference) is prepended to the image tokens; without one, the "
                   "model is unchanged.")
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A UniPic2-Kontext DiT loaded natively (Load Diffusion Model on its "
                                "transformer file, any weight_dtype), LoRAs and model patches included."}),
        }}

    def patch(self, model):
        return (with_kontext_reference(model),)
