"""The recipe: one typed, documented field per setting, loaded from TOML with `key=value` overrides.

Loading reports *every* problem at once (unknown keys with a "did you mean", wrong types,
impossible values), each naming its key, so a user fixes a recipe in one round trip.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from qlora_kit.errors import UserError


@dataclass
class ModelSection:
    name: str = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    """Base model: a hub id, a local directory, or a `.gguf` file (llama.cpp / Ollama / LM Studio), which is
    dequantized once into a 16-bit folder in the cache and quantized to NF4 for training as usual (relative paths
    are read from the recipe's folder). The resolved recipe names that folder here and the file in `gguf_file`."""
    gguf_file: str = ""
    """The GGUF file of the base, when model.name is the folder (or hub id) that holds it. Set from model.name
    when that names a .gguf file."""
    revision: str = "main"
    """Hub revision (branch, tag or commit) of the base model; ignored for local directories."""
    tokenizer: str = ""
    """Where the tokenizer lives, when not beside the model. Empty: the model's own."""
    init: str = "pretrained"
    """`pretrained` loads the weights; `random` builds the architecture from config.json with seeded
    random weights (demo and benchmarks only: the status output says so)."""
    trust_remote_code: bool = False
    """Run Python code shipped with the model. Off: only architectures transformers knows are loaded."""
    allow_pickle_weights: bool = False
    """Load `.bin`/`.pt` weights (pickle can run arbitrary code). Off: safetensors only."""
    hub: str = "huggingface"
    """Where a hub model id is downloaded from: `huggingface` (honours the HF_ENDPOINT mirror variable) or
    `modelscope` (needs `pip install "qlora_kit[modelscope]"`; the same ids, e.g.
    deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B). Ignored for local folders and .gguf files."""
    attn_implementation: str = "sdpa"
    """Attention kernel: `sdpa` (PyTorch, works everywhere), `eager`, or `flash_attention_2` if installed."""

    @property
    def display_name(self) -> str:
        """What the user named: the GGUF file, else the folder or hub id's last part."""
        return Path(self.gguf_file or self.name).name


@dataclass
class QuantSection:
    load_in_4bit: bool = True
    """Quantize the frozen base weights to 4 bits (QLoRA). Off: plain 16-bit LoRA."""
    quant_type: str = "nf4"
    """4-bit data type: `nf4` (normal float, the QLoRA default) or `fp4`."""
    double_quant: bool = True
    """Quantize the quantization constants too: saves about 0.4 bits a parameter."""
    compute_dtype: str = "auto"
    """dtype of the matmuls: `auto` = bfloat16 where the GPU supports it, else float16 (with float32
    adapter weights), float32 on CPU; or `bfloat16`, `float16`, `float32`."""


@dataclass
class LoraSection:
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (the update is scaled by alpha / r, or alpha / sqrt(r) with rsLoRA)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Modules that get adapters: `all-linear` (every linear layer but the output head) or a list of
    names such as ["q_proj", "v_proj"]."""
    use_rslora: bool = False
    """Rank-stabilised LoRA scaling (alpha / sqrt(r)): better for large ranks."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA): a little better quality, slower and more memory."""


@dataclass
class DataSection:
    source: str = "FreedomIntelligence/medical-o1-reasoning-SFT"
    """A local .jsonl/.json/.csv/.parquet file (relative paths are read from the recipe's folder) or a
    hub data set id."""
    config: str = "en"
    """Hub data set configuration (medical-o1: `en`, `zh`, `en_mix`); ignored for local files."""
    split: str = "train"
    """Hub data set split to read; ignored for local files."""
    hub: str = "huggingface"
    """Where a hub data set id is looked up: `huggingface` (honours the HF_ENDPOINT mirror variable) or
    `modelscope` (needs `pip install "qlora_kit[modelscope]"`). Ignored for local files."""
    layout: str = "auto"
    """How a row holds the question and answer: `columns` (the three columns below), `alpaca` (`instruction` +
    `input` -> the question, `output` -> the answer), `sharegpt` (a `conversations` or `messages` list with one user
    and one assistant turn, `from`/`value` or `role`/`content`). In `alpaca` and `sharegpt` an answer holding
    `<think>...</think>answer` (as R1-distilled sets ship it) is split into reasoning and answer. `auto`: `columns`
    when data.question_column is in the data, else whichever of the other two the columns show."""
    question_column: str = "Question"
    """Column holding the user's question."""
    cot_column: str = "Complex_CoT"
    """Column holding the reasoning (chain of thought); empty string if the data has none."""
    response_column: str = "Response"
    """Column holding the final answer."""
    format: str = "chat"
    """`chat`: the model's own chat template for the prompt, reasoning inside <think> ... </think>.
    `plain`: a simple text layout for models without a chat template. Anything else is a template
    with {question}, {cot}, {response} placeholders; loss is on everything from {cot} on."""
    system_prompt: str = ""
    """System message for the chat format (DeepSeek recommends none for R1 models)."""
    max_length: int = 2048
    """Longest training sequence in tokens (prompt + reasoning + answer)."""
    over_length: str = "drop"
    """What to do with rows longer than max_length: `drop` them (counted and reported), stop with an
    `error`, or `truncate` them (cuts the end of the answer; reported)."""
    limit: int = 0
    """Use only the first N rows after shuffling (0 = all)."""
    shuffle: bool = True
    """Shuffle rows (with train.seed) before limit and the eval split, and the batches of every epoch.
    Off: the file's order throughout (no length grouping either)."""
    eval_rows: int = 0
    """Rows held out for evaluation loss (0 = no evaluation)."""


@dataclass
class TrainSection:
    epochs: float = 1.0
    """Passes over the training rows (ignored when max_steps > 0)."""
    max_steps: int = 0
    """Optimizer steps to run; 0 = decided by epochs."""
    batch_size: int = 1
    """Sequences per forward pass (per GPU)."""
    grad_accum: int = 8
    """Forward passes per optimizer step: the effective batch is batch_size x grad_accum."""
    learning_rate: float = 2e-4
    """Peak learning rate of the adapter."""
    lr_scheduler: str = "cosine"
    """Learning-rate schedule: `cosine`, `linear`, `constant`, `constant_with_warmup`."""
    warmup: float = 0.03
    """Warm-up: a fraction of all steps when below 1, else a number of steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 = off)."""
    optim: str = "auto"
    """Optimizer: `auto` = paged 8-bit AdamW on CUDA, AdamW on CPU; or any transformers name
    (`adamw_torch`, `adamw_8bit`, `paged_adamw_8bit`, ...)."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass: much less memory for about 30% more time."""
    group_by_length: bool = True
    """Batch rows of similar length together so dynamic padding wastes little."""
    logging_steps: int = 1
    """Log loss, learning rate and memory every N optimizer steps."""
    eval_steps: int = 0
    """Evaluate every N steps (0 = only at the end; needs data.eval_rows > 0)."""
    seed: int = 42
    """Seed for shuffling, LoRA initialisation, dropout and random-init models. On a CPU, two runs of the same
    recipe on the same machine give the same losses bit for bit (README: "Repeatable runs")."""
    deterministic: bool = False
    """Ask PyTorch for deterministic kernels everywhere (transformers' enable_full_determinism: deterministic
    algorithms, cuDNN, a fixed cuBLAS workspace). Changes nothing on a CPU, where runs already repeat; on a GPU it
    is slower, and kernels outside PyTorch (bitsandbytes, flash-attention) are not covered by it."""
    save_steps: int = 50
    """Write a checkpoint (adapter, optimizer, scheduler, RNG, data position) every N steps; 0 = only when
    interrupted. Re-running the same command resumes from the newest complete one."""
    save_total_limit: int = 2
    """Checkpoints kept (older ones are deleted once a newer one is complete)."""


@dataclass
class MemorySection:
    offload_activations: bool = False
    """Keep the checkpointed layer inputs in CPU RAM instead of VRAM (TRL activation offloading): long
    sequences fit in less VRAM, at some speed cost. Off until measured on GPUs (tools/bench.py)."""
    embeddings_on_cpu: bool = False
    """Keep the frozen input-embedding matrix in CPU RAM (about 1 GB for a 7B model), with accelerate's CPU
    offload: it is copied to the GPU for the embedding lookup at the start of each forward pass and freed right
    after, so it is not in VRAM at the step's peak (the backward pass). Costs one ~1 GB copy per micro-batch."""
    tiled_mlp: bool = False
    """Run each decoder MLP over 1,024-token slices of the sequence, so its wide intermediate tensors exist for
    one slice at a time: the step's peak grows much more slowly with max_length. Costs one extra MLP forward per
    step (about 1/6 more matmul work). Same loss and gradients (with LoRA dropout: masks drawn per slice, reused by
    the backward). Off until measured on GPUs."""


TILED_MLP_SLICE_TOKENS = 1024
"""memory.tiled_mlp's slice. Its MLP intermediates then take ~0.27 GB on R1-Distill-Qwen-7B (bf16) instead of
~1.1 GB at 4,096 tokens, while each slice's matmuls stay large enough (1,024 x 3,584 x 18,944 on the 7B) that
dequantizing the 4-bit weights once more per slice is a small extra cost next to the matmul itself."""


@dataclass
class DistributedSection:
    fsdp: bool = False
    """Shard the 4-bit model across the GPUs of one machine (FSDP-QLoRA), for models that do not fit
    one GPU even in 4 bits. Launch with torchrun or accelerate launch (it also runs on CPUs over gloo,
    which is how it is tested). Without it, several GPUs train data-parallel, each holding a full 4-bit copy."""


@dataclass
class OutputSection:
    dir: str = "runs/medical"
    """Run directory for the adapter and reports (relative paths: from where you run the command)."""
    overwrite: bool = False
    """Allow writing into a directory that already holds a finished run."""
    preview_rows: int = 3
    """Examples written to preview.jsonl by --dry-run."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that also receive the logs, through transformers' own integrations: any of
    `tensorboard` (written to output.dir/tensorboard), `wandb`, `mlflow`, `trackio`, each its package installed
    (`pip install "qlora_kit[tensorboard]"`, ...). Loss, eval loss, learning rate, memory and tokens/s are logged."""


@dataclass
class SamplesSection:
    count: int = 3
    """Questions answered at the end of the run by the base (adapter off) and the fine-tuned model
    (adapter on), side by side and in samples.md; held-out eval rows when there are any. 0 = none."""
    max_new_tokens: int = 1024
    """Longest reply, reasoning included: R1 models think for hundreds of tokens before they answer."""
    greedy: bool = False
    """Greedy decoding (reproducible) instead of DeepSeek's R1 sampling (temperature 0.6, top_p 0.95, seeded)."""


@dataclass
class EvalSection:
    tasks: str = ""
    """Multiple-choice benchmarks scored at the end of the run, base vs fine-tuned: lm-evaluation-harness task
    names, comma-separated, e.g. "medqa_4options,cmmlu_clinical_knowledge" (needs `pip install "qlora_kit[eval]"`
    and the tasks' data from the hub). Empty: none."""
    file: str = ""
    """Your own multiple-choice questions, scored the same way: a .jsonl of question, options, answer (the
    README's evaluation section shows the layout); relative paths are read from the recipe's folder. Empty: none."""
    limit: int = 0
    """Score only the first N questions of each task and of the file. 0: all of them."""
    generate: bool = False
    """Also let the model reason and write its answer, and read the chosen letter after </think> (slow: one reply
    per question and side, up to samples.max_new_tokens). Off: log-likelihood of each option only."""


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    quant: QuantSection = field(default_factory=QuantSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    memory: MemorySection = field(default_factory=MemorySection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    output: OutputSection = field(default_factory=OutputSection)
    samples: SamplesSection = field(default_factory=SamplesSection)
    eval: EvalSection = field(default_factory=EvalSection)
    sft: dict[str, Any] = field(default_factory=dict)
    """Pass-through table for rare `trl.SFTConfig` arguments, e.g. `[sft] neftune_noise_alpha = 5`."""
    source_path: str = ""
    """The file this recipe was read from (not a TOML key)."""


TRAINING_RECIPE_FILE = "qlora_kit_recipe.toml"
"""A run's recipe, copied into its merged model folder: chat and the GGUF export read the prompt format there."""

CHOICES: dict[str, tuple[str, ...]] = {
    "model.init": ("pretrained", "random"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2", "flash_attention_3"),
    "quant.quant_type": ("nf4", "fp4"),
    "quant.compute_dtype": ("auto", "bfloat16", "float16", "float32"),
    "data.over_length": ("drop", "error", "truncate"),
    "data.layout": ("auto", "columns", "alpaca", "sharegpt"),
    "data.hub": ("huggingface", "modelscope"),
    "model.hub": ("huggingface", "modelscope"),
    "train.lr_scheduler": ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts",
                           "polynomial", "inverse_sqrt"),
}

# Each value must satisfy the check; the message says what was expected.
RANGES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "lora.r": (lambda v: v >= 1, "at least 1"),
    "lora.alpha": (lambda v: v >= 1, "at least 1"),
    "lora.dropout": (lambda v: 0 <= v < 1, "between 0 and 1"),
    "data.max_length": (lambda v: v >= 16, "at least 16 tokens"),
    "data.limit": (lambda v: v >= 0, "0 (all rows) or more"),
    "data.eval_rows": (lambda v: v >= 0, "0 or more"),
    "train.epochs": (lambda v: v > 0, "greater than 0"),
    "train.max_steps": (lambda v: v >= 0, "0 (use epochs) or more"),
    "train.batch_size": (lambda v: v >= 1, "at least 1"),
    "train.grad_accum": (lambda v: v >= 1, "at least 1"),
    "train.learning_rate": (lambda v: 0 < v < 1, "between 0 and 1, e.g. 2e-4"),
    "train.warmup": (lambda v: v >= 0, "0 or more"),
    "train.weight_decay": (lambda v: v >= 0, "0 or more"),
    "train.max_grad_norm": (lambda v: v >= 0, "0 or more"),
    "train.logging_steps": (lambda v: v >= 1, "at least 1"),
    "train.eval_steps": (lambda v: v >= 0, "0 (end only) or more"),
    "train.save_steps": (lambda v: v >= 0, "0 (only on interrupt) or more"),
    "train.save_total_limit": (lambda v: v >= 1, "at least 1"),
    "output.preview_rows": (lambda v: v >= 0, "0 or more"),
    "samples.count": (lambda v: v >= 0, "0 (none) or more"),
    "samples.max_new_tokens": (lambda v: v >= 1, "at least 1"),
    "eval.limit": (lambda v: v >= 0, "0 (all questions) or more"),
}

SECTIONS = {f.name: f.type for f in dataclasses.fields(Recipe) if f.name != "source_path"}


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file, apply `section.key=value` overrides, validate, and resolve local paths."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Recipe file not found: {path}",
                        hint="Pass the path of a .toml recipe, e.g. recipes/demo.toml.")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML: {e}",
                        hint="Fix that line (strings need quotes, each [section] once); recipes/medical.toml "
                             "shows the layout.") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text.", hint="Save the recipe as UTF-8.") from None
    recipe = recipe_from_dict(raw, overrides, where=str(path))
    recipe.source_path = str(path.resolve())
    _resolve_local_paths(recipe, path.resolve().parent)
    from qlora_kit.gguf_base import normalize_gguf_reference

    normalize_gguf_reference(recipe.model, path.resolve().parent)
    return recipe


def recipe_from_dict(raw: dict[str, Any], overrides=(), where: str = "recipe") -> Recipe:
    """Build a validated Recipe from parsed TOML plus overrides; raises one UserError listing every problem."""
    problems: list[str] = []
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        _apply_override(raw, item, problems)

    recipe = Recipe()
    for section_name, values in raw.items():
        if section_name not in SECTIONS:
            problems.append(f"unknown section [{section_name}]{did_you_mean(section_name, SECTIONS)}")
            continue
        if not isinstance(values, dict):
            problems.append(f"`{section_name}` must be a table ([{section_name}]), got {values!r}")
            continue
        if section_name == "sft":
            recipe.sft = dict(values)
            continue
        section = getattr(recipe, section_name)
        hints = typing.get_type_hints(type(section))
        for key, value in values.items():
            full = f"{section_name}.{key}"
            if key not in hints:
                problems.append(f"unknown key `{full}`{did_you_mean(key, hints, prefix=section_name + '.')}")
                continue
            coerced, error = _coerce(value, hints[key])
            if error:
                problems.append(f"`{full}` {error}, got {value!r}")
                continue
            setattr(section, key, coerced)
    problems += _check_values(recipe)
    if problems:
        source = f"{where} with the command-line overrides" if overrides else where
        count = "1 problem" if len(problems) == 1 else f"{len(problems)} problems"
        raise UserError(f"{source}: {count} in the recipe:", problems,
                        hint="Fix the keys above (the README's recipe reference lists every key).")
    return recipe


def _apply_override(raw: dict, item: str, problems: list[str]) -> None:
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        problems.append(f"override `{item}` must look like section.key=value, e.g. train.max_steps=50")
        return
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if _takes_list_or_table(parts[0], parts[1]):
            if text.strip().startswith(("[", "{")):  # e.g. lora.target_modules=[q_proj: a broken list, not text
                problems.append(f"override `{item}`: `{key.strip()}` takes a list, and this is not a valid TOML "
                                f'one; write it like {key.strip()}=["a","b"] (quote the whole argument in the shell)')
                return
            # Bare words are the list's items: output.report_to=tensorboard, lora.target_modules=q_proj,v_proj.
            text = "[" + ",".join(f'"{word.strip()}"' for word in text.split(",") if word.strip()) + "]"
            try:
                value = tomllib.loads(f"v = {text}")["v"]
            except tomllib.TOMLDecodeError:
                problems.append(f"override `{item}`: `{key.strip()}` takes a list of names, e.g. "
                                f'{key.strip()}=["a","b"]')
                return
            raw.setdefault(parts[0], {})[parts[1]] = value
            return
        # A bare word is the common case for strings (data.source=rows.jsonl, data.format={question} ...).
        value = _bare_text(f"{parts[0]}.{parts[1]}", text)
    raw.setdefault(parts[0], {})
    if isinstance(raw[parts[0]], dict):
        raw[parts[0]][parts[1]] = value


TEMPLATE_KEYS = ("data.format", "data.system_prompt")
"""Text keys whose bare command-line values get TOML's escapes: the shell strips the quotes of
data.format="Q: {question}\nA: {response}", and a literal backslash-n is never what a template means."""


def _bare_text(key: str, text: str) -> str:
    if key not in TEMPLATE_KEYS or "\\" not in text:
        return text
    try:
        return tomllib.loads('v = "' + text.replace('"', '\\"') + '"')["v"]
    except tomllib.TOMLDecodeError:
        return text


def _takes_list_or_table(section: str, key: str) -> bool:
    section_type = typing.get_type_hints(Recipe).get(section)
    if not dataclasses.is_dataclass(section_type):  # [sft] is a free table, an unknown section is reported later
        return False
    annotation = typing.get_type_hints(section_type).get(key)
    return typing.get_origin(annotation) in (list, dict)


def _coerce(value: Any, annotation: Any) -> tuple[Any, str]:
    """Return (value, "") if `value` fits the field type, else (None, "must be ...")."""
    if annotation is bool:
        return (value, "") if isinstance(value, bool) else (None, "must be true or false")
    if annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return (value, "") if ok else (None, "must be a whole number")
    if annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return (float(value), "") if ok else (None, "must be a number")
    if annotation is str:
        return (value, "") if isinstance(value, str) else (None, "must be a string (in quotes)")
    if typing.get_origin(annotation) is list:
        # A single string is accepted for convenience: target_modules = "all-linear".
        if isinstance(value, str):
            return [value], ""
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value), ""
        return None, "must be a string or a list of strings"
    if isinstance(annotation, types.GenericAlias) or typing.get_origin(annotation) is dict:
        return (value, "") if isinstance(value, dict) else (None, "must be a table")
    raise TypeError(f"no coercion for {annotation}")  # our bug, not the user's


def _check_values(recipe: Recipe) -> list[str]:
    problems = []
    for full, allowed in CHOICES.items():
        value = _get(recipe, full)
        if value not in allowed:
            problems.append(f"`{full}` must be one of {', '.join(allowed)}, got {value!r}"
                            f"{did_you_mean(str(value), allowed)}")
    for full, (check, expected) in RANGES.items():
        value = _get(recipe, full)
        if not check(value):
            problems.append(f"`{full}` must be {expected}, got {value!r}")
    if not recipe.lora.target_modules:
        problems.append('`lora.target_modules` is empty: name the layers that get adapters, or "all-linear"')
    data = recipe.data
    if not data.source:
        problems.append("`data.source` is empty: name a data file or a hub data set id")
    if data.format not in ("chat", "plain"):
        problems += [f"`data.format` {p}" for p in template_problems(data.format)]
    problems += [f"`output.report_to` has {name!r}: one of {', '.join(TRACKERS)} expected"
                 f"{did_you_mean(str(name), TRACKERS)}" for name in recipe.output.report_to if name not in TRACKERS]
    if recipe.train.eval_steps and not data.eval_rows:
        problems.append("`train.eval_steps` is set but `data.eval_rows` is 0: hold out rows to evaluate on")
    if recipe.memory.tiled_mlp and recipe.distributed.fsdp:
        problems.append("`memory.tiled_mlp` does not work with `distributed.fsdp` (its per-slice backward would run "
                        "FSDP's gradient hooks once per slice): turn one of them off")
    if recipe.sft:
        from qlora_kit.sft_arguments import sft_table_problems

        problems += sft_table_problems(recipe.sft)
    return problems


TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
"""output.report_to's choices: transformers integrations we pass the logs to."""


def template_problems(template: str) -> list[str]:
    """What is wrong with a custom format template (empty list when it is usable)."""
    named = sorted({p for p in _placeholders(template) if p not in ("question", "cot", "response")})
    if named:
        return [f"has the unknown placeholder(s) {', '.join('{' + p + '}' for p in named)}; the placeholders are "
                "{question}, {cot} and {response}, whatever your columns are called (map the columns with "
                "data.question_column / data.cot_column / data.response_column)"]
    if "{question}" not in template:
        return ["must be `chat`, `plain`, or a template containing {question}, {cot} and/or {response}"]
    if "{cot}" not in template and "{response}" not in template:
        return ["template needs {cot} or {response}: the part the model learns to write"]
    try:
        template.format(question="", cot="", response="")
    except (KeyError, IndexError, ValueError) as e:
        return [f"template has an unknown or broken placeholder ({e}); write literal braces as {{{{ and }}}}"]
    positions = [template.find(p) for p in ("{question}", "{cot}", "{response}") if p in template]
    if positions != sorted(positions):
        return ["template must put {question} before {cot} before {response}"]
    return []


def _placeholders(template: str) -> list[str]:
    import string

    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError:
        return []  # a broken brace: template_problems' format() check says so


def recipe_changes(recipe: Recipe) -> list[str]:
    """`section.key = value` for every setting that differs from the defaults: the recipe at a glance."""
    import tomli_w

    ours, defaults = recipe_to_dict(recipe), recipe_to_dict(Recipe())
    lines = []
    for section, values in ours.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            if defaults.get(section, {}).get(key, object()) != value:
                # A list on one line (tomli_w spreads arrays over several), e.g. ["tensorboard", "wandb"].
                shown = json.dumps(value, ensure_ascii=False) if isinstance(value, list) else \
                    tomli_w.dumps({"v": value})[4:].strip()
                lines.append(f"{section}.{key} = {shown}")
    return lines


def did_you_mean(word: str, candidates, prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean `{prefix}{close[0]}`?)" if close else ""


def _get(recipe: Recipe, full: str) -> Any:
    section, key = full.split(".")
    return getattr(getattr(recipe, section), key)


def is_local_reference(value: str, base_dir: Path) -> bool:
    """True if `value` names something on disk rather than a hub id."""
    return value.startswith((".", "/", "~")) or (base_dir / value).exists()


def _resolve_local_paths(recipe: Recipe, base_dir: Path) -> None:
    # Saved next to the adapter, the recipe must still point at the same files from anywhere else.
    for section, key in (("model", "name"), ("model", "tokenizer"), ("data", "source")):
        value = getattr(getattr(recipe, section), key)
        if value and is_local_reference(value, base_dir):
            setattr(getattr(recipe, section), key, str((base_dir / Path(value).expanduser()).resolve()))


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    data = dataclasses.asdict(recipe)
    data.pop("source_path")
    if not data["sft"]:
        data.pop("sft")
    return data


def recipe_to_toml(recipe: Recipe) -> str:
    import tomli_w

    header = "# Resolved recipe: every setting as used by this run (defaults included).\n"
    return header + tomli_w.dumps(recipe_to_dict(recipe))
