"""The base checkpoint the adapter is folded into: found (a local folder, the hub cache, or the run's
random-init weights rebuilt from its seed) and indexed from the weight files' headers alone, so that tensors
are later read one at a time. A pre-quantized bitsandbytes 4-bit base gets its quantization states recorded."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qlora_kit.errors import UserError
from qlora_kit.merge.hub import hub_file, hub_offline
from qlora_kit.merge.tokenizer_files import TOKENIZER_FILES

BNB_AUX_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                    ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")


@dataclass(frozen=True)
class TensorInfo:
    file: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class Checkpoint:
    """A model folder's weights, described from the file headers alone (no tensor is read)."""

    folder: Path
    files: list[str]
    tensors: dict[str, TensorInfo]
    config: dict
    pickled: bool
    origin: str
    """Where the weights come from, in words (shown in the output and the model card)."""
    random_init: bool = False
    bnb_states: dict[str, dict[str, str]] = field(default_factory=dict)
    """Pre-quantized bitsandbytes 4-bit base: weight name -> {quantization-state tensor: its file}."""
    _pickle_cache: tuple = field(default=(None, None), repr=False)

    @property
    def quantization(self) -> dict | None:
        return self.config.get("quantization_config")

    def read(self, name: str, file: str | None = None) -> torch.Tensor:
        """One tensor, read on its own: memory holds what the caller keeps, never a whole weight file."""
        path = self.folder / (file or self.tensors[name].file)
        if self.pickled:
            # Unpickling the file's index is the slow part, so the current file stays memory-mapped; cloned
            # because tied weights share storage in .bin files, and safetensors refuses to save shared tensors.
            if self._pickle_cache[0] != path:
                self._pickle_cache = (path, torch.load(path, map_location="cpu", mmap=True, weights_only=True))
            return self._pickle_cache[1][name].clone()
        from safetensors import safe_open

        # A fresh memory map per tensor: the pages it touched leave our RSS when it closes.
        with safe_open(path, framework="pt", device="cpu") as f:
            return f.get_tensor(name)


def locate_base(recipe, base_override: str | None, revision: str, stack: contextlib.ExitStack, console) -> Checkpoint:
    """The base's weights: --base, the recipe's model, or (init = random) the run's seeded random weights."""
    model = recipe.model
    if base_override is None and model.init == "random":
        return rebuild_random_base(recipe, stack, console)
    name, rev = (base_override, revision) if base_override else (model.name, model.revision)
    folder = resolve_model_folder(name, rev, model.allow_pickle_weights)
    origin = name
    if model.gguf_file and not base_override:
        origin = f"{Path(model.gguf_file).name} dequantized ({folder})"
        console.print(f"[bold yellow]base:[/] the run's base is the GGUF file {Path(model.gguf_file).name}: merging "
                      "into its dequantized weights, the only 16-bit base there is (they carry that file's rounding).")
    return read_checkpoint(folder, model.allow_pickle_weights, origin=origin)


def rebuild_random_base(recipe, stack: contextlib.ExitStack, console) -> Checkpoint:
    from qlora_kit.model.loading import random_model

    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qlora_kit-merge-base-")))
    console.print(f"[bold yellow]base:[/] the run used model.init = 'random': rebuilding its RANDOM-INIT weights "
                  f"from {recipe.model.name} with seed {recipe.train.seed} (same seed, same weights) in a temporary "
                  "folder. The result is a demo model, not a useful one.")
    random_model(recipe.model, recipe.train.seed).save_pretrained(folder)
    checkpoint = read_checkpoint(folder, False, origin=f"{recipe.model.name} (random init, seed {recipe.train.seed})")
    checkpoint.random_init = True
    return checkpoint


def resolve_model_folder(name: str, revision: str, allow_pickle: bool) -> Path:
    """A local folder as is; a hub id through the huggingface_hub cache (HF_HUB_OFFLINE is respected)."""
    from qlora_kit.recipe.schema import is_local_reference

    if is_local_reference(name, Path.cwd()):
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise UserError(f"Base model folder not found: {name}",
                            hint="Pass --base with the folder (or hub id) that holds the base weights.")
        return folder
    config = hub_file(name, revision, "config.json", required=True)
    folder = config.parent
    index = hub_file(name, revision, "model.safetensors.index.json")
    if index is not None:
        for file in sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())):
            hub_file(name, revision, file, required=True)
    elif hub_file(name, revision, "model.safetensors") is None:
        if not allow_pickle:
            where = " in the local cache (HF_HUB_OFFLINE is set)" if hub_offline() else ""
            raise UserError(f"{name} (revision {revision}) has no safetensors weights{where}.",
                            hint="Only safetensors are loaded by default. If the model ships only .bin (pickle) files "
                                 "and you trust them, set model.allow_pickle_weights = true in the run's recipe.toml.")
        index = hub_file(name, revision, "pytorch_model.bin.index.json")
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())) if index else [
            "pytorch_model.bin"]
        for file in files:
            hub_file(name, revision, file, required=True)
    for file in ("generation_config.json", *TOKENIZER_FILES):
        hub_file(name, revision, file)
    return folder


def read_checkpoint(folder: Path, allow_pickle: bool, origin: str) -> Checkpoint:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{folder} has no config.json, so it is not a model folder.",
                        hint="Pass --base with the folder that holds config.json and the weights.")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    files, pickled = weight_files(folder, allow_pickle)
    checkpoint = Checkpoint(folder.resolve(), files, {}, config, pickled, origin)
    for file in files:
        for name, (shape, dtype) in scan_weight_file(folder / file, pickled).items():
            checkpoint.tensors[name] = TensorInfo(file, shape, dtype)
    find_bnb_states(checkpoint)
    return checkpoint


def scan_weight_file(path: Path, pickled: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor in one file, from its header (safetensors) or memory map (.bin)."""
    if pickled:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return {name: (tuple(t.shape), t.dtype) for name, t in state.items()}
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        slices = {name: f.get_slice(name) for name in f.keys()}  # noqa: SIM118 - safe_open is not a dict
        return {name: (tuple(v.get_shape()), SAFETENSORS_DTYPES.get(v.get_dtype(), torch.uint8))
                for name, v in slices.items()}


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def weight_files(folder: Path, allow_pickle: bool) -> tuple[list[str], bool]:
    """The weight files of a model folder and whether they are pickle (.bin) files."""
    for index_name, single, pickled in (("model.safetensors.index.json", "model.safetensors", False),
                                        ("pytorch_model.bin.index.json", "pytorch_model.bin", True)):
        if (folder / index_name).is_file():
            files = sorted(set(json.loads((folder / index_name).read_text(encoding="utf-8"))["weight_map"].values()))
        elif (folder / single).is_file():
            files = [single]
        else:
            continue
        if pickled and not allow_pickle:
            raise UserError(f"{folder} holds only .bin (pickle) weights; pickle can run arbitrary code.",
                            hint="Convert the weights to safetensors, or set model.allow_pickle_weights = true in the "
                                 "run's recipe.toml if you trust the files.")
        return files, pickled
    raise UserError(f"{folder} has no model weights (model.safetensors or model.safetensors.index.json).",
                    hint="Pass --base with the folder (or hub id) that holds the 16-bit base weights.")


def find_bnb_states(checkpoint: Checkpoint) -> None:
    """Pre-quantized bitsandbytes 4-bit bases store each weight as packed bytes plus state tensors: record
    them, and give the weight its real (dequantized) shape and dtype."""
    states = [n for n in checkpoint.tensors if n.endswith((".quant_state.bitsandbytes__nf4",
                                                           ".quant_state.bitsandbytes__fp4"))]
    if not states:
        return
    from bitsandbytes.utils import unpack_tensor_to_dict

    for name in states:
        weight = name.split(".quant_state.")[0]
        state = unpack_tensor_to_dict(checkpoint.read(name))
        aux_names = [weight + s for s in BNB_AUX_SUFFIXES if weight + s in checkpoint.tensors]
        checkpoint.bnb_states[weight] = {aux: checkpoint.tensors[aux].file for aux in aux_names}
        checkpoint.tensors[weight] = dataclasses.replace(checkpoint.tensors[weight], shape=tuple(state["shape"]),
                                                         dtype=getattr(torch, state["dtype"]))
    for aux_files in checkpoint.bnb_states.values():
        for aux in aux_files:
            del checkpoint.tensors[aux]  # folded into their weight: not written to the output
