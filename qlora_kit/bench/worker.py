"""The worker process that runs trials (a fresh interpreter and CUDA context), and the parent's handle on it."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
import traceback
from pathlib import Path

from qlora_kit.bench.document import library_versions
from qlora_kit.bench.setups import GIB, LEAK_TOLERANCE
from qlora_kit.bench.trial import (
    bench_tokenizer,
    build_bench_trainer,
    build_model,
    make_step_timer,
    measurements,
    memory_figures,
    optimizer_figures,
    tensor_figures,
    tensor_peak,
)


class Worker:
    """One spawned process that runs trials until one fails; `run` restarts it as needed."""

    def __init__(self, log_dir: Path, prefix: str):
        self.log_dir, self.prefix = log_dir, prefix
        self.process = self.conn = None
        self.count = 0
        self.device: dict | None = None
        self.start_s = 0.0

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def start(self, timeout: float) -> dict:
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # never fork a process that may hold a CUDA context
        parent_conn, child_conn = context.Pipe()
        self.count += 1
        self.log_path = self.log_dir / f"{self.prefix}worker-{self.count}.log"
        started = time.monotonic()
        # Not a daemon: daemonic processes may not start processes of their own. If this parent dies, the worker
        # reads EOF from the pipe and exits.
        self.process = context.Process(target=worker_main, args=(child_conn, str(self.log_path)))
        self.process.start()
        child_conn.close()
        self.conn = parent_conn
        reply = self._receive(timeout)
        if reply.get("status") != "ready":
            self.stop()
            raise RuntimeError(f"the worker did not start: {reply.get('error')}\n{self.log_tail()}")
        self.start_s = time.monotonic() - started
        self.device = reply["device"]
        return reply

    def run(self, spec: dict, timeout: float) -> dict:
        started = time.monotonic()
        fresh = not self.alive
        if fresh:
            try:
                self.start(timeout)
            except RuntimeError as e:
                return {"status": "crashed", "error": str(e)}
        self.conn.send(spec)
        result = self._receive(max(1.0, timeout - (time.monotonic() - started)))
        if fresh:
            result["worker_start_s"] = round(self.start_s, 1)
        if result.get("status") != "ok" or result.get("restart"):
            self.stop()
        return result

    def _receive(self, timeout: float) -> dict:
        try:
            if self.conn.poll(timeout):
                return self.conn.recv()
        except (EOFError, OSError):  # the pipe closed: the process died mid-trial
            self.process.join(5)
            reply = {"status": "crashed", "error": f"the worker died (exit code {self.process.exitcode})",
                     "log_tail": self.log_tail()}
            self.stop()
            return reply
        self.stop(kill=True)  # busy, so it would not read a polite request to stop
        return {"status": "timeout", "error": f"no answer within {timeout:.0f} s", "log_tail": self.log_tail()}

    def stop(self, kill: bool = False) -> None:
        if self.process is None:
            return
        if self.process.is_alive() and not kill:
            with contextlib.suppress(OSError):
                self.conn.send(None)
            self.process.join(15)
        if self.process.is_alive():
            self.process.kill()  # our own child, by its handle
            self.process.join(5)
        self.conn.close()
        self.process = self.conn = None

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        except OSError:
            return ""




def worker_main(conn, log_path: str) -> None:
    """Entry point of the spawned process: answer trial specs until told to stop or a trial fails."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)  # the libraries' own output (and C-level prints) goes to the log, not the table
    os.dup2(log, 2)
    sys.stdout.reconfigure(line_buffering=True)
    # Nothing here needs the network and the GPU box has none: without this, peft looks up config.json of the
    # (made-up) base model name on the hub and may wait for a connection timeout.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        started = time.monotonic()
        device = setup_device()
        versions = {**library_versions(), "cuda": device.pop("cuda", None), "python": platform.python_version()}
        from qlora_kit.console import quiet_libraries

        quiet_libraries()
        import trl  # noqa: F401  (import cost belongs to the start-up, not to the first trial)

        conn.send({"status": "ready", "device": device, "versions": versions,
                   "import_s": round(time.monotonic() - started, 1)})
    except Exception as e:  # noqa: BLE001 - reported to the parent, which prints the log
        traceback.print_exc()
        conn.send({"status": "error", "error": f"{type(e).__name__}: {e}"})
        return
    baseline_allocated = _allocated()
    while True:
        try:
            spec = conn.recv()
        except EOFError:
            return
        if spec is None:
            return
        print(f"\n=== {spec['model']} {spec['setup']} {spec['kind']} {spec['length']} ===", flush=True)
        result = run_trial(spec)
        leaked = _allocated() - baseline_allocated
        if result["status"] == "ok" and leaked > LEAK_TOLERANCE:
            result["restart"] = f"{leaked / GIB:.2f} GiB still allocated after the trial"
        conn.send(result)
        if result["status"] != "ok" or result.get("restart"):
            return  # the parent starts a fresh process for the next trial


def setup_device() -> dict:
    import torch

    if not torch.cuda.is_available():
        import psutil

        # Tiny smoke models gain nothing from threads, and on a busy machine OpenMP threads waiting for each other
        # make every small matmul ~50x slower.
        torch.set_num_threads(1)
        return {"kind": "cpu", "name": platform.processor() or platform.machine(), "budget_gib": None,
                "total_gib": round(psutil.virtual_memory().total / GIB, 2), "threads": torch.get_num_threads()}
    props = torch.cuda.get_device_properties(0)
    return {"kind": "cuda", "name": props.name, "total_gib": round(props.total_memory / GIB, 2),
            "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}


def apply_cap(spec: dict) -> None:
    """GUIDE §4: the caching allocator refuses to reserve more than budget / total of the GPU (an 8 GB laptop
    card minus CUDA context and display). Set before each trial, before any of its allocations."""
    import torch

    if not torch.cuda.is_available():
        return
    total = torch.cuda.get_device_properties(0).total_memory
    budget = spec["settings"]["budget_gib"] * GIB
    if spec["capped"] and budget > total:
        raise ValueError(f"--budget-gib {spec['settings']['budget_gib']} exceeds this {total / GIB:.1f} GiB GPU")
    torch.cuda.set_per_process_memory_fraction(budget / total if spec["capped"] else 1.0, 0)


def _allocated() -> int:
    import torch

    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def run_trial(spec: dict) -> dict:
    """Build, train, measure; never raises. Memory figures are read even after an OOM (they show the cap)."""
    import gc
    import tempfile

    import torch

    cuda = torch.cuda.is_available()
    result = {"status": "ok"}
    started = time.monotonic()
    phase = "build"
    model = trainer = timer = None
    reports: list[str] = []
    try:
        apply_cap(spec)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with tempfile.TemporaryDirectory(prefix="qlora_kit-bench-") as folder:
            tokenizer = bench_tokenizer()
            with loader_reports(reports):
                model = build_model(spec)
            result["build_s"] = round(time.monotonic() - started, 2)
            if cuda:
                result["weights_gib"] = round(torch.cuda.memory_allocated() / GIB, 3)  # 4-bit model + LoRA
            phase = "trainer"
            timer = make_step_timer(cuda)
            trainer = build_bench_trainer(spec, model, tokenizer, Path(folder), timer)
            phase = "train"
            with tensor_peak(cuda, trainer.model, spec["settings"].get("no_arithmetic_min_elements")) as counter:
                trainer.train()
            result.update(measurements(spec, trainer, timer))
            if counter is not None:
                result.update(tensor_figures(counter))
            if spec["settings"].get("no_arithmetic_min_elements") is not None:  # no values: no speed, no losses
                result.update(tokens_per_s=None, losses=[], step_s=[])
    except Exception as e:  # noqa: BLE001 - every failure becomes a record
        oom = isinstance(e, torch.OutOfMemoryError) or _looks_like_oom(e, reports)
        result.update(status="oom" if oom else "error", phase=phase,
                      error=f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500])
        if not oom:
            traceback.print_exc()
            result["traceback"] = traceback.format_exc()[-3000:]
        e.__traceback__ = None  # frames hold activations; the worker exits anyway
    result.update(memory_figures(cuda))
    if trainer is not None:
        result.update(optimizer_figures(trainer))
    result["wall_s"] = round(time.monotonic() - started, 2)
    del model, trainer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def _looks_like_oom(error: Exception, reports: list[str] = ()) -> bool:
    """An allocation refused under the cap that does not arrive as torch.OutOfMemoryError: a cuBLAS workspace
    (CUBLAS_STATUS_ALLOC_FAILED), or an OOM inside transformers' on-the-fly quantization, which it logs in its
    load report and re-raises as a generic RuntimeError ("issues during automatic conversion of the weights")."""
    if not isinstance(error, RuntimeError):
        return False
    texts = [str(error), *(reports if "automatic conversion" in str(error) else [])]
    return any(mark in text for text in texts for mark in ("OutOfMemoryError", "out of memory",
                                                          "CUBLAS_STATUS_ALLOC_FAILED"))


@contextlib.contextmanager
def loader_reports(records: list[str]):
    """Keep transformers' warnings (its load report) while the model loads; qlora_kit silences them otherwise."""
    import logging

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    library = logging.getLogger("transformers")
    handler, level = Keep(logging.WARNING), library.level
    library.addHandler(handler)
    library.setLevel(logging.WARNING)
    try:
        yield records
    finally:
        library.removeHandler(handler)
        library.setLevel(level)
