"""Scripts run beside the pack, never imported by it: the demo, the ComfyUI host runner and the README's node
reference writer.

Run them from the repository root as modules (`python -m tools.demo`), where the root comes first on sys.path. As a
regular package, `tools` is not merged with a namespace package of that name elsewhere; ComfyUI, which imports only
the pack's own __init__.py, never loads it.
"""
