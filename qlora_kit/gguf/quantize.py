"""`quantize_k`: a float tensor as the blocks of any of the nine quantized types, with llama.cpp's quantizers
(kquants.py: Q3_K-Q6_K; block_quants.py: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), on every core. Its own module, above the
two kernel modules, because block_quants.py builds on kquants.py's primitives: the entry point importing both
keeps the imports one way.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from qlora_kit.gguf.block_quants import KERNELS
from qlora_kit.gguf.kquants import BLOCK, K_KERNELS


def kernels() -> dict:
    """qtype -> its compiled task `(x, out, quant_weights, use_quant_weights, first_row, last_row)`: rows
    first..last-1 of x quantized into the same rows of out, all nine types."""
    return {**K_KERNELS, **KERNELS}


def default_threads() -> int:
    """numba's thread count: NUMBA_NUM_THREADS where set, else every core this process may use."""
    import numba

    return max(1, int(numba.config.NUMBA_NUM_THREADS))


IGNORES_IMPORTANCE = {"Q8_0"}  # quantize_q8_0: `(void)quant_weights; // not used`


def quantize_k(data: np.ndarray, qtype: str, importance: np.ndarray | None = None,
               threads: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """A 2-D float tensor (rows, columns; columns a multiple of the type's block) as `qtype` blocks, shaped as
    gguf's writer wants quantized data: (rows, bytes per row). `importance`: one float per column (the
    imatrix's mean of x² for this tensor), or None for llama.cpp's reference quantizer. `threads`: how many
    rows are quantized at once (default_threads(): NUMBA_NUM_THREADS or every core). `out`: a C-contiguous
    uint8 array of that shape to write into (encode_tensor's slice of the tensor: no copy)."""
    if qtype not in BLOCK:
        raise ValueError(f"no quantizer for {qtype}: {', '.join(BLOCK)}")
    weights_per_block, block_bytes = BLOCK[qtype]
    x = np.ascontiguousarray(data, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] % weights_per_block:
        raise ValueError(f"{qtype} needs rows of a multiple of {weights_per_block} weights, got shape {x.shape}")
    rows, columns = x.shape
    use_qw = importance is not None and qtype not in IGNORES_IMPORTANCE
    if use_qw:
        qw = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
        if qw.shape[0] != columns:
            raise ValueError(f"importance has {qw.shape[0]} values for rows of {columns} weights")
    else:
        qw = np.zeros(1, np.float32)
    shape = (rows, columns // weights_per_block * block_bytes)
    if out is None:
        out = np.empty(shape, dtype=np.uint8)
    elif out.shape != shape or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous uint8 of shape {shape}")
    task = kernels()[qtype]
    threads = max(1, min(threads or default_threads(), rows))
    if threads == 1:
        task(x, out, qw, use_qw, 0, rows)
        return out
    # a few pieces per thread (rows cost alike, but the machine may be shared), each at least 16 rows
    step = max(16, -(-rows // (4 * threads)))
    with ThreadPoolExecutor(threads) as pool:  # the tasks release the GIL (nogil): one core each
        for done in [pool.submit(task, x, out, qw, use_qw, first, min(rows, first + step))
                     for first in range(0, rows, step)]:
            done.result()
    return out


def _per_type(qtype: str):
    def quantize(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
        return quantize_k(x, qtype, importance)

    quantize.__name__ = f"quantize_{qtype.lower()}"
    quantize.__doc__ = f"quantize_k(x, {qtype!r}, importance): x (rows, columns) -> (rows, bytes per row)."
    return quantize


quantize_q3_k, quantize_q4_k, quantize_q5_k, quantize_q6_k = (_per_type(t) for t in ("Q3_K", "Q4_K", "Q5_K", "Q6_K"))
QUANTIZERS = {"Q3_K": quantize_q3_k, "Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}
"""The K types (256-weight blocks); block_quants.py has the 32-weight ones. `quantize_k` takes all nine."""
