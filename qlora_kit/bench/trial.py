"""What one trial is, inside the worker: the 4-bit model of a setup from random weights, the synthetic data,
the trainer, and the figures read after training. Everything here imports torch."""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

from qlora_kit.bench.setups import DEMO_TOKENIZER, GIB, bench_recipe, parse_setup


def bench_tokenizer():
    """The demo tokenizer: data are token ids already, so only its pad/eos ids matter (both below every vocab)."""
    from qlora_kit.model.loading import load_tokenizer
    from qlora_kit.recipe.schema import ModelSection

    return load_tokenizer(ModelSection(name=str(DEMO_TOKENIZER)))


def build_model(spec: dict):
    """The 4-bit model of this setup; see `random_weights` for where the weights come from."""
    import torch

    setup = parse_setup(spec["setup"])
    name = f"random/{spec['model']}"
    with random_weights(spec["config"], spec["settings"]["seed"]):
        if setup.base == "qlora_kit":
            from qlora_kit.model.loading import add_lora, load_model

            recipe = bench_recipe(setup, spec["length"], spec["warmup"] + spec["steps"], spec["settings"], name)
            model = load_model(recipe, trial_precision(spec, recipe))
            return add_lora(model, recipe.lora, seed=recipe.train.seed)
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        # The usual QLoRA snippet (HF blog / TRL docs): NF4, double quant, bf16 compute, one GPU.
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
        return AutoModelForCausalLM.from_pretrained(name, quantization_config=quantization, dtype=torch.bfloat16,
                                                    device_map={"": 0 if torch.cuda.is_available() else "cpu"})


def trial_precision(spec: dict, recipe):
    """qlora_kit's own choice, except that `settings.cpu_dtype = "bfloat16"` runs a CPU trial under bf16 autocast
    with float32 adapters, as on a GPU: tools/calibrate_plan.py measures the planner's GPU profile that way."""
    import torch

    from qlora_kit.model.loading import Precision, choose_precision

    if spec["settings"].get("cpu_dtype") == "bfloat16" and not torch.cuda.is_available():
        return Precision("cpu", torch.bfloat16)
    return choose_precision(recipe.quant)


_STATE_CACHE: dict[str, dict] = {}


@contextlib.contextmanager
def random_weights(config: dict, seed: int):
    """Within this block, `AutoModelForCausalLM.from_pretrained(anything, **kwargs)` builds `config`'s architecture
    through transformers' normal loader from an in-memory state dict of random bf16 tensors instead of files.

    Why this route: quantization, the 16-bit modules, the device_map and accelerate's dispatch hooks all happen in
    transformers' own code, the same code as for a downloaded checkpoint; nothing is written to disk, and the loader
    quantizes tensor by tensor (sequentially for on-the-fly quantization), so the GPU never holds a bf16 copy of the
    whole model.
    """
    from unittest import mock

    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(**config)
    architecture = getattr(transformers, hf_config.architectures[0])

    def from_random(location, *args, revision=None, **kwargs):
        state = random_state_dict(architecture, hf_config, config, seed)
        return architecture.from_pretrained(None, *args, config=hf_config, state_dict=state, **kwargs)

    with mock.patch.object(AutoModelForCausalLM, "from_pretrained", from_random):
        yield


def random_state_dict(architecture, hf_config, config: dict, seed: int) -> dict:
    """Random bf16 tensors for every weight: matrices ~ N(0, 0.02), norms 1, biases 0.

    Every decoder layer gets the same tensors (the loader copies them to the GPU, so the model's layers are still
    separate), and each matrix is a tiling of one random pool: an 8B model costs ~2.6 GB of RAM and a second of
    memcpy instead of minutes of random number generation. Cached per worker for the last architecture.
    """
    import re

    import torch

    key = json.dumps([config, seed], sort_keys=True)
    if key in _STATE_CACHE:
        return _STATE_CACHE[key]
    _STATE_CACHE.clear()
    with torch.device("meta"):
        skeleton = architecture(hf_config)  # names and shapes only
    generator = torch.Generator().manual_seed(seed)
    pool = torch.empty(1_000_003).normal_(0.0, 0.02, generator=generator).to(torch.bfloat16)
    shared: dict[str, torch.Tensor] = {}
    state = {}
    for name, meta in skeleton.state_dict().items():
        generic = re.sub(r"\.layers\.\d+\.", ".layers.N.", name)
        if generic not in shared:
            shape = tuple(meta.shape)
            if name.endswith("bias"):
                shared[generic] = torch.zeros(shape, dtype=torch.bfloat16)
            elif len(shape) == 1:
                shared[generic] = torch.ones(shape, dtype=torch.bfloat16)  # norm weights
            else:
                n = math.prod(shape)
                shared[generic] = pool.repeat(-(-n // pool.numel()))[:n].view(shape)
        state[name] = shared[generic]
    del skeleton
    _STATE_CACHE[key] = state
    return state


def synthetic_rows(spec: dict, vocab: int) -> tuple[list[list[int]], list[list[int]]]:
    """(input_ids, completion_mask) rows: random ids of exactly `length` tokens, the first prompt_tokens untrained."""
    import torch

    rows = spec["warmup"] + spec["steps"]
    prompt = spec["settings"]["prompt_tokens"]
    generator = torch.Generator().manual_seed(spec["settings"]["seed"] + spec["length"])
    ids = torch.randint(0, vocab, (rows, spec["length"]), generator=generator).tolist()
    mask = [[0] * prompt + [1] * (spec["length"] - prompt) for _ in range(rows)]
    return ids, mask


def build_bench_trainer(spec: dict, model, tokenizer, folder: Path, timer):
    ids, mask = synthetic_rows(spec, spec["config"]["vocab_size"])
    setup = parse_setup(spec["setup"])
    if setup.base == "qlora_kit":
        from qlora_kit.data.encode import Example, to_dataset
        from qlora_kit.train.fit import build_trainer

        recipe = bench_recipe(setup, spec["length"], spec["warmup"] + spec["steps"], spec["settings"])
        examples = [Example(i, m, row) for row, (i, m) in enumerate(zip(ids, mask, strict=True))]
        return build_trainer(recipe, model, tokenizer, to_dataset(examples), None, trial_precision(spec, recipe),
                             folder, [timer])

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    lora = spec["settings"]["lora"]
    # Labels given as a column (the documented pre-tokenized format), identical to what qlora_kit's mask yields.
    labels = [[t if keep else -100 for t, keep in zip(i, m, strict=True)] for i, m in zip(ids, mask, strict=True)]
    args = SFTConfig(output_dir=str(folder / "baseline"), per_device_train_batch_size=1,
                     max_steps=spec["warmup"] + spec["steps"], report_to="none", bf16=True,
                     max_length=spec["length"], logging_steps=1, save_strategy="no", disable_tqdm=True,
                     seed=spec["settings"]["seed"], use_cpu=not torch.cuda.is_available())  # CPU: smoke only
    peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                             target_modules="all-linear", task_type="CAUSAL_LM")
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": labels}),
                      processing_class=tokenizer, peft_config=peft_config, callbacks=[timer])


def make_step_timer(cuda: bool):
    """A TrainerCallback, defined here so that the parent process never imports transformers."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step (forward, backward, optimizer), with the GPU's queue drained at both
        ends; data loading happens before on_step_begin, logging after on_step_end."""

        def __init__(self, cuda: bool):
            self.cuda, self.times, self._start = cuda, [], 0.0

        def _sync(self):
            if self.cuda:
                import torch

                torch.cuda.synchronize()

        def on_step_begin(self, args, state, control, **kwargs):
            self._sync()
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self._sync()
            self.times.append(time.perf_counter() - self._start)

    return StepTimer(cuda)


def measurements(spec: dict, trainer, timer) -> dict:
    from qlora_kit.model.loading import count_parameters

    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    timed = timer.times[spec["warmup"]:]
    trainable, total = count_parameters(trainer.model)
    adapter_dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in trainer.model.parameters()
                             if p.requires_grad})
    optim = trainer.args.optim  # a transformers enum: sent as text, the parent must not need transformers
    return {"steps_done": trainer.state.global_step, "step_s": [round(t, 4) for t in timer.times],
            "tokens_per_s": round(spec["length"] * len(timed) / sum(timed), 1) if timed else None,
            "losses": [round(v, 4) for v in losses], "trainable_params": trainable, "total_params": total,
            "adapter_dtype": ",".join(adapter_dtypes), "optimizer": str(getattr(optim, "value", optim)),
            "gradient_checkpointing": bool(trainer.args.gradient_checkpointing)}


def memory_figures(cuda: bool) -> dict:
    if cuda:
        import torch

        free, total = torch.cuda.mem_get_info()
        return {"peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3),
                "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
                # Whole device, at the end: CUDA context, managed (paged) memory, and any other process included.
                "device_used_gib": round((total - free) / GIB, 3)}
    import resource

    import psutil

    # ru_maxrss is the worker's lifetime peak (KiB on Linux): the first trial in a worker is exact, later ones
    # are upper bounds. Smoke only; on a GPU the VRAM figures above are what counts.
    return {"rss_gib": round(psutil.Process().memory_info().rss / GIB, 3),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3)}


def optimizer_state_bytes(trainer) -> tuple[str, int, int] | None:
    """(optimizer class, bytes in PyTorch's allocator, bytes in bitsandbytes' paged CUDA managed memory)."""
    optimizer = getattr(trainer, "optimizer", None)
    inner = getattr(optimizer, "optimizer", optimizer)
    if inner is None:
        return None
    allocated = paged = 0
    for state in inner.state.values():
        for value in state.values():
            if hasattr(value, "nbytes"):
                if getattr(value, "is_paged", False):
                    paged += value.nbytes
                else:
                    allocated += value.nbytes
    return type(inner).__name__, allocated, paged


def optimizer_figures(trainer) -> dict:
    """Optimizer state size, split into PyTorch-allocated and bitsandbytes-paged (CUDA managed) memory."""
    sizes = optimizer_state_bytes(trainer)
    if sizes is None:
        return {}
    name, allocated, paged = sizes
    return {"optimizer_class": name, "optimizer_state_gib": round(allocated / GIB, 4),
            "paged_optimizer_gib": round(paged / GIB, 4)}


@contextlib.contextmanager
def tensor_peak(cuda: bool, model, no_arithmetic: int | None = None):
    """On CPU, count live tensors op by op (qlora_kit.plan.tensor_peak): the planner's `allocated` figure can be checked
    there too. Not on a GPU: torch.cuda's own statistics are exact there, and the counter would slow every step.
    `no_arithmetic`: count without computing (qlora_kit.tensor_peak.NoArithmetic with this min_elements)."""
    if cuda:
        yield None
        return
    from qlora_kit.plan.tensor_peak import LiveTensorBytes, NoArithmetic, loss_phases

    counter = LiveTensorBytes("cpu", model)
    skipping = NoArithmetic(no_arithmetic) if no_arithmetic is not None else contextlib.nullcontext()
    with loss_phases(counter), counter, skipping:
        yield counter


def tensor_figures(counter) -> dict:
    return {"tensor_peak_gib": round(counter.peak_bytes / GIB, 4),
            "tensor_start_gib": round(counter.start_bytes / GIB, 4),
            "tensor_phase_peaks_gib": {k: round(v / GIB, 4) for k, v in counter.phase_peaks.items()},
            "tensor_peak_bytes": counter.peak_bytes, "tensor_start_bytes": counter.start_bytes,
            "tensor_phase_peaks_bytes": dict(counter.phase_peaks)}
