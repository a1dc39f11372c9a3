"""Load what a user wants to talk to: a run directory (its base as the run loaded it + the adapter) or a merged
folder (a plain transformers model). Used by chat and by the evaluation.

    run dir     adapter/ + recipe.toml, as `qlora_kit.run` leaves it: the base is loaded as the run loaded it
                (4-bit, or rebuilt from its seed for model.init = "random") and the adapter goes on top
    merged dir  config.json + safetensors (`qlora_kit.merge`): a plain transformers model, 16-bit on a GPU,
                float32 on the CPU
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_kit.errors import UserError
from qlora_kit.recipe.run_files import ADAPTER_DIR, RECIPE_FILE

if TYPE_CHECKING:  # generate imports torch and transformers: `--help` and the folder checks stay instant
    from qlora_kit.chat.generate import PromptFormat


@dataclass(frozen=True)
class Source:
    kind: str
    """`run` or `merged`."""
    dir: Path


@dataclass
class Loaded:
    model: object
    tokenizer: object
    fmt: PromptFormat
    """How questions are rendered (as in training) and replies split."""
    description: str


def locate(path: Path) -> Source:
    """Decide what the folder is, before anything heavy is loaded; refuse what is neither."""
    if not path.exists():
        raise UserError(f"Not found: {path}", hint="Pass a run directory (output.dir of a run) or a merged folder.")
    if not path.is_dir():
        raise UserError(f"{path} is a file, not a folder.",
                        hint="Pass a run directory (output.dir of a run) or a merged model folder.")
    if (path / "adapter_config.json").is_file() and (path.parent / RECIPE_FILE).is_file():
        path = path.parent  # RUN/adapter given: the run around it says how to load the base
    if (path / RECIPE_FILE).is_file():
        if not (path / ADAPTER_DIR / "adapter_config.json").is_file():
            raise UserError(f"{path} holds an unfinished run: {ADAPTER_DIR}/ is written when training ends.",
                            hint="Re-run the same `python -m qlora_kit.run` command to resume and finish it.")
        return Source("run", path)
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return Source("merged", path)
    if (path / "adapter_config.json").is_file():
        raise UserError(f"{path} is a bare adapter without its run's {RECIPE_FILE}.",
                        hint="Pass the run directory that holds it: its recipe says how to load the base.")
    raise UserError(f"{path} is neither a run directory nor a merged model folder.",
                    [f"a run directory has {ADAPTER_DIR}/ and {RECIPE_FILE}",
                     "a merged folder has config.json and *.safetensors weights"],
                    hint="Pass the output.dir of a finished run, or the --out folder of `python -m qlora_kit.merge`.")


def load_run(run_dir: Path) -> Loaded:
    """The base as the run loaded it (4-bit, same seed for random-init) + the run's adapter and tokenizer."""
    from qlora_kit.chat.generate import prompt_format
    from qlora_kit.model.gguf_base import prepare_gguf_base
    from qlora_kit.model.loading import choose_precision, load_model, load_tokenizer
    from qlora_kit.model.preflight import check_model_files
    from qlora_kit.recipe.loading import load_recipe

    recipe = inference_recipe(load_recipe(run_dir / RECIPE_FILE))
    adapter_dir = run_dir / ADAPTER_DIR
    prepare_gguf_base(recipe.model, weights=True)  # a GGUF base: its 16-bit folder, rebuilt if the cache lost it
    check_model_files(recipe.model)
    precision = choose_precision(recipe.quant)
    # The tokenizer the run saved beside its adapter: the one it trained with, chat template included.
    tokenizer = load_tokenizer(dataclasses.replace(recipe.model, tokenizer=str(adapter_dir)))
    model = with_adapter(load_model(recipe, precision), adapter_dir)
    model.eval()
    base = "RANDOM-INIT base (demo: expect nonsense)" if recipe.model.init == "random" else "base"
    bits = "4-bit" if recipe.quant.load_in_4bit else "16-bit"
    return Loaded(model, tokenizer, prompt_format(tokenizer, recipe.data),
                  f"run {run_dir}: {base} {recipe.model.display_name} ({bits}) + adapter; {precision.describe()}")


def inference_recipe(recipe):
    """The run's recipe, fitted to one process on this machine. Sharding (FSDP) is for training across GPUs,
    and a GPU run's bfloat16/float16 compute dtype is refused on a CPU: float32 there instead."""
    import torch

    recipe = copy.deepcopy(recipe)
    recipe.distributed.fsdp = False
    if not torch.cuda.is_available():
        recipe.quant.compute_dtype = "auto"
    return recipe


def with_adapter(base, adapter_dir: Path):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, adapter_dir)
    except (OSError, ValueError, RuntimeError) as e:  # missing/corrupt files, shapes that do not match the base
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"Could not load the adapter in {adapter_dir}: {first_line}",
                        hint="The adapter must come from this run's recipe and base model.") from None


def load_merged(folder: Path) -> Loaded:
    """A plain transformers model folder: 16-bit on a GPU (bfloat16 where supported), float32 on the CPU.
    Loaded through qlora_kit.model.loading with quantization off, so the same safety checks apply (safetensors only,
    no remote code)."""
    from qlora_kit.chat.generate import prompt_format
    from qlora_kit.model.loading import choose_precision, load_model, load_tokenizer
    from qlora_kit.model.preflight import check_model_files
    from qlora_kit.recipe.loading import load_recipe
    from qlora_kit.recipe.schema import TRAINING_RECIPE_FILE, ModelSection, QuantSection, Recipe

    recipe = Recipe(model=ModelSection(name=str(folder)), quant=QuantSection(load_in_4bit=False))
    check_model_files(recipe.model)
    precision = choose_precision(recipe.quant)
    tokenizer = load_tokenizer(recipe.model)
    model = load_model(recipe, precision)
    model.eval()
    # qlora_kit's merge puts the run's recipe beside the weights: prompts in the format the model was trained on,
    # and the demo's random-init base labelled as such. A merged folder from elsewhere: its chat template and no
    # system prompt, R1's recommendation.
    trained_with = Path(folder) / TRAINING_RECIPE_FILE
    trained = load_recipe(trained_with) if trained_with.is_file() else None
    demo = trained is not None and trained.model.init == "random"
    label = "merged model (RANDOM-INIT base, demo: expect nonsense)" if demo else "merged model"
    return Loaded(model, tokenizer, prompt_format(tokenizer, trained.data if trained else None),
                  f"{label} {folder}; {precision.describe()}")
