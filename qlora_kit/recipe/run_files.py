"""The files a run leaves in its output directory (`output.dir`), by name.

Light to import: chat, merge, the evaluation and the studio read a run directory without loading the trainer.


    adapter/          PEFT adapter (PeftModel.from_pretrained) + the tokenizer
    recipe.toml       the resolved recipe: merge and resume need nothing else
    metrics.jsonl     one JSON object per logged step
    loss_curve.png    train (raw + smoothed) and eval loss
    reward_curve.png  (GRPO) reward over the steps, in total and per reward function
    summary.json      steps, wall time, tokens/s, peak memory, final losses
    samples.md        base vs fine-tuned answers to held-out questions (qlora_kit.results.samples)
    report.md         the run on one page, with memory_speed.png (qlora_kit.results.report)
    preview.jsonl     (--dry-run) input_ids and labels of the first examples
    checkpoints/      checkpoint-N/: what resuming needs (adapter, optimizer, scheduler, RNG, trainer state)
"""

ADAPTER_DIR, RECIPE_FILE, METRICS_FILE = "adapter", "recipe.toml", "metrics.jsonl"
CURVE_FILE, SUMMARY_FILE, PREVIEW_FILE = "loss_curve.png", "summary.json", "preview.jsonl"
SAMPLES_FILE, REPORT_FILE, MEMORY_SPEED_FILE = "samples.md", "report.md", "memory_speed.png"
REWARD_CURVE_FILE = "reward_curve.png"
FINISHED_RUN_FILES = (ADAPTER_DIR, SUMMARY_FILE, METRICS_FILE, CURVE_FILE, SAMPLES_FILE, REPORT_FILE, MEMORY_SPEED_FILE,
                      REWARD_CURVE_FILE)
"""What a finished run wrote; --overwrite removes exactly these (and the checkpoints) before training again."""
CHECKPOINT_DIR = "checkpoints"
"""The trainer's output_dir: checkpoint-N/ folders, the newest complete one is what a re-run resumes from."""
