"""results/: what a finished run shows. Base vs fine-tuned samples (samples.md; for GRPO, grpo_samples.py: the held-out
rows judged before and after by the run's rewards) and the one-page report.md.
"""
