"""results/: what a finished run shows. Base vs fine-tuned samples (samples.md) and the one-page report.md.
"""
