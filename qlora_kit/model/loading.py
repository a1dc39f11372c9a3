"""The only module that knows about 4-bit: precision choice, loading model and tokenizer, LoRA.

Safe by default: no remote code unless the recipe asks, safetensors only unless the recipe allows
pickle, local files never sent anywhere.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_kit.distributed import current as current_processes
from qlora_kit.errors import UserError
from qlora_kit.recipe.schema import LoraSection, ModelSection, QuantSection, Recipe

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Precision:
    device: str
    """`cuda` or `cpu`."""
    compute_dtype: torch.dtype
    """dtype of the 4-bit matmuls and of the unquantized weights (embeddings, norms, head)."""

    @property
    def amp(self) -> str:
        """Mixed-precision mode for the trainer: `bf16`, `fp16` or `` (plain float32, as on a CPU: choose_precision
        never picks a 16-bit dtype there; tools/calibrate_plan.py does, to measure the GPU's bf16 path on a CPU)."""
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.compute_dtype, "")

    def describe(self) -> str:
        name = str(self.compute_dtype).removeprefix("torch.")
        if self.device == "cuda":
            return f"{torch.cuda.get_device_name()}, compute {name}, adapter weights float32"
        return f"CPU, compute {name}"


def choose_precision(quant: QuantSection) -> Precision:
    """bf16 where the GPU has it (Ampere+), fp16 on older GPUs (Turing/T4/GTX), fp32 on CPU."""
    if not torch.cuda.is_available():
        if quant.compute_dtype in ("bfloat16", "float16"):
            # CPU matmuls in half precision are slow and gain nothing; say so instead of obeying silently.
            raise UserError(f"quant.compute_dtype = '{quant.compute_dtype}' needs a CUDA GPU; none is visible.",
                            hint="Use compute_dtype = 'auto' (float32 on CPU).")
        return Precision("cpu", torch.float32)
    if quant.compute_dtype == "auto":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = DTYPES[quant.compute_dtype]
        if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise UserError(f"{torch.cuda.get_device_name(0)} has no bfloat16 support.",
                            hint="Set quant.compute_dtype = 'auto' or 'float16'.")
    return Precision("cuda", dtype)


def load_tokenizer(model: ModelSection):
    from transformers import AutoTokenizer

    location = model.tokenizer or model.name
    with _friendly_load_errors(location, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(location, revision=model.revision,
                                                  trust_remote_code=model.trust_remote_code)
    if tokenizer.pad_token is None:
        # Padding is masked out of the loss, so any token works; EOS is the conventional choice.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(recipe: Recipe, precision: Precision):
    """The frozen base model: 4-bit NF4 (double quant) unless the recipe turns quantization off."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    m, q = recipe.model, recipe.quant
    kwargs = dict(
        dtype=precision.compute_dtype,
        device_map=device_map(recipe, precision),
        attn_implementation=m.attn_implementation,
        trust_remote_code=m.trust_remote_code,
        use_safetensors=None if m.allow_pickle_weights else True,
    )
    if q.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=precision.compute_dtype,
            # Lets non-quantized modules (the input embedding) live on the CPU when the recipe asks.
            # Only with a GPU: on a CPU every module is "on the cpu", and this flag would then leave all of them
            # unquantized (16-bit LoRA, silently) instead of just the embedding.
            llm_int8_enable_fp32_cpu_offload=recipe.memory.embeddings_on_cpu and precision.device == "cuda",
            # FSDP shards parameters of one dtype: the packed 4-bit weights must be stored in the compute
            # dtype instead of uint8 so they can be flattened and sharded with the rest.
            bnb_4bit_quant_storage=precision.compute_dtype if recipe.distributed.fsdp else torch.uint8,
        )
    with base_weights(m, recipe.train.seed) as (location, revision), _friendly_load_errors(location, "model"):
        model = AutoModelForCausalLM.from_pretrained(location, revision=revision, **kwargs)
    # Record where the base really comes from (not a temporary folder): the adapter config keeps it.
    model.name_or_path = model.config._name_or_path = m.name
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    if precision.device == "cpu":
        keep_cpu_weights_trainable(model)
    return model


def keep_cpu_weights_trainable(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a Linear4bit's weight the first time it
    runs in eval mode without gradients (our evaluation), and the repacked path cannot train:
    the next training step fails with "a view of a leaf Variable ... in-place operation".
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def device_map(recipe: Recipe, precision: Precision) -> dict[str, int | str] | None:
    """Everything on the GPU (or CPU), except the input embedding when memory.embeddings_on_cpu asks:
    it is frozen and only looked up, so keeping it in RAM saves vocab x hidden x 2 bytes of VRAM."""
    if precision.device != "cuda":
        return {"": "cpu"}
    if recipe.distributed.fsdp:
        return None  # FSDP places and shards the weights itself
    gpu = current_processes().local_rank  # one process per GPU under torchrun / accelerate launch
    if recipe.memory.embeddings_on_cpu:
        return {"model.embed_tokens": "cpu", "": gpu}
    return {"": gpu}


@contextlib.contextmanager
def base_weights(model: ModelSection, seed: int) -> Iterator[tuple[str, str]]:
    """Where the base weights are: the recipe's location, or (init = random) a temporary folder
    holding seeded random weights for the same architecture, so quantization takes the normal path."""
    if model.init != "random":
        yield model.name, model.revision
        return
    with tempfile.TemporaryDirectory(prefix="qlora_kit-random-") as folder:
        # Written with safetensors directly: every rank of a multi-process run needs its own copy, and
        # transformers' save_pretrained writes on rank 0 only.
        from safetensors.torch import save_model

        base = random_model(model, seed)
        base.config.to_json_file(Path(folder) / "config.json")
        save_model(base, str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})
        yield folder, "main"


def random_model(model: ModelSection, seed: int, dtype: torch.dtype = torch.bfloat16):
    """The architecture from config.json with seeded random weights: the same seed gives the same weights,
    which is how merge rebuilds the base of a random-init run."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with _friendly_load_errors(model.name, "model config"):
        config = AutoConfig.from_pretrained(model.name, revision=model.revision,
                                            trust_remote_code=model.trust_remote_code)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=model.trust_remote_code)


def lora_config(lora: LoraSection):
    from peft import LoraConfig

    targets = lora.target_modules
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def linear_layer_names(model) -> list[str]:
    """The distinct names of the model's Linear layers (quantized ones included), e.g. q_proj, down_proj."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) or "Linear" in type(module).__name__})


def add_lora(model, lora: LoraSection, seed: int):
    """LoRA on the model, its A matrices drawn from `seed`: nothing else seeds the RNG before peft draws them (the
    trainer seeds only when it is built, after this), so two fresh runs would start from different adapters."""
    from peft import get_peft_model
    from transformers import set_seed

    set_seed(seed)
    try:
        return get_peft_model(model, lora_config(lora))
    except ValueError as e:
        if "target modules" in str(e).lower():
            raise UserError(f"lora.target_modules: {e}",
                            hint=f"Linear layers in this model: {', '.join(linear_layer_names(model))} (or use "
                                 "'all-linear').") from None
        raise


def keep_adapter_fp32(model) -> None:
    """Trainable adapter weights in float32.

    TRL casts adapters of quantized models to bfloat16; with fp16 mixed precision (GPUs without
    bf16) that fails ("Attempting to unscale FP16 gradients") and on CPU it costs precision for
    nothing. LoRA weights are tiny, so float32 master weights are the safe choice everywhere.
    """
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as their real parameter number."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if hasattr(param, "quant_state") or param.dtype == torch.uint8:
            n *= 2  # two 4-bit values per stored byte
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


@contextlib.contextmanager
def _friendly_load_errors(location: str, what: str):
    """Turn the loader's deep exceptions into one message naming the location and the fix."""
    local = Path(location).expanduser()
    if (location.startswith((".", "/", "~")) or local.exists()) and not local.exists():
        raise UserError(f"The {what} folder does not exist: {location}",
                        hint="Set model.name to a local folder with config.json, or a hub id.")
    if local.is_dir() and what != "tokenizer" and not (local / "config.json").is_file():
        raise UserError(f"{location} has no config.json, so it is not a model folder.",
                        hint="Point model.name at the folder that holds config.json and the weights.")
    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError, ImportError, KeyError) as e:
        text = str(e)
        if "trust_remote_code" in text:
            hint = "This model ships its own Python code. Set model.trust_remote_code = true only if you trust it."
        elif "safetensors" in text or ".bin" in text or "pytorch_model" in text:
            hint = ("Only safetensors weights are loaded by default. Convert the weights, or set "
                    "model.allow_pickle_weights = true if you trust the files.")
        elif os.environ.get("HF_HUB_OFFLINE") == "1":
            hint = "HF_HUB_OFFLINE=1 is set: download the model first or point model.name at a local folder."
        else:
            hint = "Check model.name / model.revision and your connection, or use a local folder."
        first_line = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        raise UserError(f"Could not load the {what} from {location}: {first_line}", hint=hint) from None
