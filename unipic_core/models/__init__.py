"""The networks and their files: the Kontext DiT and the trainable view of it, the SD3 text encoders, the MetaQuery
MLLM and conditioner, Qwen2.5-VL from one file, fp8 weights, LoRA files, and loading the official folders (strict
keys) found locally or on the hub."""
