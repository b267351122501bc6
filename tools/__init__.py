"""Scripts run beside the pack, never imported by it: the demo and the ComfyUI host runner.

Run them from the repository root as modules (`python -m tools.demo`). This file makes `tools` a regular package, so
another `tools` on sys.path cannot stand in for it; ComfyUI, which imports only the pack's own __init__.py, never
loads it.
"""
