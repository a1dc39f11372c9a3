"""`qlora-kit make-data SOURCE... --out rows.jsonl --base-url URL --model NAME`: documents to training rows.

    files / folders ─► pages (documents.py) ─► chunks in the student's tokens, held-out split (chunks.py)
        ─► the plan: chunks, requests, tokens (and where the documents go) ─► the teacher checked (teacher.py)
        ─► questions, answers, judgements, `--concurrency` at a time (generate.py), every decision logged (job.py)
        ─► rows.jsonl + rows.eval.jsonl, the summary and the rows' lengths against data.max_length (report.py)

Ctrl-C or a kill loses only the requests in flight: the same command continues the job. Exit codes: 0 done, 1 done
with requests that failed (run it again for them), 2 a problem to fix first, 130 interrupted.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from qlora_kit.errors import EXIT_INTERRUPTED, UserError, print_user_error

PROGRAM = "python -m qlora_kit.make_data"
DEFAULT_TOKENIZER = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
TOKENIZER_MARGIN = 1.25
"""The teacher's tokenizer is unknown: its count of a chunk may exceed the student's by this much (Llama 3's vs
Qwen2's on Chinese text differ by about a fifth)."""
EXIT_INCOMPLETE = 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from qlora_kit.cli import command_name

    p = argparse.ArgumentParser(
        prog=command_name(PROGRAM), description="Make Question / reasoning / Response rows from your documents with "
        "a teacher model on any OpenAI-compatible server (Ollama, llama-server, LM Studio, vLLM, transformers serve, "
        "a hosted API). The API key, if the server needs one, is read from OPENAI_API_KEY only.",
        epilog=f"example: {command_name(PROGRAM)} docs/ --out data/rows.jsonl --base-url http://127.0.0.1:11434/v1 "
               "--model deepseek-r1:7b --recipe recipes/medical.toml --max-chunks 3")
    p.add_argument("sources", nargs="*", type=Path, metavar="SOURCE", help="documents or folders of them (PDF, "
                   "DOCX, Markdown, TXT, HTML; folders are read recursively)")
    p.add_argument("--out", type=Path, help="the rows file to write (.jsonl); held-out rows go beside it as "
                   "NAME.eval.jsonl, the job's log in NAME.job/")
    p.add_argument("--base-url", help="the teacher's OpenAI-compatible base URL, e.g. http://127.0.0.1:11434/v1")
    p.add_argument("--model", help="the teacher model's name on that server")
    student = p.add_argument_group("the student (whose tokens the chunks are measured in)")
    student.add_argument("--recipe", type=Path, help="a training recipe: its model's tokenizer and data.max_length")
    student.add_argument("--tokenizer", help=f"a tokenizer folder or hub id (default: the recipe's, else "
                         f"{DEFAULT_TOKENIZER})")
    student.add_argument("--max-length", type=int, help="the training max_length the rows are measured against "
                         "(default: the recipe's data.max_length, else 2048)")
    chunking = p.add_argument_group("chunks")
    chunking.add_argument("--chunk-tokens", type=int, default=700, help="tokens per chunk, at most (default 700)")
    chunking.add_argument("--overlap", type=int, default=100, help="tokens repeated from the previous chunk of the "
                          "same section (default 100)")
    chunking.add_argument("--context", type=int, default=4096, help="the teacher's context window in tokens: chunk "
                          "+ prompt + reply must fit (default 4096, Ollama's default; raise it with the server's)")
    chunking.add_argument("--eval-share", type=float, default=0.1, help="share of the documents held out (for one "
                          "document: of its sections); 0: none (default 0.1)")
    chunking.add_argument("--max-chunks", type=int, default=0, help="only the first N chunks: a trial (the same "
                          "command without it continues the job)")
    asking = p.add_argument_group("the teacher")
    asking.add_argument("--questions-per-chunk", type=int, default=3, help="questions asked per chunk (default 3)")
    asking.add_argument("--lang", choices=("auto", "en", "zh"), default="auto", help="the prompts' language "
                        "(auto: each document's own)")
    asking.add_argument("--min-score", type=int, default=7, help="the judge's grounding score (1-10) a row needs "
                            "(default 7)")
    asking.add_argument("--answer-tokens", type=int, default=2048, help="the longest reply to a question, "
                        "reasoning included (default 2048); a reply cut there is refused")
    asking.add_argument("--temperature", type=float, default=0.6, help="for questions and answers (the judge: 0)")
    asking.add_argument("--concurrency", type=int, help="requests in flight at once (default 2 for a server on "
                        "this machine, which keeps it busy between requests; 4 for a remote one)")
    asking.add_argument("--timeout", type=float, default=600.0, help="seconds per request before it is retried "
                        "(default 600: a local server may take minutes to load a model)")
    asking.add_argument("--prompts", type=Path, help="a folder of your own prompt files (see --export-prompts)")
    asking.add_argument("--export-prompts", type=Path, metavar="DIR", help="write the default prompts to DIR to edit, "
                        "then exit")
    p.add_argument("--dry-run", action="store_true", help="read and chunk, show the chunks, the plan and the exact "
                   "prompts; send nothing (with --out, the chunks also go to NAME.job/preview.jsonl)")
    p.add_argument("--restart", action="store_true", help="discard this job's rows and log and start over")
    p.add_argument("--overwrite", action="store_true", help="replace an --out file that no make-data job wrote")
    return p.parse_args(sys.argv[1:] if argv is None else argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return make_data(args)
    except UserError as error:
        print_user_error(error)
        return error.exit_code


def check_args(args: argparse.Namespace) -> None:
    problems = []
    if not args.sources:
        problems.append("no SOURCE: give documents or folders")
    if not args.dry_run:
        problems += [f"{flag} is needed" for flag, value in (("--out", args.out), ("--base-url", args.base_url),
                                                              ("--model", args.model)) if not value]
    if args.out and args.out.suffix != ".jsonl":
        problems.append(f"--out {args.out}: name a .jsonl file (the rows file a recipe reads)")
    for flag, value, low in (("--questions-per-chunk", args.questions_per_chunk, 1), ("--chunk-tokens",
                             args.chunk_tokens, 64), ("--answer-tokens", args.answer_tokens, 64),
                             ("--context", args.context, 512), ("--overlap", args.overlap, 0),
                             ("--max-chunks", args.max_chunks, 0)):
        if value < low:
            problems.append(f"{flag} must be at least {low}, got {value}")
    if not 1 <= args.min_score <= 10:
        problems.append(f"--min-score must be from 1 to 10, got {args.min_score}")
    if not 0 <= args.eval_share < 1:
        problems.append(f"--eval-share must be from 0 to below 1, got {args.eval_share}")
    if args.concurrency is not None and args.concurrency < 1:
        problems.append(f"--concurrency must be at least 1, got {args.concurrency}")
    if problems:
        raise UserError("make-data cannot start:", problems, hint=f"See {PROGRAM} --help.")


def student_tokenizer(args: argparse.Namespace, console):
    """(tokenizer, max_length, its name): --tokenizer, else the recipe's model's, else R1-Distill-Qwen's."""
    from qlora_kit.model.loading import load_tokenizer
    from qlora_kit.recipe.schema import ModelSection

    max_length = args.max_length
    if args.recipe:
        from qlora_kit.model.gguf_base import prepare_gguf_base
        from qlora_kit.recipe.loading import load_recipe

        recipe = load_recipe(args.recipe)
        model = recipe.model
        max_length = max_length or recipe.data.max_length
        if not args.tokenizer:
            prepare_gguf_base(model, weights=False)  # a .gguf base: its tokenizer, written once into the cache
    if args.tokenizer or not args.recipe:
        model = ModelSection(name=args.tokenizer or DEFAULT_TOKENIZER)
    return load_tokenizer(model), max_length or 2048, model.tokenizer or model.name


def make_data(args: argparse.Namespace) -> int:
    from qlora_kit.console import make_console

    console = make_console()
    if args.export_prompts:
        from qlora_kit.make_data.prompts import export_prompts

        written = export_prompts(args.export_prompts)
        console.print(f"wrote {len(written)} prompt files into {args.export_prompts} (existing files kept); use them "
                      f"with --prompts {args.export_prompts}")
        return 0
    check_args(args)
    from qlora_kit.make_data.checks import language_of
    from qlora_kit.make_data.documents import Document, find_documents, read_documents
    from qlora_kit.make_data.prompts import load_prompts

    prompts = {lang: load_prompts(lang, args.prompts) for lang in ("en", "zh")}  # a bad prompt file: refused now
    paths = find_documents(args.sources)
    console.rule("[bold]documents")
    documents, skipped = [], 0
    for item in read_documents(paths):
        if isinstance(item, Document):
            documents.append(item)
            console.print(f"  {item.path}: {item.kind}, {len(item.pages)} page(s)")
        else:
            skipped += 1
            console.print(f"[yellow]  skipped {item.path}: {item.reason}")
    if not documents:
        raise UserError(f"None of the {len(paths)} file(s) could be read ({skipped} skipped, reasons above).",
                        hint="Give PDF (with a text layer), DOCX, Markdown, TXT or HTML files.")

    from qlora_kit.console import quiet_libraries

    quiet_libraries()
    tokenizer, max_length, tokenizer_name = student_tokenizer(args, console)

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    language = {doc.path: args.lang if args.lang != "auto" else
                language_of(" ".join(p.text for p in doc.pages)[:20000]) for doc in documents}
    templates = template_tokens(prompts, count)
    budget = chunk_budget(args, templates)
    from qlora_kit.make_data.chunks import chunk_documents

    chunks = chunk_documents(documents, count, budget, min(args.overlap, budget // 2), args.eval_share,
                             name=lambda d: shown_path(d.path))
    if args.max_chunks:
        chunks = chunks[:args.max_chunks]
    lang_of_source = {shown_path(doc.path): language[doc.path] for doc in documents}

    def prompts_for(chunk):
        return prompts[lang_of_source[chunk.source]]

    return run_job(args, console, chunks, prompts_for, templates, tokenizer, tokenizer_name, max_length,
                   budget, prompts)


def run_job(args, console, chunks, prompts_for, templates, tokenizer, tokenizer_name, max_length, budget,
            prompts) -> int:
    from qlora_kit.make_data.generate import Asking, Generation
    from qlora_kit.make_data.job import Job
    from qlora_kit.make_data.report import Progress, length_lines, plan_lines, show_summary, summary, write_summary
    from qlora_kit.make_data.teacher import Teacher, is_local

    asking = Asking(questions_per_chunk=args.questions_per_chunk, min_score=args.min_score,
                    temperature=args.temperature, answer_tokens=args.answer_tokens)
    console.rule("[bold]plan")
    console.print(f"chunks of at most {budget} tokens of {tokenizer_name} (teacher context {args.context}, replies up "
                  f"to {args.answer_tokens} tokens), overlap {min(args.overlap, budget // 2)}")
    if not chunks:
        raise UserError("The documents hold no text to make rows from.", hint="Check the skipped files above.")
    if args.dry_run:
        for line in plan_lines(chunks, asking, templates):
            console.print(line)
        show_chunks(console, chunks, prompts_for, asking)
        if args.out:  # the chunks as a file as well, for a page that shows them (the studio)
            from qlora_kit.make_data.job import write_preview

            console.print(f"the chunks, as the job would keep them: {write_preview(args.out, chunks)}")
        console.print("[bold]dry run:[/] nothing was sent.")
        return 0
    local = is_local(args.base_url)
    if not local:
        from urllib.parse import urlparse

        console.print(f"[bold yellow]the documents leave this machine:[/] every chunk is sent to "
                      f"{urlparse(args.base_url).hostname}. A teacher on this machine (Ollama, llama-server) keeps "
                      "them here.")
    teacher = Teacher(args.base_url, args.model, timeout=args.timeout)
    teacher.check()
    # What makes rows of one kind (the server's address does not: the same model may move to another port or host).
    settings = {"sources": sorted(str(p.resolve()) for p in args.sources), "model": args.model,
                "tokenizer": tokenizer_name, "chunk_tokens": budget, "overlap": args.overlap,
                "eval_share": args.eval_share, "lang": args.lang, "questions_per_chunk": args.questions_per_chunk,
                "min_score": args.min_score, "answer_tokens": args.answer_tokens, "prompts": prompts_digest(prompts)}
    job = Job(args.out, settings, restart=args.restart, overwrite=args.overwrite)
    generation = Generation(chunks, prompts_for, teacher, job, asking,
                            args.concurrency or (2 if local else 4), progress=None)
    try:  # from the first file written on, Ctrl-C ends in the summary and exit 130, never a traceback
        job.start(chunks)
        generation.pending()
        for line in plan_lines(chunks, asking, templates):
            console.print(line)
        if job.resumed:
            console.print(f"[bold]continuing[/] the job in {job.folder}: {len(job.state.rows)} rows kept so far; "
                          f"{len(generation.asks)} chunks to ask, {len(generation.answers)} questions to answer")
        generation.progress = Progress(console, len(generation.asks), len(generation.answers),
                                       args.questions_per_chunk)
        outcome = generation.run()
    except KeyboardInterrupt:
        outcome = generation.outcome
        outcome.interrupted = True
    finally:
        if generation.progress is not None:
            generation.progress.close()
        job.close()
    content = summary(job, chunks, outcome)
    content["lengths"] = length_lines(list(job.state.rows.values()), tokenizer, max_length)
    write_summary(job, content)
    show_summary(console, content)
    for line in content["lengths"]:
        console.print(f"  {line}")
    if outcome.interrupted:
        console.print("[bold yellow]stopped[/]: what was kept is saved; the requests in flight are lost. Run the "
                      "same command to continue.")
        return EXIT_INTERRUPTED
    eval_file = job.eval_out if content["rows_eval"] else None
    if job.state.rows:
        console.print("train on them: data.source = " + f'"{job.out}"' +
                      (f', data.eval_source = "{eval_file}"' if eval_file else ""))
    if outcome.failed or content["chunks_not_asked"] or content["questions_not_answered"]:
        kinds = ", ".join(f"{n} {kind}" for kind, n in outcome.failed.items())
        console.print(f"[bold red]incomplete:[/] {kinds or 'requests'} failed after retries; "
                      f"{content['chunks_not_asked']} chunks and {content['questions_not_answered']} questions are "
                      "still to do. Run the same command again to do them.")
        return EXIT_INCOMPLETE
    if not job.state.rows:  # finished, and nothing to train on: not a success to report as one
        console.print("[bold red]no row was kept:[/] see the reasons above (a small teacher often cannot follow the "
                      "prompts; try a larger one, or edit the prompts: --export-prompts).")
        return EXIT_INCOMPLETE
    return 0


def show_chunks(console, chunks, prompts_for, asking) -> None:
    from rich.table import Table

    table = Table(title="chunks", title_justify="left")
    for column in ("id", "document", "pages", "section", "tokens", "split"):
        table.add_column(column)
    for chunk in chunks:
        table.add_row(chunk.id, chunk.source, chunk.pages, chunk.heading[:40], str(chunk.tokens), chunk.split)
    console.print(table)
    first = chunks[0]
    prompts = prompts_for(first)
    console.rule(f"[bold]the prompts for chunk {first.id}[/] (exactly as sent)")
    console.print("[bold]1. questions[/]", highlight=False)
    console.print(prompts.fill("questions", document=first.source, where=prompts.where(first), text=first.text,
                               count=asking.questions_per_chunk), highlight=False, markup=False)
    console.print("[bold]2. the answer, for each question[/]", highlight=False)
    console.print(prompts.fill("answer", document=first.source, where=prompts.where(first), text=first.text,
                               question="QUESTION"), highlight=False, markup=False)
    console.print("[bold]3. the judge, for each answer[/]", highlight=False)
    console.print(prompts.fill("judge", text=first.text, question="QUESTION", answer="ANSWER"), highlight=False,
                  markup=False)


def template_tokens(prompts: dict, count) -> dict[str, int]:
    """Tokens of each prompt around its chunk (the larger language's), for the budget and the plan."""
    empty = {"document": "document.pdf", "where": " (pages 10-11)", "text": "", "count": 3,
             "question": "x" * 120, "answer": ""}
    return {name: max(count(p.texts[name].format_map(empty)) for p in prompts.values())
            for name in ("questions", "answer", "judge")}


def chunk_budget(args: argparse.Namespace, templates: dict[str, int]) -> int:
    """The chunk size that lets the longest request (the answer prompt and its reply) fit the teacher's context,
    with room for the teacher's tokenizer counting more than the student's."""
    room = int((args.context - args.answer_tokens - max(templates.values())) / TOKENIZER_MARGIN)
    if room < 128:
        raise UserError(f"--context {args.context} leaves no room for a chunk beside a {args.answer_tokens}-token "
                        "reply.", hint="Raise --context to the teacher's real window (Ollama: OLLAMA_CONTEXT_LENGTH; "
                                       "llama-server: -c), or lower --answer-tokens.")
    return min(args.chunk_tokens, room)


def prompts_digest(prompts: dict) -> str:
    """Prompt files changed between two runs of a job would mix rows of two kinds: the job refuses that."""
    text = "\n".join(p.texts[name] for p in prompts.values() for name in sorted(p.texts))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def shown_path(path: Path) -> str:
    """A document as the rows name it: relative to where the command runs when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


if __name__ == "__main__":
    sys.exit(main())
