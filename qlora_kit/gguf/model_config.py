"""config.json as every GGUF writer reads it: which llama.cpp architecture the model is, and its
hyper-parameters. The full-model export (export.py), the adapter export (adapter.py) and the tensor planner
(tensors.py) all start from these, so they live here, below all three."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qlora_kit.errors import UserError


@dataclass(frozen=True)
class Architecture:
    gguf_name: str        # gguf.MODEL_ARCH member name
    permute_qk: bool      # llama.cpp's converter permutes q/k rows for the Llama family only


ARCHITECTURES = {
    "Qwen2ForCausalLM": Architecture("QWEN2", permute_qk=False),
    "LlamaForCausalLM": Architecture("LLAMA", permute_qk=True),
}


@dataclass(frozen=True)
class HyperParameters:
    context_length: int
    embedding_length: int
    block_count: int
    feed_forward_length: int
    head_count: int
    head_count_kv: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    vocab_size: int
    rope_scaling: dict  # rope_type and its settings; {"rope_type": "default"} when unscaled
    tied_embeddings: bool = False  # the output layer is the embedding matrix (SmolLM2, Qwen2.5 <= 3B)


def read_config(folder: Path) -> tuple[dict, Architecture]:
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{folder} is not a model folder: it has no config.json",
                        hint="Pass the folder that tools/merge.py wrote (config.json, *.safetensors, tokenizer files).")
    config = json.loads(path.read_text(encoding="utf-8"))
    names = config.get("architectures") or []
    supported = [name for name in names if name in ARCHITECTURES]
    if not supported:
        raise UserError(f"cannot export architecture {names or config.get('model_type')!r} to GGUF",
                        [f"supported: {', '.join(ARCHITECTURES)} (DeepSeek-R1-Distill-Qwen and -Llama)"])
    if config.get("quantization_config"):
        raise UserError("the model folder holds quantized weights (config.json has a quantization_config)",
                        hint="Export the 16-bit folder tools/merge.py writes, not a 4-bit checkpoint.")
    return config, ARCHITECTURES[supported[0]]


def rope_settings(config: dict) -> tuple[float, dict]:
    """(rope theta, scaling) from either spelling: transformers 5 nests both in `rope_parameters`, the
    config.json files the R1 checkpoints ship (transformers 4) have `rope_theta` and `rope_scaling`."""
    parameters = dict(config.get("rope_parameters") or {})
    theta = parameters.pop("rope_theta", config.get("rope_theta", 10000.0))
    scaling = {**(config.get("rope_scaling") or {}), **parameters}
    scaling["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
    return float(theta), scaling


def hyper_parameters(config: dict) -> HyperParameters:
    heads = config["num_attention_heads"]
    theta, scaling = rope_settings(config)
    return HyperParameters(
        context_length=config["max_position_embeddings"],
        embedding_length=config["hidden_size"],
        block_count=config["num_hidden_layers"],
        feed_forward_length=config["intermediate_size"],
        head_count=heads,
        head_count_kv=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        rope_theta=theta,
        rms_norm_eps=config["rms_norm_eps"],
        vocab_size=config["vocab_size"],
        rope_scaling=scaling,
        # absent in older config.json files: LlamaConfig's and Qwen2Config's default is untied
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
    )
