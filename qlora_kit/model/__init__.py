"""model/: the only package that knows about 4-bit. Precision for the GPU found, loading the model and tokenizer,
LoRA, a GGUF file as the base, the pre-flight checks that refuse a model before anything loads, tiled MLP.
"""
