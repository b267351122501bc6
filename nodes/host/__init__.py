"""The pack's ComfyUI side, one concern per module; node classes (nodes/*_nodes.py) go through it, never around it.

memory: ComfyUI's memory manager (ModelPatcher wrapping, loading on the device, LoRA weight patches, autograd for
training, the loaders' cache), with partial_loading for the pack's own modules. progress: the progress bar, latent
previews and Cancel. messages: training messages to the browser. folders: model folders, the input folder, LoRA
files and downloads. bundles, conditioning and the native_* modules: the pack's graph types, CONDITIONING, and its
models on ComfyUI's native MODEL / VAE / sampling / training.
"""
