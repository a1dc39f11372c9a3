"""qlora_kit.bench: VRAM and speed of QLoRA training, qlora_kit against plain transformers + peft + TRL, in one run.

GPU protocol (../shared/GUIDE.md §4) on one H100, every command under the 10-minute limit:

    python tools/bench.py --smoke --out $OUT/smoke.json                               # ~1 min: CUDA path, tiny models
    python tools/bench.py --smoke --budget-gib 0.05 --out $OUT/smoke-oom.json         # optional: real OOMs, tiny
    python tools/bench.py --models r1-distill-qwen-1.5b --out $OUT/qwen-1.5b.json     # each ~5-8 min, stops by itself
    python tools/bench.py --models r1-distill-qwen-7b --out $OUT/qwen-7b.json
    python tools/bench.py --models r1-distill-llama-8b --out $OUT/llama-8b.json
    python tools/bench.py --show bench/results/qwen-1.5b.json bench/results/qwen-7b.json bench/results/llama-8b.json

The same protocol as one command (about 20 minutes, hence the split above):

    python tools/bench.py --models r1-distill-qwen-1.5b,r1-distill-qwen-7b,r1-distill-llama-8b --budget-gib 7.0 \
        --out $OUT/bench.json

A command stops starting trials when --max-minutes (default 8.5) would be exceeded, and the JSON is rewritten after
every trial, so a stopped or killed command loses nothing finished. To continue one, copy its JSON into bench/results/
on this side and run the same command with `--resume bench/results/qwen-7b.json`: finished trials are reused.
The memory switches are measured as extra setups: the default is the baseline, qlora_kit as shipped, and
`qlora_kit+offload_activations+embeddings_on_cpu+tiled_mlp` (every switch on); any combination can be named, e.g.
`--setups baseline,qlora_kit,qlora_kit+tiled_mlp` (or `--memory tiled_mlp` to switch one on for `qlora_kit`).
Three setups take ~1.5x the time of two: if a command stops at --max-minutes, resume it (above).

CPU (no GPU here): `python tools/bench.py --smoke` runs the whole code path on tiny models in well under a minute;
fixed lengths only, no cap (the OOM search is marked skipped), and live tensors counted op by op
(qlora_kit.tensor_peak) stand in for VRAM, next to the planner's CPU estimate. tools/calibrate_plan.py uses the same
trials to check the planner's activation terms on many shapes.

What one trial is
- Model: the architecture of qlora_kit.architectures.ARCHITECTURES with random weights (memory and speed do not
  depend on weight values). Route: `AutoModelForCausalLM.from_pretrained` is swapped, for the trial only, for
  `<ArchClass>.from_pretrained(None, config=..., state_dict=...)` where the state dict holds random bf16 CPU tensors.
  transformers' own loader then quantizes each Linear to NF4 (double quant) on the GPU as it is placed, keeps
  embeddings / lm_head / norms 16-bit, applies the device_map and dispatch hooks, exactly as from files. So the
  qlora_kit setup runs the unmodified `qlora_kit.model.load_model` and the baseline its own `from_pretrained` call;
  no 15 GB checkpoint is written. Layers share their (random) source tensors, so building an 8B model needs ~3 GB
  of host RAM and a few seconds.
- Data: random token ids of one fixed length, batch 1; labels on every token but a short prompt.
- qlora_kit: load_model + add_lora + build_trainer from a recipe (LoRA r 32, alpha 64, all linear layers,
  dropout 0; grad_accum 1), i.e. our SFTConfig, fp32 adapters (keep_adapter_fp32), paged 8-bit AdamW, memory switches.
- baseline: `from_pretrained(quantization_config=BitsAndBytesConfig(nf4, double quant, bf16 compute),
  dtype=bfloat16, device_map={"": 0})` and `SFTTrainer(model, peft_config=LoraConfig(same LoRA),
  args=SFTConfig(output_dir, per_device_train_batch_size=1, max_steps, report_to="none", bf16=True))`, TRL 1.16
  defaults otherwise. Deviations, none of which changes memory or speed: max_length = the trial length (the default
  1024 would truncate the sequence), logging_steps=1 (to record the loss), save_strategy="no", disable_tqdm.
- Memory: torch.cuda.set_per_process_memory_fraction(budget / total) emulates an 8 GB laptop GPU; the figure is
  torch.cuda.max_memory_reserved() over load + training, next to the planner's `estimate(...).reserved`.
  bitsandbytes' paged optimizer state lives in CUDA managed memory, outside PyTorch's allocator (so outside both the
  figure and the cap): it is reported separately as paged_optimizer_gib.
- Speed: tokens/s over --steps optimizer steps after --warmup steps, timed with torch.cuda.synchronize().
- A fixed length that runs out of memory under the cap is run again without it (kind "uncapped", marked † in
  the table): what it would need, the planner's error there, and tokens/s for the speed comparison. The planner
  predicts that 7B/8B at LoRA r 32 do not fit 7 GiB even at 1k tokens; without this there would be no numbers.
- Longest sequence: an exponential + binary search in multiples of 256 that starts at the planner's prediction; a
  length "fits" when --search-steps steps (the 2nd step runs with the optimizer state allocated) train without
  torch.OutOfMemoryError.

Process isolation: trials run in a worker process (multiprocessing "spawn": fresh interpreter, fresh CUDA context).
The worker builds a fresh model for every trial and, after each success, frees everything (gc + empty_cache) and
checks that allocated memory is back where it started. After an OOM, any error, or a failed check the worker exits
and the next trial gets a new process: an OOM leaves tensors referenced from the traceback and a fragmented cache,
bitsandbytes never frees its paged (managed) buffers, and TRL patches the model in place. Reusing a healthy worker
saves ~5-10 s of imports per trial, several minutes of the 30-minute GPU budget over a full protocol; `--isolate`
gives every trial its own process instead.

Files, one job each: `cli` (command line, `main(argv)`), `setups` (what is compared, the planner's prediction),
`runner` (the parent: trials in order, the time budget, the document on disk), `worker` (the worker process and
the parent's handle on it), `trial` (one trial inside the worker: model, data, trainer, figures), `search` (the
longest-sequence search), `document` (the results JSON), `tables` (its Markdown).
"""

from __future__ import annotations


def main(argv=None) -> int:
    from qlora_kit.bench.cli import main as cli_main

    return cli_main(argv)
