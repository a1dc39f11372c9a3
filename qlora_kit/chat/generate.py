"""Generate answers to reasoning questions: the prompt rendered exactly as training rendered it, DeepSeek's
R1 sampling settings, tokens streamed as they come, and the reply split into its reasoning and its answer.

    question ─► qlora_kit.data.render, as in training (data.format: the chat template with its generation prompt)
             ─► model.generate: temperature 0.6, top_p 0.95, seeded (or greedy) ─► pieces streamed as they come
             ─► split at `</think>` into (think, answer); a reply that never opened `<think>` is all answer

The prompt is the template's own: a newer R1 template ends inside the think block (`<think>\\n`); for any other
model (an older R1 template, ChatML, Llama 3) the model decides by itself whether it opens one, which is what
format compliance counts (a base model answers directly, a model fine-tuned here opens the block).

For the plain and custom formats (`data.format`), the "think" part is the template's reasoning section and the
separator is the template text between `{cot}` and `{response}` (e.g. "### Answer:")."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import TextStreamer

from qlora_kit.data.encode import Encoder
from qlora_kit.data.render import Renderer, make_renderer
from qlora_kit.data.replies import Markers, Split, in_format, markers_for, split_think, stop_ids
from qlora_kit.data.rows import Row
from qlora_kit.recipe.schema import DataSection

# DeepSeek's usage recommendations for R1 and its distills: temperature 0.5-0.7 (0.6 recommended) and
# top_p 0.95; greedy decoding makes them repeat themselves, so greedy is for reproducible checks only.
R1_TEMPERATURE, R1_TOP_P = 0.6, 0.95

TextCallback = Callable[[str], None]


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 1024
    """Reasoning models think before they answer: too few tokens and the think block never closes."""
    greedy: bool = False
    """Always take the most likely token: reproducible, but R1 models tend to loop when decoded greedily."""
    temperature: float = R1_TEMPERATURE
    top_p: float = R1_TOP_P
    seed: int = 42
    """Sampling is re-seeded before every reply: the same question with the same seed gives the same reply."""

    def describe(self) -> str:
        if self.greedy:
            how = "greedy"
        else:
            how = f"sampling (temperature {self.temperature}, top_p {self.top_p}, seed {self.seed})"
        return f"{how}, up to {self.max_new_tokens} new tokens"


# ------------------------------------------------------------------------------------------------ prompts


@dataclass(frozen=True)
class PromptFormat:
    """How questions become prompts (as in training) and where a reply's reasoning starts and ends."""

    render: Renderer
    bos_id: int | None
    """BOS to put in front of the prompt's ids, for tokenizers that use one (None: the tokenizer has none)."""
    separator: str | None
    """Text between the reasoning and the answer; None when the format has no reasoning part."""
    opener: str | None = None
    """Text that opens the reasoning when the model writes it itself (`<think>` in the chat format); None: the
    prompt's end is already inside the reasoning (plain and custom templates)."""

    def prompt(self, question: str) -> str:
        """The prompt exactly as training rendered it: the chat template's own generation prompt, never a
        `<think>` added to it. A newer R1 template opens the block itself; any other model decides whether to."""
        return self.render(Row(question=question, cot="", response="", number=0)).prompt

    def prompt_ids(self, tokenizer, question: str) -> list[int]:
        """Token ids exactly as encode.py builds the prompt of a training example: no special tokens
        added by the tokenizer, and one BOS (the R1 template already writes it as text)."""
        ids = tokenizer(self.prompt(question), add_special_tokens=False).input_ids
        if self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]
        return ids

    @property
    def markers(self) -> Markers:
        return Markers(self.separator, self.opener)

    def starts_inside(self, question: str) -> bool:
        """Does the reply start inside the reasoning (the prompt opened it, or the format has no opener)?"""
        return self.markers.starts_inside(self.prompt(question))

    def split(self, text: str, starts_inside: bool) -> Split:
        return split_think(text, self.separator, self.opener, starts_inside)


def prompt_format(tokenizer, data: DataSection | None = None) -> PromptFormat:
    """The prompt format of a run (its recipe's data section) or, without a recipe, the model's chat template."""
    data = data or DataSection()
    renderer, _ = make_renderer(tokenizer, data)
    markers = markers_for(tokenizer, data)
    return PromptFormat(renderer, Encoder(tokenizer, renderer).bos_id, markers.separator, markers.opener)


# ------------------------------------------------------------------------------------------------ streaming


class ThinkRouter:
    """Routes streamed text to `on_think` while the reply is reasoning and to `on_answer` after it, as split_think
    splits the whole text.

    Markers may arrive split across pieces, so text that could still be the start of one is held back until the
    next piece decides. The markers themselves are never passed on, nor the blank lines that open the answer.
    """

    def __init__(self, separator: str | None, on_think: TextCallback, on_answer: TextCallback,
                 on_switch: Callable[[], None] = lambda: None, opener: str | None = None, starts_inside: bool = True):
        self.separator, self.opener = separator, opener
        self.on_think, self.on_answer, self.on_switch = on_think, on_answer, on_switch
        # "start": the reply may still open with the opener (the model's own, or a stray one after a prompt that
        # opened the block already); then "think" or "answer".
        self.starts_inside = starts_inside
        self.state = "answer" if separator is None else "start" if opener else "think"
        self.held = ""
        self.think_started = self.answer_started = False

    def feed(self, piece: str) -> None:
        text, self.held = self.held + piece, ""
        if self.state == "start":
            head = text.lstrip()
            if head.startswith(self.opener):
                self.state, text = "think", head[len(self.opener):]
            elif self.opener.startswith(head):
                self.held = text  # still undecided (empty so far, or a part of the opener)
                return
            else:
                self.state = "think" if self.starts_inside else "answer"
        if self.state == "think":
            before, found, after = text.partition(self.separator)
            if not found:
                self._think(self._hold_partial(text))
                return
            self._think(before)
            self.state = "answer"
            self.on_switch()
            text = after
        if self.separator is not None:  # a second separator is dropped, not shown as part of the answer
            text = self._hold_partial(text.replace(self.separator, ""))
        self._answer(text)

    def close(self) -> None:
        """End of the stream: what was held back is text after all."""
        held, self.held = self.held, ""
        if not held:
            return
        if self.state == "think" or (self.state == "start" and self.starts_inside):
            self._think(held)
        else:
            self._answer(held)

    def _hold_partial(self, text: str) -> str:
        keep = _partial_suffix(text, self.separator)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def _think(self, text: str) -> None:
        if not self.think_started:
            text = text.lstrip()  # the newline after <think>
            self.think_started = bool(text)
        if text:
            self.on_think(text)

    def _answer(self, text: str) -> None:
        if not self.answer_started:
            text = text.lstrip()  # the "\n\n" after </think>
            self.answer_started = bool(text)
        if text:
            self.on_answer(text)


def _partial_suffix(text: str, separator: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `separator`."""
    for size in range(min(len(separator) - 1, len(text)), 0, -1):
        if separator.startswith(text[-size:]):
            return size
    return 0


class CallbackStreamer(TextStreamer):
    """transformers' word-by-word streamer, handing each finished piece to a callback instead of print()."""

    def __init__(self, tokenizer, on_text: TextCallback):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.on_text(text)


# ------------------------------------------------------------------------------------------------ generation


@dataclass
class Reply:
    think: str
    answer: str
    text: str
    """Everything generated, special tokens removed."""
    new_tokens: int
    finished: bool
    """True when the model ended the reply itself (EOS); False when max_new_tokens cut it."""
    closed: bool
    """True when the reasoning ended (the separator, `</think>`, was generated) or the format has none."""
    opened: bool = True
    """True when the reply has a reasoning part (the prompt or the model opened it)."""
    blocks: int = 1
    """Reasoning blocks opened or closed (the format has exactly one)."""

    @property
    def in_format(self) -> bool:
        """The trained format, whole (qlora_kit.data.replies.in_format): one reasoning block opened and closed, a
        non-empty answer, and EOS before the limit."""
        return in_format(Split(self.think, self.answer, self.opened, self.closed, self.blocks), self.finished)


def input_device(model) -> torch.device:
    """Where the token ids must go: where the input embedding computes. With memory.embeddings_on_cpu on a GPU,
    accelerate keeps that matrix in RAM (its parameter reads `meta` between passes) and runs it on the GPU."""
    embedding = model.get_input_embeddings()
    execution = getattr(getattr(embedding, "_hf_hook", None), "execution_device", None)
    if execution is not None:
        return torch.device(execution if not isinstance(execution, int) else f"cuda:{execution}")
    device = embedding.weight.device
    if device.type == "meta":
        device = next(p.device for p in model.parameters() if p.device.type != "meta")
    return device


def generation_config(model, tokenizer, settings: GenerationSettings):
    """The model's own generation config (its EOS ids) with our decoding choices on top."""
    config = copy.deepcopy(model.generation_config)
    config.max_new_tokens = settings.max_new_tokens
    config.do_sample = not settings.greedy
    # Greedy ignores these; neutral values keep transformers from warning that they are unused.
    config.temperature = 1.0 if settings.greedy else settings.temperature
    config.top_p = 1.0 if settings.greedy else settings.top_p
    config.use_cache = True  # load_model turns the cache off for training; generation needs it
    config.eos_token_id = sorted(stop_ids(model, tokenizer))  # stop at the end of the answer, as trained
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    return config


@torch.no_grad()
def generate_ids(model, tokenizer, prompt_ids: list[int], settings: GenerationSettings,
                 on_text: TextCallback | None = None) -> list[int]:
    """The new token ids after the prompt; each decoded piece goes to `on_text` as soon as it is whole."""
    inputs = torch.tensor([prompt_ids], device=input_device(model))
    torch.manual_seed(settings.seed)  # seeds the CPU and every CUDA device
    output = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                            generation_config=generation_config(model, tokenizer, settings),
                            streamer=CallbackStreamer(tokenizer, on_text) if on_text else None)
    return output[0, len(prompt_ids):].tolist()


def ask(model, tokenizer, question: str, fmt: PromptFormat, settings: GenerationSettings,
        on_think: TextCallback | None = None, on_answer: TextCallback | None = None,
        on_switch: Callable[[], None] | None = None) -> Reply:
    """Answer one question; with callbacks, the reasoning and the answer stream to them as they come."""
    router = None
    inside = fmt.starts_inside(question)
    if on_think or on_answer or on_switch:
        router = ThinkRouter(fmt.separator, on_think or _ignore, on_answer or _ignore, on_switch or (lambda: None),
                             opener=fmt.opener, starts_inside=inside)
    new_ids = generate_ids(model, tokenizer, fmt.prompt_ids(tokenizer, question), settings,
                           router.feed if router else None)
    if router:
        router.close()
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    split = fmt.split(text, inside)
    reasoning = fmt.separator is not None  # a format without a reasoning part asks only for the answer and EOS
    return Reply(split.think, split.answer, text, len(new_ids),
                 finished=bool(new_ids) and new_ids[-1] in stop_ids(model, tokenizer),
                 closed=not reasoning or split.closed, opened=not reasoning or split.opened,
                 blocks=split.blocks if reasoning else 1)


def _ignore(text: str) -> None:
    pass
