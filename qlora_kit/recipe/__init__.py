"""recipe/: what the user asked for. The schema (one documented field per setting), reading and validating TOML
with `key=value` overrides, the files a run writes, and the SFTConfig arguments derived from a recipe.

The first stage: it imports nothing of qlora_kit but `errors`.
"""
