"""Write tests/data/quant_reference.npz: llama.cpp's own bytes for every block type qlora_kit quantizes, with and
without an importance vector, on rows chosen to trip block quantizers.

    python tools/make_quant_reference.py LIBGGML_BASE [--out tests/data/quant_reference.npz]

LIBGGML_BASE is llama.cpp's libggml-base shared library (libggml-base.so / .dylib / ggml-base.dll, in a build's
bin/ folder); its exported `ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix)` is what
llama-quantize calls for each chunk of rows. The rows come from `reference_inputs()` (a seeded generator plus
fixed edge cases); the file holds the expected bytes, the generator's seed and the sha256 of the float32 rows it
produced, so a test regenerates the same rows (and says so if numpy ever draws different numbers) instead of
committing them. Nothing of llama.cpp is committed: only the bytes its quantizers wrote.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "data" / "quant_reference.npz"
SEED = 20261001
K_TYPES = ("Q3_K", "Q4_K", "Q5_K", "Q6_K")
BLOCK32_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
# (columns, random rows) per set: one 256-block per row for the K types; rows of 96 (3 blocks: the importance
# and sigma2 of the _impl forms run over a row of several blocks) for the 32-weight types
SETS = {"k": (256, 136, K_TYPES), "b32": (96, 104, BLOCK32_TYPES)}


def edge_rows(columns: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Rows that take the quantizers' rare branches: all zero (the GROUP_MAX_EPS and max == min exits),
    constants, one sign only, tiny (d underflows float16) and huge (d overflows it) magnitudes, subnormals, an
    outlier, exact ties for round-half-even, a sparse row, a ramp, magnitudes that change per sub-block."""
    n = columns
    rows = [np.zeros(n), np.full(n, 0.37), np.full(n, -1.25), np.abs(rng.normal(0, 0.02, n)) + 0.01,
            -np.abs(rng.normal(0, 0.5, n)), rng.normal(0, 1e-7, n), rng.normal(0, 1e-30, n),
            rng.normal(0, 1e-40, n), rng.normal(0, 3e5, n), rng.normal(0, 2e4, n),
            np.r_[rng.normal(0, 0.01, n - 1), 3.0], np.r_[5.0, rng.normal(0, 0.01, n - 1)],
            rng.integers(-16, 16, n) * 0.25, rng.integers(-4, 4, n) * 0.5, np.linspace(-1, 1, n),
            np.where(rng.random(n) < 0.9, 0.0, rng.normal(0, 1, n)),
            rng.normal(0, 1, n) * np.repeat(10.0 ** rng.uniform(-4, 0, n // 16), 16),
            rng.standard_t(2, n) * 0.02, np.r_[np.zeros(n // 2), rng.normal(0, 0.1, n - n // 2)],
            np.full(n, 6.1e-5), np.tile([1.0, -1.0], n // 2)]
    return rows


def reference_inputs(columns: int, random_rows: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """(rows as float32 (edge rows, then random rows of random scale), the importance vector of the columns:
    gamma-distributed like an imatrix's mean x², a few zeros and a few large entries)."""
    rng = np.random.default_rng(seed + columns)
    rows = edge_rows(columns, rng)
    scales = 10.0 ** rng.uniform(-3, 0.5, random_rows)
    rows += [rng.normal(0, 1, columns) * s for s in scales]
    importance = rng.gamma(0.6, 0.02, columns)
    importance[rng.choice(columns, max(1, columns // 40), replace=False)] = 0.0
    importance[rng.choice(columns, max(1, columns // 60), replace=False)] *= 500.0
    return np.array(rows, dtype=np.float32), importance.astype(np.float32)


def digest(rows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.float32).tobytes()).hexdigest()


class Ggml:
    """ggml_quantize_chunk of a libggml-base build, through ctypes."""

    def __init__(self, library: Path):
        self.lib = ctypes.CDLL(str(library))
        self.lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        self.lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                 ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        self.lib.ggml_quantize_init.argtypes = [ctypes.c_int]

    def quantize(self, rows: np.ndarray, qtype: str, importance: np.ndarray | None = None) -> np.ndarray:
        import gguf

        kind = gguf.GGMLQuantizationType[qtype]
        x = np.ascontiguousarray(rows, dtype=np.float32)
        block, size = gguf.GGML_QUANT_SIZES[kind]
        out = np.zeros((x.shape[0], x.shape[1] // block * size), dtype=np.uint8)
        qw = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
        self.lib.ggml_quantize_init(int(kind))
        written = self.lib.ggml_quantize_chunk(int(kind), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1],
                                               None if qw is None else qw.ctypes.data)
        assert written == out.size, (written, out.size)
        return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("library", type=Path, help="llama.cpp's libggml-base shared library")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    ggml = Ggml(args.library)
    saved = {"seed": np.array(SEED)}
    for name, (columns, random_rows, qtypes) in SETS.items():
        rows, importance = reference_inputs(columns, random_rows)
        saved[f"{name}/shape"] = np.array(rows.shape)
        saved[f"{name}/sha256"] = np.array(digest(rows))
        saved[f"{name}/importance_sha256"] = np.array(digest(importance))
        for qtype in qtypes:
            saved[f"{name}/{qtype}"] = ggml.quantize(rows, qtype)
            if qtype != "Q8_0":  # quantize_q8_0 ignores the importance
                saved[f"{name}/{qtype}+imatrix"] = ggml.quantize(rows, qtype, importance)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **saved)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB): "
          + ", ".join(k for k in saved if "/" in k and "sha" not in k and "shape" not in k))
    return 0


if __name__ == "__main__":
    sys.exit(main())
