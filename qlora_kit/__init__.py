"""qlora_kit: QLoRA fine-tuning of reasoning LLMs on 8 GB GPUs, driven by one TOML recipe."""

__version__ = "0.1.0"
