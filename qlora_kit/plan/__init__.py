"""plan/: will it fit? The VRAM estimate of a recipe before any weight loads (`python -m qlora_kit.plan`), the target
architectures it plans offline, the live-tensor count that checks it on a CPU, and the size of each GGUF type.
"""
