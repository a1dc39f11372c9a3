"""`python -m qlora_kit.chat RUN_DIR_OR_MERGED_DIR [--prompt "..."] [--greedy] [--max-new-tokens N] [--hide-think]
[--base]`

Talk to a fine-tuned model. Two kinds of folder:

    run dir     adapter/ + recipe.toml, as `qlora_kit.run` leaves it: the base is loaded as the run loaded it
                (4-bit, or rebuilt from its seed for model.init = "random") and the adapter goes on top
    merged dir  config.json + safetensors (`qlora_kit.merge`): a plain transformers model, 16-bit on a GPU,
                float32 on the CPU

Questions are rendered as in training and answered with DeepSeek's R1 settings (qlora_kit.chat.generate). The
reasoning streams dimmed above a rule, then the answer; --hide-think shows only the answer. Each question
is answered on its own (no history): that is how the model was fine-tuned, and R1's template drops earlier
reasoning anyway.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_kit.chat.loading import Loaded, load_merged, load_run, locate
from qlora_kit.errors import EXIT_INTERRUPTED, UserError, print_user_error

if TYPE_CHECKING:  # generate imports torch and transformers: `--help` and the folder checks stay instant
    from qlora_kit.chat.generate import GenerationSettings, Reply

EXIT_COMMANDS = ("/exit", "/quit")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from qlora_kit.cli import command_name

    parser = argparse.ArgumentParser(
        prog=command_name("python -m qlora_kit.chat"),
        description="Chat with a fine-tuned reasoning model: a run directory (adapter on its 4-bit base) or a "
                    "merged model folder.",
        epilog="examples:\n  python -m qlora_kit.chat runs/medical\n"
               "  python -m qlora_kit.chat runs/medical --prompt \"Is 39.8 °C a fever?\" --greedy\n"
               "  python -m qlora_kit.chat runs/medical/merged --hide-think",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", metavar="RUN_DIR_OR_MERGED_DIR",
                        help="a run directory (adapter/ + recipe.toml) or a merged model folder")
    parser.add_argument("--prompt", help="answer this one question and exit (default: interactive)")
    parser.add_argument("--greedy", action="store_true",
                        help="greedy decoding, for reproducible checks (R1 models tend to repeat themselves)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=2048, metavar="N",
                        help="longest reply in tokens, reasoning included (default 2048)")
    parser.add_argument("--seed", type=int, default=42, help="sampling seed, re-applied for every question")
    parser.add_argument("--base", action="store_true",
                        help="answer with the adapter disabled: the base model as the run loaded it (a run directory "
                             "only), for a side-by-side comparison with the fine-tuned answers")
    think = parser.add_mutually_exclusive_group()
    think.add_argument("--show-think", dest="show_think", action="store_true", default=True,
                       help="stream the reasoning, dimmed, before the answer (default)")
    think.add_argument("--hide-think", dest="show_think", action="store_false", help="show only the answer")
    return parser.parse_args(argv)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return chat(args)
    except UserError as error:
        print_user_error(error)
        return error.exit_code


def chat(args: argparse.Namespace) -> int:
    from rich.console import Console

    from qlora_kit.chat.generate import GenerationSettings
    from qlora_kit.console import make_console, quiet_libraries

    quiet_libraries()
    source = locate(Path(args.model_dir))
    if args.base and source.kind != "run":
        raise UserError(f"--base needs a run directory; {source.dir} is a merged folder (its adapter is merged in).",
                        hint="Pass the run directory the merged folder came from, or chat with the base model's own "
                             "folder.")
    # The reply goes to stdout; what was loaded goes to stderr, so `--prompt ... > answer.txt` keeps only the reply.
    # notes: no wrapping off a terminal, so a long model path stays on one line (qlora_kit.console).
    console, notes = Console(highlight=False, soft_wrap=True), make_console(stderr=True, highlight=False)
    with notes.status(f"loading {source.dir}"):
        loaded = load_run(source.dir) if source.kind == "run" else load_merged(source.dir)
    notes.print(f"[dim]{loaded.description}" + (" [bold](adapter disabled: the base answers)" if args.base else ""))
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, greedy=args.greedy, seed=args.seed)
    from contextlib import nullcontext

    from qlora_kit.chat.cpu_inference import dequantized_weights

    # peft's disable_adapter(): the same loaded base without the LoRA update, as samples.md compares them.
    adapter_off = loaded.model.disable_adapter() if args.base else nullcontext()
    with dequantized_weights(loaded.model), adapter_off:  # a 4-bit base on a CPU: dequantized once, not per token
        if args.prompt is not None:
            try:
                answer(loaded, args.prompt, settings, console, args.show_think)
            except KeyboardInterrupt:
                console.print()
                return EXIT_INTERRUPTED
            return 0
        interactive(loaded, settings, console, args.show_think)
    return 0


# ------------------------------------------------------------------------------------------------ talking


class ReplyPrinter:
    """Streams one reply: the reasoning dimmed under a `thinking` rule (or a transient spinner when hidden),
    then an `answer` rule and the answer as it comes."""

    def __init__(self, console, show_think: bool):
        self.console, self.show_think = console, show_think
        self.started_think = False
        self.at_line_start = True
        self.status = None

    def think(self, text: str) -> None:
        if not self.started_think:
            self.started_think = True
            if self.show_think:
                self.console.rule("[dim]thinking", style="dim")
            else:
                self.status = self.console.status("[dim]thinking…")
                self.status.start()
        if self.show_think:
            self._write(text, "dim")

    def switch(self) -> None:
        """The reasoning ended (`</think>`): the answer follows."""
        self._stop_spinner()
        if self.show_think:
            self._end_line()
            self.console.rule("answer")

    def answer(self, text: str) -> None:
        self._write(text)

    def finish(self, reply: Reply, settings: GenerationSettings) -> None:
        self.close()
        if reply.opened and not reply.closed:
            why = (f"the reasoning did not finish within --max-new-tokens {settings.max_new_tokens}"
                   if not reply.finished else "the model stopped inside its reasoning")
            self.console.print(f"[yellow](no answer: {why})")
        elif not reply.finished:
            self.console.print(f"[yellow](cut at --max-new-tokens {settings.max_new_tokens}: the answer goes on; "
                               "raise it to read the rest)")

    def _write(self, text: str, style: str = "") -> None:
        from rich.text import Text

        self.console.print(Text(text, style=style), end="")
        self.at_line_start = text.endswith("\n")

    def _end_line(self) -> None:
        if not self.at_line_start:
            self.console.print()
            self.at_line_start = True

    def close(self) -> None:
        """Leave the console clean (spinner gone, cursor on a fresh line), also when the reply was cut short."""
        self._stop_spinner()
        self._end_line()

    def _stop_spinner(self) -> None:
        if self.status:
            self.status.stop()
            self.status = None


def answer(loaded: Loaded, question: str, settings: GenerationSettings, console, show_think: bool) -> Reply:
    """Answer one question, streaming it to the console. Returns the Reply."""
    from qlora_kit.chat.generate import ask

    printer = ReplyPrinter(console, show_think)
    try:
        reply = ask(loaded.model, loaded.tokenizer, question, loaded.fmt, settings,
                    on_think=printer.think, on_answer=printer.answer, on_switch=printer.switch)
    except BaseException:  # Ctrl-C mid-reply: the spinner must not keep spinning over the next prompt
        printer.close()
        raise
    printer.finish(reply, settings)
    return reply


def interactive(loaded: Loaded, settings: GenerationSettings, console, show_think: bool) -> None:
    console.print(f"[bold]qlora_kit chat[/] · {settings.describe()}\n"
                  f"[dim]Each question is answered on its own. Ctrl-C stops a reply; "
                  f"{' or '.join(EXIT_COMMANDS)} or Ctrl-D quits.")
    while True:
        try:
            question = console.input("[bold cyan]you ›[/] ").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if question in EXIT_COMMANDS:
            return
        if not question:
            continue
        try:
            answer(loaded, question, settings, console, show_think)
        except KeyboardInterrupt:
            console.print("\n[yellow](stopped)")


if __name__ == "__main__":
    sys.exit(main())
