"""config.json essentials of the models we target, for building architecture-exact random models
(benchmarks: memory and speed do not depend on weight values) and for planning offline."""

from __future__ import annotations

_QWEN2 = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu",
          "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 131072,
          "tie_word_embeddings": False, "bos_token_id": 151646, "eos_token_id": 151643}
_LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
          "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
          "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
          "bos_token_id": 128000, "eos_token_id": 128001}

# Values from each model's published config.json (see ../shared/GUIDE.md, "Architectures").
ARCHITECTURES: dict[str, dict] = {
    "r1-distill-qwen-1.5b": {**_QWEN2, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                             "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936},
    "r1-distill-qwen-7b": {**_QWEN2, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                           "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064},
    "r1-distill-llama-8b": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256},
}


def published_config(model_id: str) -> dict | None:
    """The built-in config.json of a target model named by its hub id (any owner, any case), else None."""
    name = model_id.rstrip("/").rsplit("/", 1)[-1].lower().removeprefix("deepseek-")
    return dict(ARCHITECTURES[name]) if name in ARCHITECTURES else None
