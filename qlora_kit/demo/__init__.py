"""demo/: the embedded demo, made by code in build.py: synthetic reasoning rows (data.jsonl), a small R1-style
tokenizer and a tiny Qwen2 (tiny-qwen2/). `recipes/demo.toml` trains on them offline, on a CPU, in a minute.
"""
