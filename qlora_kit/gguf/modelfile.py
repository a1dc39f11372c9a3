"""The Ollama `Modelfile` written beside a GGUF export: the model's own chat format as an Ollama (Go) TEMPLATE,
its stop tokens, and sampling settings.

Which format a model speaks is read from its Jinja chat template by rendering a few probe conversations
(with and without a system message, with history) and matching the text against a known format:
  * R1 (DeepSeek-R1-Distill): `<｜User｜>…<｜Assistant｜>`, the generation prompt opening the think block;
  * ChatML (SmolLM2, Qwen2/2.5): `<|im_start|>role\\n…<|im_end|>\\n`, with the default system message the
    Jinja template inserts when none is given (SmolLM2's "You are a helpful AI assistant named SmolLM…");
  * Llama 3: `<|start_header_id|>role<|end_header_id|>\\n\\n…<|eot_id|>`.
qlora_kit trains every model to answer `<think>\\n…\\n</think>\\n\\n{answer}` + EOS after the template's own
generation prompt, so only R1's template (whose prompt opens `<think>`) opens the think block; a ChatML or
Llama 3 model opens it itself.

A Modelfile without a matching template or stop token makes Ollama run a model past its end of turn forever,
so for a template that matches none of these no Modelfile is written (the GGUF still carries
`tokenizer.chat_template`, which llama.cpp and LM Studio read) and the reason is printed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from qlora_kit.gguf.tokenizer import TokenizerInfo

R1_BOS, R1_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
R1_USER, R1_ASSISTANT, R1_THINK = "<｜User｜>", "<｜Assistant｜>", "<think>"

# DeepSeek's recommended sampling for the R1 family (model card: temperature 0.5-0.7, top-p 0.95).
R1_PARAMETERS = {"temperature": 0.6, "top_p": 0.95}
# generation_config.json keys and their Ollama PARAMETER names, taken when the model samples (do_sample)
SAMPLING_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k"}

# Probe texts: plain words, so that no template escapes or trims them
SYSTEM, USER, ANSWER, USER2 = "Probe system text.", "Probe question one?", "Probe answer.", "Probe question two?"


@dataclass(frozen=True)
class TurnFormat:
    """A chat format where every turn is `open(role) + text + close` and the generation prompt is
    `open("assistant")` (ChatML, Llama 3)."""

    name: str
    open: str                    # with `{role}`
    close: str
    markers: tuple[str, ...]     # tokens the vocabulary must have (the stops are among them)
    stops: tuple[str, ...]

    def turn(self, role: str, text: str) -> str:
        return self.open.format(role=role) + text + self.close


CHATML = TurnFormat("ChatML", "<|im_start|>{role}\n", "<|im_end|>\n", ("<|im_start|>", "<|im_end|>"),
                    ("<|im_end|>", "<|im_start|>"))
LLAMA3 = TurnFormat("Llama 3", "<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>",
                    ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), ("<|eot_id|>", "<|start_header_id|>"))
TURN_FORMATS = (CHATML, LLAMA3)


@dataclass(frozen=True)
class ChatFormat:
    name: str
    template: str                       # Ollama Go template
    stops: tuple[str, ...]
    parameters: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Reading the Jinja template


def render(tokenizer, messages: list[dict]) -> str | None:
    """The Jinja template's text for `messages` plus the generation prompt; None where the template refuses."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template may raise on any probe (role order, missing variables)
        return None


def probes(tokenizer) -> dict[str, str | None]:
    user, answer, user2 = ({"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER},
                           {"role": "user", "content": USER2})
    return {"plain": render(tokenizer, [user]),
            "system": render(tokenizer, [{"role": "system", "content": SYSTEM}, user]),
            "history": render(tokenizer, [user, answer, user2])}


def without_bos(text: str | None, bos: str | None) -> str | None:
    """The template's text after the BOS it writes itself."""
    return text[len(bos):] if text is not None and bos and text.startswith(bos) else text


def match_turn_format(fmt: TurnFormat, rendered: dict[str, str | None]) -> tuple[str, str | None] | None:
    """(prefix of the system text, default system text or None) when every probe renders as `fmt`, else None.
    The prefix is what the template puts before a given system message (Llama 3.1's knowledge-date lines)."""
    plain, system, history = rendered["plain"], rendered["system"], rendered["history"]
    tail = fmt.turn("user", USER) + fmt.open.format(role="assistant")
    if None in (plain, system, history) or not plain.endswith(tail):
        return None
    default_block = plain[:-len(tail)]
    opening, closing = fmt.open.format(role="system"), fmt.close
    system_suffix = SYSTEM + closing + tail
    if not (system.startswith(opening) and system.endswith(system_suffix)):
        return None
    prefix = system[len(opening):-len(system_suffix)]
    if default_block and not (default_block.startswith(opening) and default_block.endswith(closing)):
        return None
    default = default_block[len(opening):-len(closing)] if default_block else None
    expected_history = (default_block + fmt.turn("user", USER) + fmt.turn("assistant", ANSWER)
                        + fmt.turn("user", USER2) + fmt.open.format(role="assistant"))
    if history != expected_history or (default is None and prefix):
        return None  # a prefix without a default: the template has a system block we cannot name
    if any(marker in text for text in (prefix, default or "") for marker in ("{{", '"""')):
        return None  # would be read as Go template syntax or end the Modelfile's TEMPLATE string
    return prefix, default


def is_r1(tokenizer, info: TokenizerInfo, rendered: dict[str, str | None]) -> bool:
    bos, eos = info.special_tokens.get("bos"), info.special_tokens.get("eos")
    markers = {R1_USER, R1_ASSISTANT, R1_THINK} <= info.tokens and (bos, eos) == (R1_BOS, R1_EOS)
    return markers and f"{R1_USER}{USER}{R1_ASSISTANT}" in (rendered["plain"] or "")


def chat_format(tokenizer, info: TokenizerInfo, sampling: dict[str, float]) -> tuple[ChatFormat | None, str]:
    """The model's chat format for Ollama, or None and the one-line reason why there is none."""
    rendered = probes(tokenizer)
    if is_r1(tokenizer, info, rendered):
        eos = info.special_tokens["eos"]
        return ChatFormat("R1", r1_template(eos), (R1_BOS, eos, R1_USER, R1_ASSISTANT), R1_PARAMETERS), ""
    bos, eos = info.special_tokens.get("bos"), info.special_tokens.get("eos")
    # where llama.cpp adds BOS (add_bos), the Ollama template must not write it again; where it does not,
    # whatever the template writes first is part of the format (SmolLM2's BOS is `<|im_start|>` itself)
    stripped = {name: without_bos(text, bos) if info.add_bos else text for name, text in rendered.items()}
    for fmt in TURN_FORMATS:
        matched = match_turn_format(fmt, stripped)
        if matched is None:
            continue
        missing = [marker for marker in fmt.markers if marker not in info.tokens]
        if missing:
            return None, f"the template is {fmt.name} but the vocabulary lacks {', '.join(missing)}"
        stops = tuple(dict.fromkeys([*fmt.stops, *([eos] if eos else [])]))
        return ChatFormat(fmt.name, turn_template(fmt, *matched), stops, sampling), ""
    return None, ("its chat template is not R1, ChatML or Llama 3 (Ollama would need a hand-written TEMPLATE; "
                  "the GGUF carries the Jinja template for llama.cpp and LM Studio)")


# ---------------------------------------------------------------------------------------------------------------
# Ollama templates. In Go templates `{{-` / `-}}` also delete the whitespace beside the action. The turn
# templates trim only to the right, and only where a layout newline follows: every newline of the chat format
# itself (ChatML's `<|im_end|>\n`) sits in literal text that no trim marker touches.


def r1_template(eos: str) -> str:
    """R1's chat format. As in R1's Jinja template: the system prompt as bare text up front, no BOS (llama.cpp
    adds it, add_bos is set), earlier assistant turns closed by EOS, and the generation prompt opening the
    think block (`<｜Assistant｜><think>` + newline)."""
    return (
        "{{- if .System }}{{ .System }}{{ end }}\n"
        "{{- range $i, $_ := .Messages }}\n"
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
        f'{{{{- if eq .Role "user" }}}}{R1_USER}{{{{ .Content }}}}\n'
        f'{{{{- else if eq .Role "assistant" }}}}{R1_ASSISTANT}{{{{ .Content }}}}'
        f"{{{{- if not $last }}}}{eos}{{{{- end }}}}\n"
        "{{- end }}\n"
        f'{{{{- if and $last (ne .Role "assistant") }}}}{R1_ASSISTANT}{R1_THINK}\n{{{{ end }}}}\n'
        "{{- end }}"
    )


def turn_template(fmt: TurnFormat, system_prefix: str, default_system: str | None) -> str:
    """A turn format (ChatML, Llama 3) as the Jinja template renders it: the system block (the given system
    message after the template's prefix, else the template's default, else none), each user turn closed, each
    assistant turn closed unless it is the last message (a reply being continued), and the generation prompt
    after a final user turn."""
    system_open, close = fmt.open.format(role="system"), fmt.close
    given = f"{system_open}{system_prefix}{{{{ .System }}}}{close}"
    default = f"{{{{ else }}}}{system_open}{default_system}{close}" if default_system is not None else ""
    user, generation = fmt.open.format(role="user"), fmt.open.format(role="assistant")
    return (
        f"{{{{ if .System }}}}{given}{default}{{{{ end -}}}}\n"
        "{{ range $i, $_ := .Messages -}}\n"
        "{{ $last := eq (len (slice $.Messages $i)) 1 -}}\n"
        f'{{{{ if eq .Role "user" }}}}{user}{{{{ .Content }}}}{close}'
        f'{{{{ else if eq .Role "assistant" }}}}{generation}{{{{ .Content }}}}'
        f"{{{{ if not $last }}}}{close}{{{{ end }}}}{{{{ end -}}}}\n"
        f'{{{{ if and $last (ne .Role "assistant") }}}}{generation}{{{{ end -}}}}\n'
        "{{ end -}}"
    )


# ---------------------------------------------------------------------------------------------------------------
# The file


def sampling_settings(folder: Path) -> dict[str, float]:
    """The model's own sampling from generation_config.json, when it samples at all (do_sample)."""
    path = Path(folder) / "generation_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if not config.get("do_sample"):
        return {}
    return {name: config[key] for key, name in SAMPLING_KEYS.items() if config.get(key) is not None}


def modelfile_text(gguf_name: str, fmt: ChatFormat) -> str:
    modelfile = Path(gguf_name).with_suffix(".Modelfile").name
    lines = [f"# Ollama Modelfile written by qlora_kit for {gguf_name} ({fmt.name} chat format): "
             f"`ollama create NAME -f {modelfile}`",
             f"FROM ./{gguf_name}", "", f'TEMPLATE """{fmt.template}"""', ""]
    lines += [f'PARAMETER stop "{stop}"' for stop in fmt.stops]
    lines += [f"PARAMETER {key} {value}" for key, value in fmt.parameters.items()]
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path, folder: Path, tokenizer, info: TokenizerInfo,
                    log: Callable[[str], object] = print) -> Path | None:
    """`NAME.Modelfile` beside `NAME.gguf`, or None (and one line saying why) for a format Ollama would misrun."""
    fmt, reason = chat_format(tokenizer, info, sampling_settings(folder))
    if fmt is None:
        log(f"no Modelfile written: {reason}")
        return None
    path = modelfile_path(gguf_path)
    path.write_text(modelfile_text(gguf_path.name, fmt), encoding="utf-8")
    return path


def chat_trained(folder: Path, log: Callable[[str], object]) -> bool:
    """False when qlora_kit trained this model on a plain or custom prompt format (its recipe travels in the
    merged folder): the Modelfile speaks the chat template's format, which that model never saw."""
    from qlora_kit.recipe.loading import load_recipe
    from qlora_kit.recipe.schema import TRAINING_RECIPE_FILE

    recipe = folder / TRAINING_RECIPE_FILE
    if not recipe.is_file():
        return True

    trained = load_recipe(recipe).data.format
    if trained == "chat":
        return True
    log(f"no Modelfile written: the model was trained on data.format = {trained!r}, not the chat template; "
        "prompt it in that format (the GGUF file itself is complete)")
    return False


def modelfile_path(gguf_path: Path) -> Path:
    """`NAME.Modelfile` beside `NAME.gguf`: one per export, so an f16 and a q8_0 export never share one."""
    return gguf_path.with_suffix(".Modelfile")
