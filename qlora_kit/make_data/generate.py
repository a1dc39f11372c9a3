"""The teacher at work: questions per chunk, then for each question its reasoning and answer and the judge's score,
`concurrency` requests in flight at once, every decision logged as it is made (job.py).

    chunk ─► questions (numbered list; asked again once if not one) ─► each question checked, near-duplicates out
          ─► answer with reasoning (an answer without any: its reasoning asked for in a follow-up) (checked)
          ─► judge: grounded in the chunk? (asked again once if no score)
          ─► kept (row appended) or refused (reason logged)

Requests run on daemon worker threads and only the main thread touches the job's files and the duplicate index, so
no lock is needed and Ctrl-C leaves nothing half-recorded: what was in flight is simply asked again next time.
A request that still fails after the client's retries (time-out, 429, 5xx, connection lost) is counted by kind and
left undone; the job then ends incomplete, saying so, and the same command does the rest.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from qlora_kit.make_data.checks import QuestionIndex, answer_problem, question_problem
from qlora_kit.make_data.chunks import Chunk
from qlora_kit.make_data.job import Job
from qlora_kit.make_data.prompts import Prompts
from qlora_kit.make_data.replies import Answer, Refused, read_answer, read_questions, read_score
from qlora_kit.make_data.teacher import RequestFailed, Teacher


@dataclass(frozen=True)
class Asking:
    questions_per_chunk: int = 3
    min_score: int = 7
    temperature: float = 0.6
    question_tokens: int = 512
    answer_tokens: int = 2048
    judge_tokens: int = 256


@dataclass
class Outcome:
    requests: int = 0
    failed: Counter = field(default_factory=Counter)
    """Requests that failed after the client's retries, by kind (this run only: their work is still to do)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    interrupted: bool = False


def question_id(chunk_id: str, number: int, question: str) -> str:
    """A question's id (and its row's): its chunk, its place in the teacher's list (a question given twice has two
    ids, and the second is refused as a duplicate, not silently merged), its text."""
    return hashlib.sha1(f"{chunk_id}\n{number}\n{question}".encode()).hexdigest()[:12]


class Workers:
    """Daemon threads that run requests: the process can always exit, whatever a server is still doing."""

    def __init__(self, count: int):
        self.todo: queue.Queue = queue.Queue()
        self.done: queue.Queue = queue.Queue()
        for _ in range(count):
            threading.Thread(target=self.work, daemon=True).start()

    def work(self) -> None:
        while True:
            key, job = self.todo.get()
            try:
                self.done.put((key, job(), None))
            except Exception as error:  # noqa: BLE001 - handed to the main thread, which decides
                self.done.put((key, None, error))

    def submit(self, key, job: Callable) -> None:
        self.todo.put((key, job))


class Generation:
    def __init__(self, chunks: list[Chunk], prompts_for: Callable[[Chunk], Prompts], teacher: Teacher, job: Job,
                 asking: Asking, concurrency: int, progress):
        self.chunks = {chunk.id: chunk for chunk in chunks}
        self.prompts_for, self.teacher, self.job, self.asking = prompts_for, teacher, job, asking
        self.concurrency, self.progress = concurrency, progress
        self.index = QuestionIndex()
        self.outcome = Outcome()
        # (kind, chunk, question id, question). Answers go first: a chunk's rows arrive soon after its questions,
        # and the questions of the next chunks fill the requests in flight whenever no answer is waiting.
        self.answers: list[tuple] = []
        self.asks: list[tuple] = []

    # -- planning what is left ---------------------------------------------------------------------------------
    def pending(self) -> int:
        """Replay the log in its order (the duplicate index decides as it did), then what is still to ask."""
        state = self.job.state
        for chunk_id, questions in list(state.questions.items()):
            if chunk_id in self.chunks:
                self.screen(self.chunks[chunk_id], questions)
        asked = set(state.questions) | set(state.refused_chunks)
        self.asks = [("questions", chunk, "", "") for chunk in self.chunks.values() if chunk.id not in asked]
        return len(self.asks) + len(self.answers)

    def screen(self, chunk: Chunk, questions: list[str]) -> None:
        """Check a chunk's questions; those that pass wait for their answer (unless an earlier run decided them)."""
        state = self.job.state
        for number, question in enumerate(questions):
            qid = question_id(chunk.id, number, question)
            done = qid in state.decided or qid in state.rows
            reason = ("question: more than the number asked" if number >= self.asking.questions_per_chunk
                      else question_problem(question))
            if not reason and not self.index.add(question):
                reason = "question: near-duplicate of an earlier one"
            if done:
                continue
            if reason:
                self.job.decide(qid, chunk.id, kept=False, reason=reason)
            else:
                self.answers.append(("answer", chunk, qid, question))

    # -- the loop ----------------------------------------------------------------------------------------------
    def run(self) -> Outcome:
        started = time.monotonic()
        workers = Workers(self.concurrency)
        in_flight = 0
        try:
            while self.answers or self.asks or in_flight:
                while (self.answers or self.asks) and in_flight < self.concurrency:
                    kind, chunk, qid, question = (self.answers or self.asks).pop(0)
                    ask = self.ask_questions if kind == "questions" else self.ask_answer
                    workers.submit((kind, chunk, qid, question),
                                   lambda a=ask, c=chunk, q=question, i=qid: a(c, q, i))
                    in_flight += 1
                key, result, error = workers.done.get()
                in_flight -= 1
                self.settle(key, result, error)
        except KeyboardInterrupt:
            self.outcome.interrupted = True
        self.outcome.seconds = time.monotonic() - started
        return self.outcome

    def settle(self, key: tuple, result, error: Exception | None) -> None:
        kind, chunk, qid, question = key
        if isinstance(error, RequestFailed):
            self.outcome.failed[error.kind] += 1
            self.progress.failed(kind)
            return
        if error is not None:
            raise error
        replies, value = result
        for reply in replies:
            self.outcome.requests += 1
            self.outcome.prompt_tokens += reply.prompt_tokens
            self.outcome.completion_tokens += reply.completion_tokens
        if kind == "questions":
            waiting = len(self.answers)
            if isinstance(value, Refused):
                self.job.record_refused_chunk(chunk.id, value.reason)
            else:
                self.job.record_questions(chunk.id, value)
                self.screen(chunk, value)
            self.progress.chunk_done(len(self.answers) - waiting)  # the questions that passed, to be answered
            return
        if isinstance(value, str):  # the reason the answer or its grounding was refused
            self.job.decide(qid, chunk.id, kept=False, reason=value)
        else:
            self.job.keep(value, chunk.split)
        self.progress.question_done(kept=not isinstance(value, str))

    # -- requests (on the worker threads) -----------------------------------------------------------------------
    def ask_questions(self, chunk: Chunk, *_):
        prompts, n = self.prompts_for(chunk), self.asking.questions_per_chunk
        messages = [{"role": "user", "content": prompts.fill("questions", document=chunk.source,
                                                             where=prompts.where(chunk), text=chunk.text, count=n)}]
        replies = []
        for attempt in range(2):
            reply = self.teacher.chat(messages, self.asking.question_tokens, self.asking.temperature)
            replies.append(reply)
            try:
                return replies, read_questions(read_answer(reply.content).answer or reply.content)
            except Refused as refused:
                reason = "questions: cut off at the token limit" if reply.finish_reason == "length" \
                    else refused.reason
                if attempt:
                    return replies, Refused(reason)
                messages += [{"role": "assistant", "content": reply.content},
                             {"role": "user", "content": prompts.fill("questions_retry", problem=reason, count=n)}]
        raise AssertionError("unreachable")

    def ask_answer(self, chunk: Chunk, question: str, qid: str):
        """(replies, the row) when kept, (replies, the reason) when not."""
        prompts = self.prompts_for(chunk)
        prompt = prompts.fill("answer", document=chunk.source, where=prompts.where(chunk), text=chunk.text,
                              question=question)
        reply = self.teacher.chat([{"role": "user", "content": prompt}], self.asking.answer_tokens,
                                  self.asking.temperature)
        answer = read_answer(reply.content, reply.reasoning)
        replies, score = [reply], None
        if answer.answer and not answer.reasoning and reply.finish_reason != "length":
            # No reasoning field, no <think> block: a teacher that ignored the request is asked for it explicitly.
            follow_up = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply.content},
                         {"role": "user", "content": prompts.fill("reasoning")}]
            explained = self.teacher.chat(follow_up, self.asking.answer_tokens, self.asking.temperature)
            replies.append(explained)
            reasoning = read_answer(explained.content, explained.reasoning)
            text = reasoning.answer or reasoning.reasoning
            if explained.finish_reason != "length" and text:
                answer = Answer(text, answer.answer, "asked after the answer")
        problem = answer_problem(answer.reasoning, answer.answer, reply.finish_reason)
        if problem:
            return replies, problem
        messages = [{"role": "user", "content": prompts.fill("judge", text=chunk.text, question=question,
                                                             answer=answer.answer)}]
        for attempt in range(2):
            judged = self.teacher.chat(messages, self.asking.judge_tokens, 0.0)
            replies.append(judged)
            try:
                score = read_score(read_answer(judged.content).answer or judged.content)
                break
            except Refused as refused:
                if attempt:
                    return replies, refused.reason
                messages += [{"role": "assistant", "content": judged.content},
                             {"role": "user", "content": prompts.fill("judge_retry", problem=refused.reason)}]
        if score < self.asking.min_score:
            return replies, f"grounding: judge's score below {self.asking.min_score}"
        return replies, {"Question": question, "Complex_CoT": answer.reasoning, "Response": answer.answer,
                         "source": chunk.source, "page": chunk.pages or None, "section": chunk.heading,
                         "chunk": chunk.id, "score": score, "reasoning_from": answer.reasoning_from,
                         "teacher": self.teacher.model, "id": qid}
