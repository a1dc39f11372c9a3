"""A teacher of the tests' own: a real HTTP server process speaking the OpenAI chat-completions protocol (the
endpoints make-data uses: GET /v1/models, POST /v1/chat/completions), which answers from the passage it is sent,
the same way every time, and misbehaves on purpose when asked to:

    python tests/teacher_server.py PORT MODE [LOG]

    good        questions from the passage's sentences, answers with a <think> block, the judge's "Score: 9"
    reasoning   the same, the reasoning in the reply's `reasoning_content` field (as DeepSeek's API and vLLM send it)
    plain       answers without any reasoning (a small teacher that ignores <think>), explains when asked after
    broken      questions as JSON cut off mid-list ("Unexpected end of JSON input"), every time
    flaky       a 500 for every other request (the client's retries get through)
    down        a 500 for every chat request
    slow        as good, each reply after 1 s (a kill lands mid-job)
    stall       never answers a chat request in time (30 s): the client's time-out
    locked      401 to everything (a key the server refuses)

Each request is appended to LOG (one JSON line: its kind and question), so a test can count what was asked.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "test-teacher"


def kind_of(prompt: str) -> str:
    if "Score: N" in prompt and ("Answer:" in prompt or "回答：" in prompt):
        return "judge"
    if "numbered list" in prompt or "编号" in prompt:
        return "questions"
    return "answer"


def sentences(prompt: str) -> list[str]:
    passage = prompt.split("<passage>", 1)[-1].split("</passage>", 1)[0]
    lines = [line for line in passage.splitlines() if line.strip() and not line.startswith("#")]
    return [s.strip() for s in re.split(r"(?<=[.!?。])\s*", " ".join(lines)) if len(s.strip()) > 8]


def reply(prompt: str, mode: str) -> tuple[str, str]:
    """(content, reasoning_content) for a prompt."""
    kind = kind_of(prompt)
    if kind == "questions":
        if mode == "broken":
            return '{"questions": ["What does hepatitis B', ""
        found = sentences(prompt)[:3] or ["This chunk has no sentence"]
        chinese = "编号" in prompt
        questions = [(f"关于“{s[:24]}”，可以得出什么结论？" if chinese else f"What follows from: {s[:60]}?")
                     for s in found]
        return "\n".join(f"{n}. {q}" for n, q in enumerate(questions, start=1)), ""
    if kind == "answer":
        question = prompt.split("Question:", 1)[-1].split("\n", 1)[0].strip() if "Question:" in prompt \
            else prompt.split("问题：", 1)[-1].split("\n", 1)[0].strip()
        thought = f"The question asks {question} The passage states it directly."
        answer = f"As stated: {question.removeprefix('What follows from: ').rstrip('?')}."
        if mode == "reasoning":
            return answer, thought
        if mode == "plain":
            return answer, ""
        return f"<think>\n{thought}\n</think>\n\n{answer}", ""
    return "Score: 9\nEvery claim is in the passage.", ""


class Handler(BaseHTTPRequestHandler):
    mode = "good"
    log_path = ""
    count = 0
    lock = threading.Lock()

    def log_message(self, *args):  # quiet
        pass

    def send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.mode == "locked":
            return self.send(401, {"error": {"message": "invalid api key", "type": "invalid_request_error"}})
        if self.path.rstrip("/") == "/v1/models":
            return self.send(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "tests"}]})
        return self.send(404, {"error": {"message": "not found"}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.mode == "locked":
            return self.send(401, {"error": {"message": "invalid api key"}})
        prompt = body["messages"][0]["content"]
        kind = kind_of(prompt)
        with Handler.lock:
            Handler.count += 1
            number = Handler.count
            if self.log_path:
                with open(self.log_path, "a", encoding="utf-8") as f:
                    marker = "Question:" if "Question:" in prompt else "问题："
                    question = prompt.split(marker, 1)[-1].split("\n", 1)[0].strip() if kind != "questions" else ""
                    f.write(json.dumps({"kind": kind, "question": question, "retry": len(body["messages"]) > 1}) + "\n")
        if self.mode == "down" or (self.mode == "flaky" and number % 2):
            return self.send(500, {"error": {"message": "the teacher fell over", "type": "server_error"}})
        if self.mode == "stall":
            time.sleep(30)
        if self.mode == "slow":
            time.sleep(1.0)
        content, reasoning = reply(prompt, self.mode)
        if kind == "answer" and len(body["messages"]) > 1:  # the follow-up asking for the reasoning
            content, reasoning = "The passage states it in so many words, so that is the answer.", ""
        message = {"role": "assistant", "content": content}
        if reasoning:
            message["reasoning_content"] = reasoning
        words = len(prompt.split())
        return self.send(200, {"id": f"c{number}", "object": "chat.completion", "created": 0, "model": MODEL,
                               "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                               "usage": {"prompt_tokens": words, "completion_tokens": len(content.split()),
                                         "total_tokens": words + len(content.split())}})


def main() -> None:
    port, mode = int(sys.argv[1]), sys.argv[2]
    Handler.mode, Handler.log_path = mode, sys.argv[3] if len(sys.argv) > 3 else ""
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
