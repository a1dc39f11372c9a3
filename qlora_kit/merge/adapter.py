"""The run's PEFT adapter, read and validated: the LoRA modules it holds, each with its A, B (and DoRA
magnitude) and its scale from r and alpha (rsLoRA, rank/alpha patterns). Any setting that would make a plain
low-rank merge wrong is refused here, by name, before the base is even looked at."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_kit.errors import UserError

ADAPTER_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|"
                         r"lora_magnitude_vector)$")
# adapter_config.json keys that choose which layers were adapted or how training ran: the saved A, B (and
# DoRA magnitude) already carry their effect, so they do not change the merge.
NEUTRAL_ADAPTER_KEYS = {
    "peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "target_modules",
    "exclude_modules", "layers_to_transform", "layers_pattern", "lora_dropout", "base_model_name_or_path",
    "revision", "task_type", "inference_mode", "peft_version", "auto_mapping", "megatron_core",
    "init_lora_weights", "qalora_group_size", "ensure_weight_tying",
}
# Initialisations that leave the base untouched (PiSSA, OLoRA, CorDA, LoftQ, ... rewrite the base weights).
PLAIN_INITS = (True, False, "gaussian", "eva")
UNSET = (None, False, "", "none", {}, [])


@dataclass
class LoraModule:
    """One adapted Linear layer as the adapter file stores it."""

    name: str
    """Module path in the base model, e.g. model.layers.0.self_attn.q_proj (its weight is `<name>.weight`)."""
    a: torch.Tensor
    """(r, in_features)"""
    b: torch.Tensor
    """(out_features, r)"""
    scale: float
    magnitude: torch.Tensor | None = None
    """DoRA: the trained norm of each output row."""

    def merge_into(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` (float32) with the update folded in, the same arithmetic as peft's merge."""
        merged = weight + self.scale * (self.b.float() @ self.a.float())
        if self.magnitude is not None:
            # DoRA: each output row is rescaled to its trained magnitude (peft DoraLinearVariant.merge_unsafe).
            merged = (self.magnitude.float() / torch.linalg.norm(merged, dim=1)).unsqueeze(1) * merged
        return merged


@dataclass
class Adapter:
    folder: Path
    config: dict
    modules: dict[str, LoraModule]

    @property
    def kind(self) -> str:
        kind = "DoRA" if self.config.get("use_dora") else "LoRA"
        return f"rs{kind}" if self.config.get("use_rslora") else kind

    def describe(self) -> str:
        c = self.config
        rule = "alpha/sqrt(r)" if c.get("use_rslora") else "alpha/r"
        scales = sorted({m.scale for m in self.modules.values()})
        scale = f"{scales[0]:g}" if len(scales) == 1 else f"{scales[0]:g} to {scales[-1]:g} (rank/alpha patterns)"
        return f"{self.kind} r={c['r']} alpha={c['lora_alpha']} (scale {rule} = {scale}) on {len(self.modules)} layers"


def read_adapter(folder: Path, allow_pickle: bool) -> Adapter:
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise UserError(f"{folder} has no adapter_config.json.", hint="The run's adapter/ folder looks incomplete.")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    problems = adapter_config_problems(config)
    if problems:
        raise UserError(f"This adapter cannot be merged exactly ({folder}):", problems,
                        hint="merge folds plain low-rank updates (LoRA, rsLoRA, DoRA) of Linear layers only.")
    state = load_adapter_tensors(folder, allow_pickle)
    return Adapter(folder, config, group_lora_modules(state, config, folder))


def adapter_config_problems(config: dict) -> list[str]:
    """Every adapter setting that would make a plain low-rank merge wrong, each named."""
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}; only LORA adapters are merged")
    if config.get("init_lora_weights", True) not in PLAIN_INITS:
        problems.append(f"init_lora_weights = {config['init_lora_weights']!r} rewrites the base weights at "
                        "initialisation, so the adapter only fits that rewritten base")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save = {config['modules_to_save']} (whole retrained layers) is not supported")
    for key, value in config.items():
        if key in NEUTRAL_ADAPTER_KEYS or key == "modules_to_save" or value in UNSET:
            continue
        problems.append(f"{key} = {value!r} changes what the adapter computes; merge does not support it")
    return problems


def load_adapter_tensors(folder: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (folder / "adapter_model.safetensors").is_file():
        return load_file(folder / "adapter_model.safetensors")
    if (folder / "adapter_model.bin").is_file():
        if not allow_pickle:
            raise UserError(f"{folder} holds adapter_model.bin (pickle), not safetensors.",
                            hint="Set model.allow_pickle_weights = true in the run's recipe.toml if you trust it.")
        return torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise UserError(f"{folder} has no adapter_model.safetensors.", hint="The run's adapter/ folder looks incomplete.")


def group_lora_modules(state: dict[str, torch.Tensor], config: dict, folder: Path) -> dict[str, LoraModule]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state.items():
        match = ADAPTER_KEY.match(key)
        if match is None:
            unknown.append(key)
            continue
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    if unknown:
        raise UserError(f"The adapter in {folder} holds tensors that are not LoRA updates of Linear layers:",
                        unknown[:5] + ([f"... and {len(unknown) - 5} more"] if len(unknown) > 5 else []),
                        hint="Embedding LoRA, LoRA biases and fully trained modules are not merged.")
    modules, problems = {}, []
    for name, p in sorted(parts.items()):
        a, b = p.get("lora_A.weight"), p.get("lora_B.weight")
        if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            problems.append(f"{name}: lora_A/lora_B missing or not a (r x in), (out x r) pair")
            continue
        r, alpha = rank_and_alpha(config, name)
        if r != a.shape[0]:
            problems.append(f"{name}: adapter_config says r = {r} but lora_A has rank {a.shape[0]}")
            continue
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        magnitude = p.get("lora_magnitude_vector")
        if config.get("use_dora") and magnitude is None:
            problems.append(f"{name}: use_dora is set but lora_magnitude_vector is missing")
            continue
        modules[name] = LoraModule(name, a, b, scale, magnitude if config.get("use_dora") else None)
    if problems or not modules:
        raise UserError(f"The adapter in {folder} is inconsistent:", problems or ["it holds no LoRA weights"])
    return modules


def rank_and_alpha(config: dict, module_name: str) -> tuple[int, float]:
    """r and alpha of one module, resolving rank_pattern/alpha_pattern exactly as peft does."""
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    if not rank_pattern and not alpha_pattern:
        return config["r"], config["lora_alpha"]
    from peft.utils.other import get_pattern_key  # importing peft costs seconds: only when patterns are used

    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module_name), config["r"])
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module_name), config["lora_alpha"])
    return r, alpha
