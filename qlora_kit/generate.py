"""Generate answers to reasoning questions: the prompt rendered exactly as training rendered it, DeepSeek's
R1 sampling settings, tokens streamed as they come, and the reply split into its reasoning and its answer.

    question ─► qlora_kit.render, as in training (data.format: the chat template with its generation prompt)
             ─► the prompt ends inside the think block (`<think>\\n` appended where the template leaves it out)
             ─► model.generate: temperature 0.6, top_p 0.95, seeded (or greedy) ─► pieces streamed as they come
             ─► split at `</think>` into (think, answer)

For the plain and custom formats (`data.format`), the "think" part is the template's reasoning section and the
separator is the template text between `{cot}` and `{response}` (e.g. "### Answer:")."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import TextStreamer

from qlora_kit.data import Row
from qlora_kit.encode import Encoder
from qlora_kit.recipe import DataSection
from qlora_kit.render import PLAIN_TEMPLATE, THINK_CLOSE, THINK_OPEN, Renderer, make_renderer

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
    """How questions become prompts (as in training) and where a reply's reasoning ends."""

    render: Renderer
    bos_id: int | None
    """BOS to put in front of the prompt's ids, for tokenizers that use one (None: the tokenizer has none)."""
    opens_think: bool
    """Chat format: the prompt must end inside the think block, as the training completions started there."""
    separator: str | None
    """Text between the reasoning and the answer; None when the format has no reasoning part."""

    def prompt(self, question: str) -> str:
        text = self.render(Row(question=question, cot="", response="", number=0)).prompt
        return open_think_block(text) if self.opens_think else text

    def prompt_ids(self, tokenizer, question: str) -> list[int]:
        """Token ids exactly as encode.py builds the prompt of a training example: no special tokens
        added by the tokenizer, and one BOS (the R1 template already writes it as text)."""
        ids = tokenizer(self.prompt(question), add_special_tokens=False).input_ids
        if self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]
        return ids

    def split(self, text: str) -> tuple[str, str]:
        return split_think(text, self.separator)


def prompt_format(tokenizer, data: DataSection | None = None) -> PromptFormat:
    """The prompt format of a run (its recipe's data section) or, without a recipe, the model's chat template."""
    data = data or DataSection()
    renderer, _ = make_renderer(tokenizer, data)
    bos_id = Encoder(tokenizer, renderer).bos_id
    chat = data.format == "chat" and bool(getattr(tokenizer, "chat_template", None))
    if chat:
        return PromptFormat(renderer, bos_id, opens_think=True, separator=THINK_CLOSE)
    # make_renderer falls back to the plain layout when a chat-format tokenizer has no template.
    template = data.format if data.format not in ("chat", "plain") else PLAIN_TEMPLATE
    return PromptFormat(renderer, bos_id, opens_think=False, separator=template_separator(template))


def open_think_block(prompt: str) -> str:
    """End the prompt inside the think block, as render.think_completion started the training completions:
    newer R1 templates end with `<think>\\n` already, older ones at the assistant tag."""
    if prompt.endswith(THINK_OPEN + "\n"):
        return prompt
    if prompt.endswith(THINK_OPEN):
        return prompt + "\n"
    return f"{prompt}{THINK_OPEN}\n"


def template_separator(template: str) -> str | None:
    """The literal text between {cot} and {response} in a plain/custom template. None: no reasoning part, or only
    whitespace between the two, which cannot be told apart from the text itself."""
    cot, response = template.find("{cot}"), template.find("{response}")
    if cot < 0 or response < 0:
        return None
    return template[cot + len("{cot}"):response].strip() or None


def split_think(text: str, separator: str | None = THINK_CLOSE) -> tuple[str, str]:
    """(think, answer) of a generated text that started inside the think block.

    No separator in the text means the reasoning never finished (it ran out of tokens): all of it is
    reasoning and the answer is empty. A stray `<think>` at the start (models whose prompt did not open
    the block) is dropped.
    """
    if separator is None:
        return "", text.strip()
    text = text.lstrip()
    if text.startswith(THINK_OPEN):
        text = text[len(THINK_OPEN):]
    think, found, answer = text.partition(separator)
    return think.strip(), answer.strip() if found else ""


# ------------------------------------------------------------------------------------------------ streaming


class ThinkRouter:
    """Routes streamed text to `on_think` until the separator appears, then to `on_answer`.

    The separator may arrive split across pieces, so the tail of the text that could still be the start
    of it is held back until the next piece decides. The separator itself and the blank lines after it
    are not passed on.
    """

    def __init__(self, separator: str | None, on_think: TextCallback, on_answer: TextCallback,
                 on_switch: Callable[[], None] = lambda: None):
        self.separator = separator
        self.on_think, self.on_answer, self.on_switch = on_think, on_answer, on_switch
        self.in_think = separator is not None
        self.held = ""
        self.answer_started = False

    def feed(self, piece: str) -> None:
        if not self.in_think:
            self._answer(piece)
            return
        text = self.held + piece
        before, found, after = text.partition(self.separator)
        if found:
            self.held = ""
            self._think(before)
            self.in_think = False
            self.on_switch()
            self._answer(after)
            return
        keep = _partial_suffix(text, self.separator)
        self.held = text[len(text) - keep:] if keep else ""
        self._think(text[:len(text) - keep])

    def close(self) -> None:
        """End of the stream: what was held back was reasoning after all."""
        if self.held:
            self._think(self.held)
            self.held = ""

    def _think(self, text: str) -> None:
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
    if on_think or on_answer or on_switch:
        router = ThinkRouter(fmt.separator, on_think or _ignore, on_answer or _ignore, on_switch or (lambda: None))
    new_ids = generate_ids(model, tokenizer, fmt.prompt_ids(tokenizer, question), settings,
                           router.feed if router else None)
    if router:
        router.close()
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    think, answer = fmt.split(text)
    eos = model.generation_config.eos_token_id
    eos_ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])}
    return Reply(think, answer, text, len(new_ids), finished=bool(new_ids) and new_ids[-1] in eos_ids,
                 closed=fmt.separator is None or fmt.separator in text)


def _ignore(text: str) -> None:
    pass
