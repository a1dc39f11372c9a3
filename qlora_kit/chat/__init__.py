"""chat/: talk to a model. Load a run (4-bit base + adapter) or a merged folder, render the question as training
rendered it, generate (streamed, fast on a CPU), and the `python -m qlora_kit.chat` command.
"""
