"""The recipe: one typed, documented field per setting, in one dataclass per TOML section.

The text under each field is its documentation: `docs/recipe.md` and the studio's form are generated from it
(qlora_kit.recipe.field_docs), so a new key is documented in one place. Reading a TOML file into these classes,
overrides and validation are in qlora_kit.recipe.loading.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
    adapter: str = ""
    """Start from a trained LoRA adapter instead of a fresh one (GRPO and preference tuning): a finished run's
    directory (e.g. "runs/medical", its adapter/ is read) or an adapter folder. The adapter keeps its own rank and
    target modules (the [lora] keys are not used then); for DPO and KTO that SFT model is also the reference the
    tuned model is held to. Relative paths: from the recipe's folder if it is there,
    else from where you run the command. Empty: a fresh adapter on the base."""

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
    eval_source: str = ""
    """A file of held-out rows (the same columns as data.source) to evaluate on instead of rows held out of
    data.source at random: `qlora-kit make-data` writes one beside its rows (FILE.eval.jsonl), from documents no
    training row comes from, so the eval loss measures what the model learned, not what it memorised. With it,
    data.eval_rows is how many of its rows to use (0 = all that fit max_length). SFT only."""


@dataclass
class TrainSection:
    method: str = "sft"
    """`sft`: supervised fine-tuning on reasoning + answer rows (the default). `grpo`: reinforcement learning with
    verifiable rewards (TRL's GRPOTrainer): the model writes several completions per question, rewards score them
    ([grpo] section), and the adapter learns from how each one compares with the others. GRPO rows are
    multiple-choice (question, options, answer) or short-answer (question, answer); docs/grpo.md says when it
    helps. `dpo`, `kto`, `orpo`: preference tuning (TRL's DPOTrainer, KTOTrainer, ORPOTrainer) on pairs of a better
    and a worse answer (`prompt`, `chosen`, `rejected`; KTO also single answers marked good or bad: `prompt`,
    `completion`, `label`), [pref] section; docs/preference.md says which method for which data."""
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
    recipe on the same machine give the same losses bit for bit (docs/training.md: "Repeatable runs")."""
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
    layout: docs/results.md); relative paths are read from the recipe's folder. Empty: none."""
    limit: int = 0
    """Score only the first N questions of each task and of the file. 0: all of them."""
    generate: bool = False
    """Also let the model reason and write its answer, and read the chosen letter after </think> (slow: one reply
    per question and side, up to samples.max_new_tokens). Off: log-likelihood of each option only."""


REWARD_NAMES = ("format", "choice", "exact", "numeric", "length")
"""The built-in GRPO rewards (qlora_kit.train.rewards); grpo.rewards may also name "file.py:function"."""

DEFAULT_REWARDS = {"format": 0.5, "choice": 1.0, "exact": 1.0, "numeric": 1.0}
"""grpo.rewards' default: the format, and whichever of choice / exact / numeric a row is checked by."""


@dataclass
class GrpoSection:
    """Reinforcement learning with verifiable rewards (train.method = "grpo"); docs/grpo.md explains the keys."""

    num_generations: int = 4
    """Completions sampled per question; each is rewarded against the mean of its group. More: a finer signal, and
    memory and time grow with it (the planner counts their KV cache). train.batch_size x train.grad_accum must be a
    multiple of it (both count completions, not questions)."""
    max_completion_length: int = 512
    """Longest completion in tokens, reasoning included; a longer one is cut (and counted as clipped). Prompt +
    this must fit data.max_length."""
    temperature: float = 1.0
    """Sampling temperature of the completions: GRPO needs the completions of a group to differ."""
    top_p: float = 1.0
    """Nucleus sampling of the completions (1.0: off)."""
    beta: float = 0.0
    """Weight of the KL penalty against the starting model. 0: no reference model is kept or run (less memory and
    time); above 0 the KL is logged, and the reference is the model with the adapter switched off."""
    rewards: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_REWARDS))
    """Reward functions and their weights, summed per completion: `format` (one think block, closed, a non-empty
    answer, EOS), `choice` (the letter after </think> is the right one), `exact` (the answer equals a text
    reference after normalisation), `numeric` (the last number of the answer equals a numeric reference), `length`
    (DAPO's soft over-long penalty, 0 to -1 near max_completion_length). A row is checked by one of
    choice / exact / numeric: a function that does not apply to a row gives it no score. Your own reward:
    "path/to/file.py:function" = weight, loaded from that file only (relative paths: from the recipe's folder);
    it is Python code and runs with your rights, so name only files you trust. Weight 0 turns a reward off."""
    length_cache: int = 0
    """The `length` reward's soft zone: completions longer than max_completion_length minus this many tokens get a
    penalty growing to -1 at the limit. 0: a quarter of max_completion_length."""
    loss_type: str = "dapo"
    """TRL's GRPO loss: `dapo` (tokens weighted equally across the batch, TRL's default), `grpo` (per-sequence
    mean, the original paper), `dr_grpo` (no length bias), `bnpo`."""


PREFERENCE_METHODS = ("dpo", "kto", "orpo")
"""train.method's preference-tuning choices (qlora_kit.train.preference)."""

LOSS_TYPES = {"dpo": ("sigmoid", "ipo", "hinge", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero",
                      "apo_down", "exo_pair", "discopop"),
              "kto": ("kto", "apo_zero_unpaired"), "orpo": ("orpo",)}
"""pref.loss_type's choices per method: TRL's own (DPOConfig.loss_type, KTOConfig.loss_type); ORPO has one."""


@dataclass
class PreferenceSection:
    """Preference tuning (train.method = "dpo", "kto" or "orpo"); docs/preference.md explains the keys."""

    beta: float = 0.1
    """How strongly the tuned model is held to the reference (DPO, KTO: the temperature of the implicit reward;
    ORPO: the weight of its odds-ratio term, TRL's lambda). Lower: it may move further from where it started."""
    loss_type: str = "auto"
    """TRL's loss: DPO `sigmoid` (the paper's), `ipo`, `hinge`, `robust` (noisy labels), `apo_zero`, ...; KTO `kto`
    or `apo_zero_unpaired`; ORPO has one. `auto`: the method's default (sigmoid, kto, orpo)."""
    precompute_ref_log_probs: bool = False
    """DPO and KTO: score every row with the reference model once before training, instead of a second forward
    pass per step. Saves the reference pass's memory and a third of the step time; costs one pass over the data
    at the start (and the reference stays fixed, as it does anyway)."""
    desirable_weight: float = 1.0
    """KTO: weight of the rows labelled good (raise it when they are fewer than the bad ones: TRL suggests keeping
    desirable_weight x good rows / (undesirable_weight x bad rows) between 1 and 4/3)."""
    undesirable_weight: float = 1.0
    """KTO: weight of the rows labelled bad."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Pass-through table for rare arguments of the method's TRL config (DPOConfig, KTOConfig, ORPOConfig), e.g.
    `[pref.extra] label_smoothing = 0.1`; keys qlora_kit sets itself are refused."""


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
    grpo: GrpoSection = field(default_factory=GrpoSection)
    pref: PreferenceSection = field(default_factory=PreferenceSection)
    sft: dict[str, Any] = field(default_factory=dict)
    """Pass-through table for rare `trl.SFTConfig` arguments, e.g. `[sft] neftune_noise_alpha = 5`."""
    source_path: str = ""
    """The file this recipe was read from (not a TOML key)."""


TRAINING_RECIPE_FILE = "qlora_kit_recipe.toml"
"""A run's recipe, copied into its merged model folder: chat and the GGUF export read the prompt format there."""

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
"""output.report_to's choices: transformers integrations we pass the logs to."""

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
"""A data.source ending in one of these is a local file, not a hub data set id."""


def is_gguf_base(model: ModelSection) -> bool:
    """The base is a .gguf file (the model a user runs in Ollama / LM Studio / llama.cpp)."""
    return bool(model.gguf_file) or model.name.lower().endswith(".gguf")


def is_local_reference(value: str, base_dir: Path) -> bool:
    """True if `value` names something on disk rather than a hub id."""
    return value.startswith((".", "/", "~")) or (base_dir / value).exists()
