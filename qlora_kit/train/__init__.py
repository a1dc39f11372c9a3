"""train/: TRL's SFTTrainer (fit.py) and GRPOTrainer (grpo.py, its rewards in rewards.py) from the recipe, and
everything around the training loop: checkpoints and resume, Ctrl-C and out-of-memory, the live view, metrics,
trackers, the artifacts a run leaves behind.
"""
