"""ComfyUI node classes; the only package that imports the host (comfy, folder_paths)."""

from .conditioning_nodes import UniPic2EditReference, UniPic2TextEncode
from .loader_nodes import LoadUniPic2Kontext, LoadUniPic2MetaQuery
from .metaquery_nodes import UniPic2MetaQueryEncode, UniPic2Understand
from .sampler_node import UniPic2Sampler
from .vae_nodes import UniPic2VAEDecode, UniPic2VAEEncode

NODE_CLASS_MAPPINGS = {
    "LoadUniPic2Kontext": LoadUniPic2Kontext,
    "LoadUniPic2MetaQuery": LoadUniPic2MetaQuery,
    "UniPic2MetaQueryEncode": UniPic2MetaQueryEncode,
    "UniPic2Understand": UniPic2Understand,
    "UniPic2TextEncode": UniPic2TextEncode,
    "UniPic2EditReference": UniPic2EditReference,
    "UniPic2Sampler": UniPic2Sampler,
    "UniPic2VAEEncode": UniPic2VAEEncode,
    "UniPic2VAEDecode": UniPic2VAEDecode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoadUniPic2Kontext": "Load UniPic2 Kontext",
    "LoadUniPic2MetaQuery": "Load UniPic2 MetaQuery",
    "UniPic2MetaQueryEncode": "UniPic2 MetaQuery Encode",
    "UniPic2Understand": "UniPic2 Understand",
    "UniPic2TextEncode": "UniPic2 Text Encode",
    "UniPic2EditReference": "UniPic2 Edit Reference",
    "UniPic2Sampler": "UniPic2 Sampler",
    "UniPic2VAEEncode": "UniPic2 VAE Encode",
    "UniPic2VAEDecode": "UniPic2 VAE Decode",
}
