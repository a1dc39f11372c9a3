"""`python -m qlora_kit.merge RUN_DIR [--out DIR] [--dtype float16] [--into original|dequantized]`

Folds a run's LoRA adapter into the base model and writes a plain transformers model folder
(safetensors shards + index, config.json, generation_config.json, the base's tokenizer files, README.md).

    run dir ─► recipe.toml + adapter/ ─► base checkpoint (local folder, hub cache, or rebuilt random-init)
            ─► refusals (adapter ↔ base, quantized base, output folder, free disk): nothing written yet
            ─► per shard: W (original 16-bit, or its NF4 round trip) + scale·B@A in float32 ─► output dtype
            ─► tokenizer/config files ─► verification (PEFT vs merged logits) ─► README.md ─► publish

One module per step; `cli.merge()` runs them in this order:

    run_dir       the run directory: recipe, adapter folder, training summary
    adapter       the PEFT adapter, read and validated: LoRA modules, their rank, alpha and scale
    base          the base checkpoint, found (hub downloads: hub) and indexed from its file headers
    plan, checks  --into original|dequantized, and every refusal that must come before writing
    sizes         the output's bytes from the base's headers: per tensor (shards), in all (the free-disk check)
    shards        the merged weights, streamed one output shard at a time
    model_files   index, config, generation config and tokenizer files (tokenizer_files: which) beside the shards
    verify        PEFT's logits against the merged folder's, within a per-dtype tolerance
    card          the README.md model card
    staging       the folder is written beside --out and moved into place only when complete

Why not peft's `merge_and_unload()`: on the 4-bit training model it re-quantizes the merged weight (the
update is mostly rounded away), and on a 16-bit model it needs the whole model in memory. Streaming the
base one output shard at a time (--max-shard-size, 1 GB by default) keeps peak RAM near one shard plus the
adapter and the libraries (~0.4 GB), whatever the model size.

Adapters: plain LoRA, rsLoRA, rank/alpha patterns and DoRA are merged. Anything that is not a low-rank
update of a Linear weight (modules_to_save, trainable tokens, LoRA biases, embedding LoRA, base-rewriting
initialisations such as PiSSA) is refused with the setting named, rather than merged approximately.
"""

from qlora_kit.merge.checks import check_free_disk
from qlora_kit.merge.cli import main
from qlora_kit.merge.verify import compare_logits

# main is the entry point; the rest is what tests/test_merge.py reaches for from outside the package.
__all__ = ["main", "check_free_disk", "compare_logits"]
