"""The teacher: any OpenAI-compatible chat endpoint, through the `openai` client (Ollama, llama.cpp's llama-server, LM
Studio, vLLM, `transformers serve`, or a hosted API).

The key comes only from OPENAI_API_KEY (the client's own convention) and goes nowhere else: not into the job's files,
its log, its rows or its messages. Local servers want none; the client still needs a value, so a placeholder is sent.

Retries are the client's own (exponential back-off, honouring Retry-After) on time-outs, refused connections, 429 and
5xx; what still fails after them is a `RequestFailed` with its kind, and the caller leaves that work for the next run.
`check` runs before any work: an endpoint that does not answer, a key it refuses or a model it does not serve is a
UserError saying which URL and what to start (exit 2), not a failure per request an hour later.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from urllib.parse import urlparse

from qlora_kit.errors import UserError, did_you_mean
from qlora_kit.make_data.replies import reasoning_of

PLACEHOLDER_KEY = "not-needed"
HOW_TO_START = ("Start a local teacher first, for example:\n"
                "  Ollama:        ollama serve   (then: ollama pull deepseek-r1:7b; --base-url http://127.0.0.1:11434/v1)\n"
                "  llama.cpp:     llama-server -m model.gguf --port 8080   (--base-url http://127.0.0.1:8080/v1)\n"
                "  transformers:  transformers serve MODEL --port 8000   (--base-url http://127.0.0.1:8000/v1)\n"
                "or point --base-url at a hosted API and set OPENAI_API_KEY.")


class RequestFailed(Exception):
    """A request that still failed after the client's retries; `kind` names it for the counts."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass(frozen=True)
class Reply:
    content: str
    reasoning: str
    """The reasoning field of a reasoning model's reply ("" when the server sends none)."""
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


def is_local(base_url: str) -> bool:
    """True when the endpoint is this machine (loopback): the documents do not leave it."""
    host = urlparse(base_url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Teacher:
    def __init__(self, base_url: str, model: str, timeout: float = 600.0, retries: int = 4):
        from openai import OpenAI

        self.base_url, self.model = base_url.rstrip("/"), model
        self.client = OpenAI(base_url=self.base_url, api_key=os.environ.get("OPENAI_API_KEY") or PLACEHOLDER_KEY,
                             timeout=timeout, max_retries=retries)

    def check(self) -> None:
        """The endpoint answers, takes the key and serves the model: else one screen saying what to do."""
        import openai

        quick = self.client.with_options(timeout=15.0, max_retries=1)
        try:
            served = [m.id for m in quick.models.list()]
        except openai.AuthenticationError:
            raise UserError(f"{self.base_url} refused the API key (401).",
                            hint="Set OPENAI_API_KEY to a key this endpoint accepts (it is read from the "
                                 "environment only, never saved).") from None
        except openai.PermissionDeniedError:
            raise UserError(f"{self.base_url} refused access (403).", hint="Check the key's permissions.") from None
        except openai.NotFoundError:
            raise UserError(f"{self.base_url} has no /models endpoint: is this an OpenAI-compatible base URL?",
                            hint="The base URL usually ends in /v1 (Ollama: http://127.0.0.1:11434/v1).") from None
        except (openai.APIConnectionError, openai.APITimeoutError) as error:
            raise UserError(f"No OpenAI-compatible server answers at {self.base_url} ({type(error).__name__}).",
                            hint=HOW_TO_START) from None
        except openai.APIStatusError as error:
            raise UserError(f"{self.base_url} answered {error.status_code} to the model list.",
                            hint="Check that the server is up and the URL is its OpenAI-compatible base.") from None
        # A server that lists nothing (some proxies) is taken at its word at the first request instead.
        if served and self.model not in served:
            raise UserError(f"{self.base_url} does not serve the model `{self.model}`"
                            f"{did_you_mean(self.model, served)}.",
                            [f"it serves: {', '.join(served[:12])}" + (" ..." if len(served) > 12 else "")],
                            hint="Pass one of these as --model (Ollama: `ollama pull NAME` first).")

    def chat(self, messages: list[dict], max_tokens: int, temperature: float) -> Reply:
        import openai

        try:
            response = self.client.chat.completions.create(model=self.model, messages=messages,
                                                           max_tokens=max_tokens, temperature=temperature)
        except openai.APITimeoutError as error:
            raise RequestFailed("time-out", str(error)) from None
        except openai.RateLimitError as error:
            raise RequestFailed("rate limited (429)", str(error)) from None
        except openai.InternalServerError as error:
            raise RequestFailed(f"server error ({error.status_code})", str(error)) from None
        except openai.APIConnectionError as error:
            raise RequestFailed("connection lost", str(error)) from None
        except openai.APIStatusError as error:  # 400 (e.g. the prompt exceeds its context), 404, 422 ...
            raise RequestFailed(f"refused ({error.status_code})", str(error)[:300]) from None
        except openai.APIError as error:  # a reply the client cannot read (not JSON, not a chat completion)
            raise RequestFailed("unreadable reply", str(error)[:300]) from None
        if not response.choices:
            raise RequestFailed("empty reply", "the server sent no choices")
        choice = response.choices[0]
        usage = response.usage
        return Reply(choice.message.content or "", reasoning_of(choice.message), choice.finish_reason,
                     getattr(usage, "prompt_tokens", 0) or 0, getattr(usage, "completion_tokens", 0) or 0)
