"""qlora_kit.bench: VRAM and speed of QLoRA training, qlora_kit against plain transformers + peft + TRL, in one run.

GPU protocol (../shared/GUIDE.md §4) in one command, on one big GPU from a bare machine (15 minutes of device time
per task, machine start included; 10 per command). Here: `bash ../shared/tools/gpu-wheels.sh` puts the
bitsandbytes / trl / datasets wheels into .whl/; carry .whl/ and run there:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl \
        && export PYTHONPATH=$PWD/.site:$PWD && python3 tools/bench.py --protocol --out $OUT/protocol.json

`--protocol` does the most valuable measurements first and stops itself by 9 minutes (no trial starts that
would end after --max-minutes, 8.5, and one still running then is killed 15 s later): R1-Distill-Llama-8B under the
7.0 GiB cap, the longest sequence that trains for qlora_kit with every switch
(`qlora_kit+offload_activations+embeddings_on_cpu+tiled_mlp`) and then for the baseline, then tokens/s of both at one
length (the shorter of the two longest, at most 4,096; 1,024 without the cap for a setup that fits nothing), with the
planner's error at every trial; then the same for R1-Distill-Qwen-7B, then -1.5B, as time allows. `--protocol
--smoke` is its CPU rehearsal (tests/test_bench.py runs it). The JSON is rewritten after every trial.

Longer series (each command under 10 minutes, stopping by itself; `--resume FILE` continues one):

    python tools/bench.py --smoke --out $OUT/smoke.json                               # ~1 min: CUDA path, tiny models
    python tools/bench.py --models r1-distill-llama-8b --out $OUT/llama-8b.json       # each ~5-8 min
    python tools/bench.py --show bench/results/protocol.json bench/results/llama-8b.json

A command stops starting trials when --max-minutes (default 8.5) would be exceeded, and the JSON is rewritten after
every trial, so a stopped or killed command loses nothing finished. To continue one, copy its JSON into bench/results/
on this side and run the same command with `--resume bench/results/qwen-7b.json`: finished trials are reused.
The memory switches are measured as extra setups: the default is the baseline, qlora_kit as shipped, and
`qlora_kit+offload_activations+embeddings_on_cpu+tiled_mlp` (every switch on); any combination can be named, e.g.
`--setups baseline,qlora_kit,qlora_kit+tiled_mlp` (or `--memory tiled_mlp` to switch one on for `qlora_kit`).

CPU (no GPU here):
- `python tools/bench.py --count` (~40 min on 2 busy cores): live tensors of two real TRL training steps at the three
  targets' real layer dimensions and full vocabularies, 1 and 2 layers deep, 1,024 / 2,048 / 4,096 tokens, bf16
  autocast, for the baseline, qlora_kit and qlora_kit+tiled_mlp (the one switch that acts on a CPU), counted by
  qlora_kit.plan.tensor_peak without arithmetic (NoArithmetic: same allocations, no values; tested equal to the count
  with arithmetic), and the full-depth figure from the counted per-layer increment and from the planner's per-layer
  terms (qlora_kit.bench.counts).
- `python tools/bench.py --smoke`: the whole code path on tiny models in about a minute; fixed lengths only, no cap
  (the OOM search is marked skipped), live tensors instead of VRAM. Both setups run under bf16 autocast, as on a GPU
  (`--cpu-dtype float32` trains qlora_kit the way it trains on a CPU, in float32). tools/calibrate_plan.py uses the
  same trials to check the planner's activation terms on many shapes.

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
