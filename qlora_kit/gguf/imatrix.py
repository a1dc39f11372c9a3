"""`--imatrix`: the importance matrix of llama.cpp's `llama-imatrix`, computed here through the merged model from
the run's own training rows (or a file of rows or text), saved in llama.cpp's file format and read back from it.

    merged folder ─► qlora_kit_recipe.toml (the run's recipe, copied there by the merge) ─► the run's training rows
                     rendered and encoded exactly as training did (SFT pairs; GRPO prompts; DPO/ORPO prompt + each
                     side; KTO prompt + answer), held-out rows left out            (`calibration_tokens`, 'auto')
               or ─► FILE: rows (.jsonl/.json/.csv/.parquet, rendered the same way) or plain text
               ─► one token stream cut into chunks of 512 ─► the merged model (transformers, float32 on a CPU)
                  with a hook on every linear layer llama-imatrix sees ─► per column: Σ x², and the token count
               ─► NAME.imatrix (GGUF, what `llama-imatrix` writes; `llama-quantize --imatrix` reads it)
               ─► importance(tensor) = Σ x² / count: what the K-quants weight their rounding error by

What is matched, from llama.cpp's source (tools/imatrix/imatrix.cpp, common/imatrix-loader.cpp,
tools/quantize/quantize.cpp, src/llama-quant.cpp):
  * which tensors: every matrix multiplication whose weight is named `blk.*` (`collect_imatrix`, `ask`): attn_q,
    attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down of every layer. `output.weight` only with
    `process_output` (llama-imatrix's `--process-output`, off by default); a tied output layer is token_embd's
    matrix, which llama-imatrix never collects (its name is not `output.weight`), nor does it here. The names are
    the export's own (`tensors.plan_tensors`: gguf.TensorNameMap), so they are the names in the .gguf file.
  * what is collected: for each of those weights, per input column j, Σ over tokens of x_j² (x: the matmul's
    input activation, i.e. the linear layer's input: attn_norm's output for q/k/v, the attention's merged heads
    for attn_output, ffn_norm's output for gate/up, silu(gate)·up for ffn_down), and the number of tokens. Every
    token of every chunk counts: llama-imatrix collects over the whole chunk (it requests every position's output)
    and only its perplexity uses the second half.
  * chunks: the text is one token stream (training rows one after another, as llama-imatrix reads a file), cut
    into chunks of CHUNK_TOKENS = 512 (its default n_ctx); each chunk is evaluated on its own from position 0 (its
    KV cache is cleared per chunk), its first token replaced by BOS when the tokenizer adds one
    (tokenizer.ggml.add_bos_token, as the export writes it). The tail that fills no whole chunk is left out.
    Differences: llama-imatrix refuses fewer than 2 chunks (its perplexity needs them); here one chunk is enough,
    and a stream shorter than one chunk is used whole, as one chunk, so that a small demo run still gets its
    matrix (a matmul over fewer than 16 tokens is skipped by llama-imatrix, so at least 16 are required). And a
    bounded number of tokens by default (DEFAULT_TOKENS; llama-imatrix reads the whole file unless --chunks).
  * plain text is tokenized as llama-imatrix does by default (`common_tokenize(..., add_special=true,
    parse_special=false)`): special-token spellings in the text are read as text, BOS prepended when the model
    adds one. Training rows are encoded as training encoded them (special tokens as the template writes them).
  * the file (imatrix.cpp `save_imatrix`): GGUF v3, `general.type` = "imatrix", `imatrix.datasets` (array of
    strings), `imatrix.chunk_count` (u32, tokens / 512), `imatrix.chunk_size` (u32, 512); per weight, in sorted
    name order, `<name>.in_sum2` (F32, ggml ne = [columns, 1], stored 1-D: the raw sums) and `<name>.counts` (F32,
    [1, 1], stored 1-D: the token count). With the same values the bytes are llama-imatrix's own (a file it wrote,
    read and saved here, comes back byte for byte). llama-quantize refuses a GGUF imatrix without those three
    metadata keys (`load_imatrix`).
    The legacy .dat format (`save_imatrix_legacy`) is read and, for a NAME.dat path, written: int32 entry count;
    per entry int32 name length, the name, int32 ncall = ceil(count / 512), int32 value count, float32 values
    (sum / count) · ncall; then int32 chunk count, int32 length and the dataset name.
  * what the quantizer gets (quantize.cpp `load_imatrix`): in_sum2 / count per column (count 0: all ones); from a
    .dat file, value / ncall. Tensors without an entry are quantized without one, as llama-quantize does.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_kit.errors import UserError

if TYPE_CHECKING:
    import numpy as np

CHUNK_TOKENS = 512
"""llama-imatrix's default context (-c 512): the chunk each evaluation starts afresh from position 0."""
DEFAULT_TOKENS = 16 * CHUNK_TOKENS
"""Tokens collected by default (16 chunks, 8,192 tokens). Measured on SmolLM2-135M (bench/results/gguf_imatrix.json,
docs/gguf.md): every budget from 1,024 to 65,536 tokens of its own training rows gave the same held-out perplexity
within 0.5 % (q4_k_m, q3_k_m), all 3-5 % below none; while the time grows with the tokens: on a 2-core CPU about
20-50 s for SmolLM2 and 9 minutes for R1-Distill-Qwen-1.5B at this budget (seconds on a GPU). --imatrix-tokens
raises it."""
MIN_TOKENS = 16
"""llama-imatrix ignores a matrix multiplication over fewer tokens (`src1->ne[1] < 16`)."""
CHUNKS_PER_PASS = 4
"""Chunks evaluated together, as llama-imatrix's default batch (2048 = 4 x 512) does: same sums, fewer passes."""
GGUF_MAGIC, GGUF_VERSION, GGUF_ALIGNMENT = b"GGUF", 3, 32
GGUF_UINT32, GGUF_STRING, GGUF_ARRAY, GGML_F32 = 4, 8, 9, 0  # gguf.h's value types, ggml.h's GGML_TYPE_F32
IN_SUM2, COUNTS = ".in_sum2", ".counts"
KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE = "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"
# The keys llama-quantize writes into a file it quantized with an imatrix (quantize.cpp LLM_KV_QUANTIZE_IMATRIX_*)
KEY_QUANTIZE_FILE, KEY_QUANTIZE_DATASET = "quantize.imatrix.file", "quantize.imatrix.dataset"
KEY_QUANTIZE_ENTRIES, KEY_QUANTIZE_CHUNKS = "quantize.imatrix.entries_count", "quantize.imatrix.chunks_count"
IMATRIX_SUFFIXES = (".imatrix", ".dat")


@dataclass
class Imatrix:
    """Per weight (its GGUF name): the per-column sums of squared input activations and the token count."""

    sums: dict[str, np.ndarray]          # float64 while collecting; float32 as stored
    counts: dict[str, int]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = CHUNK_TOKENS
    seconds: float = 0.0                 # time spent computing it (0 when read from a file)
    tokens: int = 0                      # tokens run through the model (0 when read from a file)
    path: str = ""                       # the file it was read from or saved to

    def importance(self, name: str) -> np.ndarray | None:
        """What the quantizer weights each column's error by (quantize.cpp): sum / count, float32; None when the
        tensor has no entry (then it is quantized without one, as llama-quantize does)."""
        import numpy as np

        if name not in self.sums:
            return None
        count = self.counts[name]
        if count <= 0:  # llama-quantize: an entry without data weighs every column alike
            return np.ones(self.sums[name].shape, dtype=np.float32)
        return (np.asarray(self.sums[name], dtype=np.float64) / count).astype(np.float32)

    def __len__(self) -> int:
        return len(self.sums)

    @property
    def dataset(self) -> str:
        return self.datasets[0] if self.datasets else ""


# ---------------------------------------------------------------------------------------------------------------
# Computing it


def collected_weights(folder: Path, process_output: bool = False) -> dict[str, str]:
    """{transformers module name: GGUF tensor name} of the linear layers llama-imatrix collects, named by the
    export's own tensor plan (so the imatrix keys are the names the .gguf file holds)."""
    from qlora_kit.gguf.dependency import require_gguf
    from qlora_kit.gguf.model_config import hyper_parameters, read_config
    from qlora_kit.gguf.tensors import plan_tensors, weight_files
    from qlora_kit.plan.gguf_mixture import file_type

    require_gguf()
    config, arch = read_config(folder)
    plans = plan_tensors(weight_files(folder), arch, hyper_parameters(config), file_type("f16"))
    wanted = {}
    for plan in plans:
        if plan.source is None or not plan.source.endswith(".weight") or len(plan.shape) != 2:
            continue
        if plan.gguf_name.startswith("blk.") or (process_output and plan.gguf_name == "output.weight"):
            wanted[plan.source.removesuffix(".weight")] = plan.gguf_name
    return wanted


def model_dtype(device: str, parameters: int):
    """float32 on a CPU (exact sums, and CPU matmuls in 16 bits are slower) unless 4 bytes per parameter would not
    fit in the free RAM, then bfloat16; a GPU's own 16-bit type (the sums are kept in float32 either way)."""
    import torch

    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    from qlora_kit.plan.cpu import machine_ram

    _, available = machine_ram()
    return torch.float32 if 4 * parameters < 0.8 * available else torch.bfloat16


def chunks_of(tokens: list[int], max_tokens: int, bos_id: int | None) -> list[list[int]]:
    """The chunks llama-imatrix evaluates: whole CHUNK_TOKENS pieces of the stream (at most max_tokens of them),
    each one's first token BOS when the model adds BOS. A stream shorter than one chunk is one short chunk."""
    if len(tokens) < MIN_TOKENS:
        raise UserError(f"only {len(tokens)} calibration token(s): an importance matrix needs at least {MIN_TOKENS}",
                        hint="Give --imatrix a file with more text or rows (llama-imatrix uses tens of thousands "
                             "of tokens).")
    limit = max(CHUNK_TOKENS, max_tokens)
    if len(tokens) < CHUNK_TOKENS:
        pieces = [list(tokens)]
    else:
        count = min(len(tokens), limit) // CHUNK_TOKENS
        pieces = [list(tokens[i * CHUNK_TOKENS:(i + 1) * CHUNK_TOKENS]) for i in range(count)]
    if bos_id is not None:
        for piece in pieces:
            piece[0] = bos_id
    return pieces


def compute_imatrix(folder: Path, tokens: list[int], *, dataset: str = "", max_tokens: int = DEFAULT_TOKENS,
                    process_output: bool = False, device: str | None = None, dtype=None,
                    progress: bool = False, log: Callable[[str], object] = print) -> Imatrix:
    """Run `tokens` (one stream; chunked as llama-imatrix chunks it) through the merged model in `folder` and
    collect, per weight llama-imatrix sees, Σ x² per input column and the token count."""
    import numpy as np
    import torch
    from tqdm import tqdm

    started = time.monotonic()
    folder = Path(folder)
    names = collected_weights(folder, process_output)
    pieces = chunks_of(tokens, max_tokens, bos_token_id(folder))
    model = load_model(folder, device, dtype)
    device = next(model.parameters()).device
    body = model.get_submodule("model")  # the decoder without lm_head: its logits are never needed here
    sums = {name: torch.zeros(model.get_submodule(module).in_features, dtype=torch.float64, device=device)
            for module, name in names.items()}
    counts = dict.fromkeys(names.values(), 0)

    def collect(name: str, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).float()
        sums[name] += (flat * flat).sum(0, dtype=torch.float64)
        counts[name] += flat.shape[0]

    hooks = [model.get_submodule(module).register_forward_pre_hook(
        lambda _module, inputs, name=name: collect(name, inputs[0])) for module, name in names.items()
        if name != "output.weight"]
    n_tokens = sum(len(piece) for piece in pieces)
    shape = f"{len(pieces)} chunks of {CHUNK_TOKENS}" if n_tokens >= CHUNK_TOKENS else "one short chunk"
    log(f"imatrix: {n_tokens} tokens ({shape}) from {dataset or 'the text'} "
        f"through {folder.name} on {device.type}, {str(next(model.parameters()).dtype).removeprefix('torch.')}")
    bar = tqdm(total=n_tokens, unit=" tokens", unit_scale=True, desc="imatrix", disable=not progress,
               dynamic_ncols=True, leave=False)
    try:
        with torch.inference_mode():
            for start in range(0, len(pieces), CHUNKS_PER_PASS):
                group = pieces[start:start + CHUNKS_PER_PASS]
                # whole chunks are all CHUNK_TOKENS long; only a lone short chunk differs, and it is alone
                ids = torch.tensor(group, dtype=torch.long, device=device)
                hidden = body(input_ids=ids, use_cache=False).last_hidden_state
                if "output.weight" in counts:  # lm_head's input is the final norm's output: no logits needed
                    collect("output.weight", hidden)
                bar.update(ids.numel())
    finally:
        bar.close()
        for hook in hooks:
            hook.remove()
    stored = {}
    for name, total in sums.items():
        values = total.cpu().numpy()
        if not np.isfinite(values).all():  # llama-imatrix stops on this too: such a matrix would poison the rounding
            raise UserError(f"the activations into {name} overflowed (inf or nan) on the calibration text",
                            hint="Export without --imatrix; the merged weights may be damaged (check with "
                                 "`--verify` on an f16 export).")
        stored[name] = values
    seconds = time.monotonic() - started
    return Imatrix(stored, counts, [dataset] if dataset else [], n_tokens // CHUNK_TOKENS, CHUNK_TOKENS,
                   seconds, n_tokens)


def load_model(folder: Path, device: str | None, dtype):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        config = transformers.AutoConfig.from_pretrained(folder)
        hidden, layers = config.hidden_size, config.num_hidden_layers
        # attention (at most 4 h x h) + the MLP's three matrices per layer, the embedding and lm_head: an upper
        # bound, only to choose the dtype
        rough = layers * (4 * hidden * hidden + 3 * hidden * config.intermediate_size) + 2 * config.vocab_size * hidden
        dtype = model_dtype(device, rough)
    transformers.logging.disable_progress_bar()
    # use_safetensors: a merged folder holds safetensors; a pickle file there is never unpickled
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True)
    return model.to(device).eval()


def bos_token_id(folder: Path) -> int | None:
    """BOS when llama.cpp will prepend it to this file's prompts (tokenizer.ggml.add_bos_token as the export writes
    it: gguf's SpecialVocab, absent = no), else None."""
    import gguf

    special = gguf.SpecialVocab(folder, load_merges=False)
    if not special.add_special_token.get("bos"):
        return None
    return special.special_token_ids.get("bos")


# ---------------------------------------------------------------------------------------------------------------
# The calibration text: the run's training rows ('auto'), a rows file, or plain text


ROW_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def run_recipe(folder: Path):
    """The recipe of the run behind a merged folder: the copy the merge put beside the weights, else the run
    directory around a folder merged to its default place (RUN/merged)."""
    from qlora_kit.recipe.loading import load_recipe
    from qlora_kit.recipe.run_files import ADAPTER_DIR, RECIPE_FILE
    from qlora_kit.recipe.schema import TRAINING_RECIPE_FILE

    for path in (folder / TRAINING_RECIPE_FILE, folder.resolve().parent / RECIPE_FILE):
        if path.is_file() and (path.name == TRAINING_RECIPE_FILE or (path.parent / ADAPTER_DIR).is_dir()):
            return load_recipe(path)
    return None


def training_sequences(recipe, tokenizer, method: str) -> list[list[int]]:
    """The run's training examples as token ids, as its trainer saw them (held-out rows excluded)."""
    import io

    from rich.console import Console

    from qlora_kit.recipe.schema import PREFERENCE_METHODS

    quiet = Console(file=io.StringIO())  # the data report was the run's to show; here only the ids are needed
    if method == "grpo":
        from qlora_kit.data.checkable import build_grpo_examples

        # GRPO trains on the model's own completions of these prompts: the prompts are the rows' text
        return [p.prompt_ids for p in build_grpo_examples(recipe, tokenizer, quiet).train]
    if method in PREFERENCE_METHODS:
        from qlora_kit.data.pairs import PairExample, build_preference_examples

        sequences = []
        for example in build_preference_examples(recipe, tokenizer, quiet).train:
            if isinstance(example, PairExample):
                sequences += [example.prompt_ids + example.chosen_ids, example.prompt_ids + example.rejected_ids]
            else:
                sequences.append(example.prompt_ids + example.completion_ids)
        return sequences
    from qlora_kit.data.examples import build_examples

    return [example.input_ids for example in build_examples(recipe, tokenizer, quiet).train]


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def run_tokens(folder: Path) -> tuple[list[int], str]:
    """'auto': the run's own training rows (stream, dataset label)."""
    recipe = run_recipe(folder)
    if recipe is None:
        raise UserError(f"--imatrix auto: {folder} has no run behind it",
                        ["no qlora_kit_recipe.toml in it (what tools/merge.py copies there), and its parent is "
                         "not a run directory"],
                        hint="Pass the calibration text yourself: --imatrix ROWS.jsonl or TEXT.txt (or an imatrix "
                             "file made by llama-imatrix).")
    tokenizer = load_tokenizer(folder)
    sequences = training_sequences(recipe, tokenizer, recipe.train.method)
    source = recipe.data.source
    label = Path(source).name if Path(source).suffix.lower() in ROW_SUFFIXES else source
    return [token for sequence in sequences for token in sequence], f"{label} (training rows)"


def file_tokens(folder: Path, path: Path) -> tuple[list[int], str]:
    """Rows (rendered and encoded as training would, with the run's column mapping when there is a run) or text."""
    import dataclasses

    from qlora_kit.data.encode import Encoder
    from qlora_kit.data.render import make_renderer
    from qlora_kit.data.rows import load_rows
    from qlora_kit.recipe.schema import DataSection

    tokenizer = load_tokenizer(folder)
    if path.suffix.lower() in ROW_SUFFIXES:
        texts = text_records(path)
        if texts is not None:
            return text_ids(folder, tokenizer, "\n\n".join(texts)), path.name
        recipe = run_recipe(folder)
        data = dataclasses.replace(recipe.data if recipe else DataSection(), source=str(path), limit=0)
        encoder = Encoder(tokenizer, make_renderer(tokenizer, data)[0])
        return [token for row in load_rows(data).rows for token in encoder.encode(row).input_ids], path.name
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"--imatrix {path}: neither an imatrix file nor UTF-8 text", [
            "an imatrix file: GGUF (what llama-imatrix writes) or its legacy .dat",
            f"rows: {', '.join(ROW_SUFFIXES)} in the recipe's layout", "text: any UTF-8 file"],
            hint="Pass `auto` (the run's own training rows) or one of those.") from None
    return text_ids(folder, tokenizer, text), path.name


def text_records(path: Path) -> list[str] | None:
    """A .jsonl of {"text": ...} records (a common calibration layout): their texts; None for any other rows."""
    import json

    if path.suffix.lower() != ".jsonl":
        return None
    with path.open(encoding="utf-8-sig") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return None  # the rows reader says which line is wrong
    if not (isinstance(record, dict) and isinstance(record.get("text"), str) and len(record) == 1):
        return None
    from qlora_kit.jsonl import read_jsonl

    return [r["text"] for r in read_jsonl(path) if isinstance(r, dict) and isinstance(r.get("text"), str)]


def text_ids(folder: Path, tokenizer, text: str) -> list[int]:
    """llama-imatrix's tokenization of its text file: special-token spellings read as text (parse_special = false),
    BOS first when the model adds it."""
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids
    bos = bos_token_id(folder)
    return ([bos] if bos is not None else []) + ids


# ---------------------------------------------------------------------------------------------------------------
# What the export calls


def imatrix_for_export(folder: Path, spec: str | Path, max_tokens: int = DEFAULT_TOKENS, progress: bool = False,
                       log: Callable[[str], object] = print) -> Imatrix:
    """`--imatrix auto|FILE`: an imatrix file read as it is, else the calibration tokens (the run's rows for
    `auto`, or FILE's rows or text) run through the model in `folder`."""
    folder = Path(folder)
    if str(spec) == "auto":
        tokens, dataset = run_tokens(folder)
    else:
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"--imatrix {path}: no such file" if not path.exists() else
                            f"--imatrix {path}: a folder, not a file",
                            hint="Pass `auto` (the run's own training rows), an imatrix file (llama-imatrix's "
                                 ".gguf/.imatrix/.dat), or a .jsonl/.txt file of calibration rows or text.")
        if is_imatrix_file(path):
            imatrix = load_imatrix(path)
            log(f"imatrix: {len(imatrix)} entries read from {path} ({imatrix.chunk_count} chunks of "
                f"{imatrix.dataset or 'unnamed text'})")
            return imatrix
        tokens, dataset = file_tokens(folder, path)
    return compute_imatrix(folder, tokens, dataset=dataset, max_tokens=max_tokens, progress=progress, log=log)


def is_imatrix_file(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(4)
    return head == GGUF_MAGIC or path.suffix.lower() == ".dat"


def check_fits(imatrix: Imatrix, columns: dict[str, int]) -> None:
    """Every entry the export will use has one value per column of its tensor (llama-quantize stops on a size
    mismatch too): an imatrix of another model is refused before any tensor is written."""
    wrong = [f"{name}: {len(imatrix.sums[name])} values, the tensor has {n} columns"
             for name, n in columns.items() if name in imatrix.sums and len(imatrix.sums[name]) != n]
    if wrong:
        raise UserError("the importance matrix was made for another model", wrong[:5],
                        hint="Compute it for this folder: --imatrix auto, or a text/rows file.")
    if columns and not any(name in imatrix.sums for name in columns):
        raise UserError("the importance matrix names none of this model's tensors",
                        [f"it has e.g. {next(iter(imatrix.sums), 'nothing')}; the model e.g. {next(iter(columns))}"],
                        hint="Compute it for this folder: --imatrix auto, or a text/rows file.")


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp's file formats


def save_imatrix(imatrix: Imatrix, path: Path) -> Path:
    """llama-imatrix's GGUF file; the legacy .dat layout for a path ending in .dat."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = legacy_bytes(imatrix) if path.suffix.lower() == ".dat" else gguf_bytes(imatrix)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(payload)
    partial.replace(path)
    return path


def gguf_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def gguf_bytes(imatrix: Imatrix) -> bytes:
    """The bytes ggml's gguf_write_to_file gives llama-imatrix's context: header, the four keys in the order it sets
    them, then per entry (sorted) in_sum2 and counts, each tensor's data padded to 32 bytes."""
    import numpy as np

    kv = [gguf_string("general.type") + struct.pack("<I", GGUF_STRING) + gguf_string("imatrix"),
          gguf_string(KEY_DATASETS) + struct.pack("<IIQ", GGUF_ARRAY, GGUF_STRING, len(imatrix.datasets))
          + b"".join(gguf_string(d) for d in imatrix.datasets),
          gguf_string(KEY_CHUNK_COUNT) + struct.pack("<II", GGUF_UINT32, imatrix.chunk_count),
          gguf_string(KEY_CHUNK_SIZE) + struct.pack("<II", GGUF_UINT32, imatrix.chunk_size)]
    tensors = []
    for name in sorted(imatrix.sums):
        values = np.asarray(imatrix.sums[name], dtype=np.float32)
        # 2-D in ggml ([columns, 1] and [1, 1]) but written with ggml_n_dims, which drops trailing 1s: 1-D in the file
        tensors.append((name + IN_SUM2, (values.size,), values.tobytes()))
        tensors.append((name + COUNTS, (1,), np.float32(imatrix.counts[name]).tobytes()))
    infos, data, offset = [], [], 0
    for name, ne, raw in tensors:
        infos.append(gguf_string(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
                     + struct.pack("<IQ", GGML_F32, offset))
        padded = raw + b"\0" * (-len(raw) % GGUF_ALIGNMENT)
        data.append(padded)
        offset += len(padded)
    head = GGUF_MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(kv)) + b"".join(kv) + b"".join(infos)
    return head + b"\0" * (-len(head) % GGUF_ALIGNMENT) + b"".join(data)


def legacy_bytes(imatrix: Imatrix) -> bytes:
    """imatrix.cpp's save_imatrix_legacy: per entry the mean times ncall, ncall = ceil(count / chunk size)."""
    import numpy as np

    chunk = imatrix.chunk_size or CHUNK_TOKENS
    out = [struct.pack("<i", len(imatrix.sums))]
    for name in sorted(imatrix.sums):
        count = imatrix.counts[name]
        ncall = (count + chunk - 1) // chunk
        values = np.asarray(imatrix.sums[name], dtype=np.float64)
        stored = (values / count * ncall) if count else np.full(values.shape, float(ncall))  # "store 1" x ncall
        raw = name.encode("utf-8")
        out += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, values.size),
                stored.astype(np.float32).tobytes()]
    dataset = imatrix.dataset.encode("utf-8")
    out += [struct.pack("<ii", imatrix.chunk_count, len(dataset)), dataset]
    return b"".join(out)


def load_imatrix(path: Path) -> Imatrix:
    """An imatrix file as llama-quantize reads it (common_imatrix_load): GGUF, else the legacy layout."""
    path = Path(path)
    with path.open("rb") as f:
        gguf_file = f.read(4) == GGUF_MAGIC
    imatrix = read_gguf_imatrix(path) if gguf_file else read_legacy_imatrix(path)
    imatrix.path = str(path)
    if not imatrix.sums:
        raise UserError(f"{path} holds no importance matrix", [
            f"no `<tensor>{IN_SUM2}` / `<tensor>{COUNTS}` pairs in it" if gguf_file else "no entries"],
            hint="Pass a file written by llama-imatrix (or by this export), or `auto`.")
    return imatrix


def read_gguf_imatrix(path: Path) -> Imatrix:
    import gguf
    import numpy as np

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, struct.error, OSError) as error:
        raise UserError(f"{path}: not a readable GGUF file ({error})",
                        hint="A file cut short by a killed process? Compute it again.") from None
    fields = {name: value for name, value in reader.fields.items()}
    missing = [key for key in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if key not in fields]
    sums, counts, problems = {}, {}, []
    tensors = {t.name: t for t in reader.tensors}
    for name, tensor in tensors.items():
        if not name.endswith(IN_SUM2):
            continue
        base = name.removesuffix(IN_SUM2)
        count = tensors.get(base + COUNTS)
        if count is None:
            problems.append(f"{base}: {IN_SUM2} without {COUNTS}")
            continue
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32 or count.tensor_type != gguf.GGMLQuantizationType.F32:
            problems.append(f"{base}: sums and counts must be F32")
            continue
        values = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
        ncounts = np.asarray(count.data, dtype=np.float32).reshape(-1)
        if ncounts.size != 1:  # one count per expert: a mixture-of-experts tensor, which the export never writes
            problems.append(f"{base}: {ncounts.size} counts (a mixture-of-experts model)")
            continue
        sums[base], counts[base] = values, int(round(float(ncounts[0])))
    if problems:
        raise UserError(f"{path}: not an imatrix this export can use", problems[:5],
                        hint="Compute one for this folder: --imatrix auto, or a text/rows file.")
    if sums and missing:  # llama-quantize refuses it too ("missing imatrix metadata")
        raise UserError(f"{path}: an imatrix without llama-imatrix's metadata", [f"no {key}" for key in missing],
                        hint="llama-quantize refuses such a file as well; compute it again.")
    if not sums and "general.architecture" in fields:
        raise UserError(f"{path} is a model GGUF, not an importance matrix",
                        hint="--imatrix takes llama-imatrix's output (or `auto`, or a text/rows file).")

    def scalar(key: str) -> int:
        return int(fields[key].contents()) if key in fields else 0

    datasets = list(fields[KEY_DATASETS].contents()) if KEY_DATASETS in fields else []
    return Imatrix(sums, counts, datasets, scalar(KEY_CHUNK_COUNT), scalar(KEY_CHUNK_SIZE) or CHUNK_TOKENS)


def read_legacy_imatrix(path: Path) -> Imatrix:
    """The legacy layout; its values are mean x ncall with count = ncall (common_imatrix_load_legacy), kept here as
    sums = value x chunk and count = ncall x chunk so that sum / count is quantize.cpp's value / ncall."""
    import numpy as np

    raw = path.read_bytes()
    position = 0

    def take(fmt: str):
        nonlocal position
        size = struct.calcsize(fmt)
        if position + size > len(raw):
            raise UserError(f"{path}: not an imatrix file (cut short at byte {position})",
                            hint="llama-imatrix's legacy .dat or GGUF output, or `auto`.")
        values = struct.unpack_from(fmt, raw, position)
        position += size
        return values

    (entries,) = take("<i")
    if entries < 1 or entries > 1_000_000:
        raise UserError(f"{path}: not an imatrix file (entry count {entries})",
                        hint="llama-imatrix's legacy .dat or GGUF output, or `auto`.")
    sums, counts = {}, {}
    for _ in range(entries):
        (length,) = take("<i")
        if not 0 < length < 4096:
            raise UserError(f"{path}: not an imatrix file (a name of {length} bytes)",
                            hint="llama-imatrix's legacy .dat or GGUF output, or `auto`.")
        name = bytes(take(f"<{length}s")[0]).decode("utf-8", errors="replace")
        ncall, nval = take("<ii")
        if nval < 1:
            raise UserError(f"{path}: entry {name} has no values", hint="Compute the imatrix again.")
        values = np.array(take(f"<{nval}f"), dtype=np.float64)
        if ncall > 0:
            sums[name], counts[name] = values * CHUNK_TOKENS, ncall * CHUNK_TOKENS
        else:  # quantize.cpp uses the values as they are
            sums[name], counts[name] = values, 1
    chunk_count, datasets = 0, []
    if position < len(raw):  # the trailing chunk count and dataset name are optional
        (chunk_count,) = take("<i")
        if position + 4 <= len(raw):
            (length,) = take("<i")
            if 0 < length <= len(raw) - position:
                datasets.append(bytes(take(f"<{length}s")[0]).decode("utf-8", errors="replace"))
    return Imatrix({k: v.astype(np.float32) for k, v in sums.items()}, counts, datasets, chunk_count, CHUNK_TOKENS)


def quantize_metadata(imatrix: Imatrix, file_name: str) -> dict[str, str | int]:
    """The keys llama-quantize adds to a file quantized with an imatrix (quantize.cpp: its strings cut at 127
    bytes, the counts as u32, chunks_count only when known)."""
    keys: dict[str, str | int] = {KEY_QUANTIZE_FILE: first_127_bytes(file_name)}
    if imatrix.datasets:
        keys[KEY_QUANTIZE_DATASET] = first_127_bytes(imatrix.datasets[0])
    keys[KEY_QUANTIZE_ENTRIES] = len(imatrix)
    if imatrix.chunk_count > 0:
        keys[KEY_QUANTIZE_CHUNKS] = imatrix.chunk_count
    return keys


def first_127_bytes(text: str) -> str:
    """quantize.cpp copies these strings with strncpy into a 128-byte field: at most 127 bytes survive."""
    return text.encode("utf-8")[:127].decode("utf-8", errors="ignore")


def describe(imatrix: Imatrix) -> str:
    speed = f", {imatrix.tokens / imatrix.seconds:.0f} tokens/s" if imatrix.seconds else ""
    took = f" in {imatrix.seconds:.1f} s" if imatrix.seconds else ""
    return (f"{len(imatrix)} tensors, {imatrix.chunk_count} chunk(s) of {imatrix.chunk_size} tokens"
            f"{took}{speed}")

