"""ComfyUI-UniPic2: Skywork UniPic 2.0 (Kontext DiT) text-to-image and editing nodes for ComfyUI.

Importing the pack registers node classes only; models load when a node runs.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
