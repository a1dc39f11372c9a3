"""The K-quant block quantizers (Q4_K, Q5_K, Q6_K) in numpy: what the `gguf` package can only dequantize.

Each function is a transcription of llama.cpp's reference quantizer in ggml/src/ggml-quants.c (the one
`llama-quantize` runs when no importance matrix is given: `quantize_q4_K` calls `quantize_row_q4_K_ref`),
vectorised over blocks instead of looping over them: every per-block quantity of the C code is an array with
one entry per block, and the C loops over a block's weights are numpy reductions over the last axis. The
arithmetic is float32 as in C; `nearest_int` (the 1.5·2^23 trick, round half to even) is `np.rint`.

    Q4_K: 256 weights = 8 sub-blocks of 32; per sub-block a 6-bit scale and a 6-bit min (make_qkx2_quants,
          nmax 15, rmin -1, rdelta 0.1, 20 steps), both scaled by a per-block f16 d / dmin; 4.5 bits/weight.
    Q5_K: the same with 5-bit values (nmax 31, rmin -0.5, rdelta 0.1, 15 steps) and their 5th bits in qh;
          5.5 bits/weight.
    Q6_K: 16 sub-blocks of 16, symmetric 6-bit values with a signed 8-bit scale each (make_qx_quants, nmax 32,
          rmse_type 1), one f16 d per block; 6.5625 bits/weight.

Block layouts are ggml-common.h's block_q4_K / block_q5_K / block_q6_K, the ones `gguf.quants` dequantizes.
The sums here are numpy's (pairwise) where C adds left to right, so a scale can differ from llama.cpp's in
its last float32 bit and, rarely, a weight lands on the neighbouring level: the file is a valid K-quant of
the same quality, not always byte-identical to llama-quantize's output.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

QK_K = 256
GROUP_MAX_EPS = np.float32(1e-15)
CHUNK_BLOCKS = 256  # blocks quantized together: 64k weights, 256 KiB per float32 temporary
WORKERS = max(1, min(8, os.cpu_count() or 1))
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def _f16(values: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16 then back: the value the file stores (round to nearest even)."""
    return values.astype(np.float16).astype(np.float32)


def make_qkx2_quants(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float,
                     nstep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml-quants.c `make_qkx2_quants` (use_mad = false) for many groups at once: x, weights (groups, n).
    Returns (scale, the_min, L): x ≈ scale·L - the_min with L in 0..nmax, the (scale, min) pair chosen by a
    weighted least-squares fit at nstep+1 trial inverse scales around nmax / (max - min)."""
    x = x.astype(np.float32, copy=False)
    minimum = np.minimum(x.min(axis=1), 0)  # `if (min > 0) min = 0`
    maximum = x.max(axis=1)
    sum_w = weights.sum(axis=1)
    sum_x = (weights * x).sum(axis=1)
    flat = maximum == minimum  # all zero (after the clamp): L = 0, scale 0
    spread = np.where(flat, np.float32(1), maximum - minimum)

    iscale = np.float32(nmax) / spread
    scale = np.float32(1) / iscale
    levels = np.clip(np.rint(iscale[:, None] * (x - minimum[:, None])), 0, nmax)
    best_error = (weights * np.square(scale[:, None] * levels + minimum[:, None] - x)).sum(axis=1)

    with np.errstate(divide="ignore", invalid="ignore"):
        for step in range(nstep + 1):
            # the C code divides by (max - min) with the *current* best min: it moves as better fits are found
            trial_nmax = np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax)  # C's float math
            iscale = trial_nmax / np.where(flat, np.float32(1), maximum - minimum)
            trial = np.clip(np.rint(iscale[:, None] * (x - minimum[:, None])), 0, nmax)
            weighted = weights * trial
            sum_l = weighted.sum(axis=1)
            sum_l2 = np.einsum("ij,ij->i", weighted, trial)
            sum_xl = np.einsum("ij,ij->i", weighted, x)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive = this_min > 0  # `if (this_min > 0) { this_min = 0; this_scale = sum_xl / sum_l2; }`
            this_min = np.where(positive, np.float32(0), this_min)
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            diff = this_scale[:, None] * trial + this_min[:, None] - x
            error = np.einsum("ij,ij,ij->i", weights, diff, diff)
            better = (det > 0) & (error < best_error) & ~flat
            levels = np.where(better[:, None], trial, levels)
            best_error = np.where(better, error, best_error)
            scale = np.where(better, this_scale, scale)
            minimum = np.where(better, this_min, minimum)

    scale = np.where(flat, np.float32(0), scale).astype(np.float32)
    levels = np.where(flat[:, None], 0, levels)
    return scale, (-minimum).astype(np.float32), levels.astype(np.uint8)


def make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml-quants.c `make_qx_quants` with rmse_type 1 and no importance weights (weights x²), for many groups:
    symmetric levels L - nmax in -nmax..nmax-1, the scale refined by least squares over 19 trial scales.
    Returns (scale, L) with L already offset by nmax (0..2·nmax-1)."""
    x = x.astype(np.float32, copy=False)
    rows = np.arange(x.shape[0])
    peak = x[rows, np.abs(x).argmax(axis=1)]  # the first weight of largest |x|, with its sign
    zero = np.abs(peak) < GROUP_MAX_EPS
    peak = np.where(zero, np.float32(1), peak)
    weights = x * x

    def fit(iscale):
        levels = np.clip(np.rint(iscale[:, None] * x), -nmax, nmax - 1)
        return levels, (weights * x * levels).sum(axis=1), (weights * levels * levels).sum(axis=1)

    with np.errstate(divide="ignore", invalid="ignore"):
        levels, sumlx, suml2 = fit(np.float32(-nmax) / peak)
        scale = np.where(suml2 != 0, sumlx / suml2, np.float32(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            trial, sumlx, suml2 = fit(-(np.float32(nmax) + np.float32(0.1) * np.float32(step)) / peak)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            levels = np.where(better[:, None], trial, levels)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    scale = np.where(zero, np.float32(0), scale).astype(np.float32)
    levels = np.where(zero[:, None], 0, levels + nmax)
    return scale, levels.astype(np.uint8)


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """The 12 scale bytes of Q4_K / Q5_K: eight 6-bit scales and eight 6-bit mins (get_scale_min_k4's inverse)."""
    packed = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = ls[:, 0:4]
    packed[:, 4:8] = lm[:, 0:4]
    packed[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    packed[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    packed[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    return packed


def _scale_min_blocks(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """The shared part of quantize_row_q4_K_ref / quantize_row_q5_K_ref: per sub-block (scale, min) search,
    the 6-bit quantization of both against the block's largest, and the final levels against those."""
    blocks = x.shape[0]
    sub = x.reshape(blocks * 8, 32)
    av_x = np.sqrt((sub * sub).sum(axis=1) / np.float32(32))
    weights = av_x[:, None] + np.abs(sub)
    scales, mins, levels = make_qkx2_quants(sub, weights, nmax, rmin, rdelta, nstep)
    scales, mins, levels = scales.reshape(blocks, 8), mins.reshape(blocks, 8), levels.reshape(blocks, 8, 32)

    max_scale = np.maximum(scales.max(axis=1), 0)
    max_min = np.maximum(mins.max(axis=1), 0)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, np.float32(63) / max_scale, np.float32(0))
        inv_min = np.where(max_min > 0, np.float32(63) / max_min, np.float32(0))
    ls = np.minimum(63, np.clip(np.rint(inv_scale[:, None] * scales), 0, 255)).astype(np.uint8)
    lm = np.minimum(63, np.clip(np.rint(inv_min[:, None] * mins), 0, 255)).astype(np.uint8)
    d = (max_scale / np.float32(63)).astype(np.float16)
    dmin = (max_min / np.float32(63)).astype(np.float16)

    step = d.astype(np.float32)[:, None] * ls          # GGML_FP16_TO_FP32(y.d) * sc
    offset = dmin.astype(np.float32)[:, None] * lm
    sub = sub.reshape(blocks, 8, 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requantized = np.clip(np.rint((sub + offset[..., None]) / step[..., None]), 0, nmax)
    levels = np.where(step[..., None] != 0, requantized, levels).astype(np.uint8)  # `if (!d) continue;`
    return d, dmin, _pack_scales_k4(ls, lm), levels.reshape(blocks, QK_K)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q4_K_ref: x (blocks, 256) float32 -> (blocks, 144) bytes: d, dmin, scales[12], qs[128]."""
    d, dmin, scales, levels = _scale_min_blocks(x, 15, -1.0, 0.1, 20)
    pairs = levels.reshape(-1, 4, 2, 32)  # per 64 weights: the first 32 in the low nibble, the next 32 high
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8), scales, qs], axis=1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q5_K_ref: x (blocks, 256) -> (blocks, 176) bytes: d, dmin, scales[12], qh[32], qs[128]."""
    d, dmin, scales, levels = _scale_min_blocks(x, 31, -0.5, 0.1, 15)
    pairs = levels.reshape(-1, 4, 2, 32)
    qs = ((pairs[:, :, 0] & 0xF) | ((pairs[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    high = (pairs >> 4).astype(np.uint8)  # (blocks, chunk, half, 32): bit 2·chunk + half of qh[j]
    shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)
    qh = (high << shifts[None, :, :, None]).sum(axis=(1, 2), dtype=np.uint16).astype(np.uint8)
    return np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8), scales, qh, qs],
                          axis=1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q6_K_ref: x (blocks, 256) -> (blocks, 210) bytes: ql[128], qh[64], scales[16] (int8), d."""
    x = x.astype(np.float32, copy=False)
    blocks = x.shape[0]
    sub = x.reshape(blocks * 16, 16)
    scales, levels = make_qx_quants(sub, 32)
    scales, levels = scales.reshape(blocks, 16), levels.reshape(blocks, 16, 16)

    pick = np.abs(scales).argmax(axis=1)  # the first scale of largest |scale|, with its sign
    max_scale = scales[np.arange(blocks), pick]
    zero = np.abs(max_scale) < GROUP_MAX_EPS  # such a block is written as all zeros
    max_scale = np.where(zero, np.float32(1), max_scale)
    iscale = np.float32(-128) / max_scale
    d = (np.float32(1) / iscale).astype(np.float16)
    q_scales = np.minimum(127, np.rint(iscale[:, None] * scales)).astype(np.int8)

    step = d.astype(np.float32)[:, None] * q_scales
    with np.errstate(divide="ignore", invalid="ignore"):
        requantized = np.clip(np.rint(sub.reshape(blocks, 16, 16) / step[..., None]), -32, 31) + 32
    levels = np.where(step[..., None] != 0, requantized, levels).astype(np.uint8).reshape(blocks, 2, 4, 32)

    ql = np.concatenate([(levels[:, :, 0] & 0xF) | ((levels[:, :, 2] & 0xF) << 4),
                         (levels[:, :, 1] & 0xF) | ((levels[:, :, 3] & 0xF) << 4)], axis=2).reshape(blocks, 128)
    qh = ((levels[:, :, 0] >> 4) | ((levels[:, :, 1] >> 4) << 2) | ((levels[:, :, 2] >> 4) << 4)
          | ((levels[:, :, 3] >> 4) << 6)).reshape(blocks, 64)
    out = np.concatenate([ql, qh, q_scales.view(np.uint8), d.reshape(-1, 1).view(np.uint8)], axis=1)
    out[zero] = 0
    return out


QUANTIZERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}


def quantize_k(data: np.ndarray, qtype: str) -> np.ndarray:
    """A 2-D float tensor (rows, columns; columns a multiple of 256) as `qtype` blocks, shaped as gguf's
    writer wants quantized data: (rows, bytes per row)."""
    rows, columns = data.shape
    blocks = data.reshape(-1, QK_K)
    out = np.empty((blocks.shape[0], BLOCK_BYTES[qtype]), dtype=np.uint8)

    def run(start: int) -> None:  # numpy releases the GIL: chunks run on every core
        chunk = blocks[start:start + CHUNK_BLOCKS].astype(np.float32, copy=False)
        out[start:start + CHUNK_BLOCKS] = QUANTIZERS[qtype](chunk)

    starts = range(0, blocks.shape[0], CHUNK_BLOCKS)  # small chunks: temporaries stay in the CPU's caches
    if len(starts) == 1 or WORKERS == 1:
        for start in starts:
            run(start)
    else:
        with ThreadPoolExecutor(WORKERS) as pool:
            list(pool.map(run, starts))
    return out.reshape(rows, columns // QK_K * BLOCK_BYTES[qtype])
