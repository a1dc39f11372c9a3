"""`qlora-kit COMMAND ...`: every command of the toolkit under one name.

Each command is also `python -m qlora_kit.<module>` (and the tools/*.py wrappers of a checkout); this only picks the
module and tells it the name it was called by, so its --help and the commands it prints are the ones you typed.
Nothing heavy is imported before the command is chosen: `qlora-kit --help` answers at once.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "run": ("qlora_kit.run", "fine-tune from a TOML recipe (--dry-run: check data and template, no weights)"),
    "plan": ("qlora_kit.plan.estimate", "estimate a recipe's peak VRAM before loading any weight (exit 1: no fit)"),
    "chat": ("qlora_kit.chat.cli", "talk to a run (adapter on its 4-bit base) or a merged folder"),
    "merge": ("qlora_kit.merge", "merge a run's adapter into 16-bit weights you can run anywhere"),
    "export": ("qlora_kit.gguf.export", "write a merged folder as a GGUF file (+ Ollama Modelfile) for llama.cpp"),
    "eval": ("qlora_kit.eval", "multiple-choice accuracy, base vs fine-tuned (lm-evaluation-harness)"),
    "bench": ("qlora_kit.bench", "memory and speed against plain transformers + peft + TRL"),
    "make-data": ("qlora_kit.make_data.cli", "documents (PDF, DOCX, Markdown, HTML) to training rows through a teacher "
                  "model on any OpenAI-compatible server"),
    "studio": ("qlora_kit.studio.cli", "the whole run in a browser: data, settings, fit, live charts, chat, export"),
}

_invoked_as: str | None = None


def command_name(default: str) -> str:
    """The name a command was started by: `qlora-kit merge` through this entry point, else `default` (e.g.
    `python -m qlora_kit.merge`). For argparse's prog and for commands printed back to the user."""
    return _invoked_as or default


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: qlora-kit COMMAND [ARGS ...]     (qlora-kit COMMAND --help for one command's options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "example: qlora-kit run recipes/demo.toml"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    global _invoked_as
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        print(f"qlora-kit: unknown command `{name}`{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    _invoked_as = f"qlora-kit {name}"
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
