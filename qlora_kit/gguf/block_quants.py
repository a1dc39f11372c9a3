"""llama.cpp's 32-weight block quantizers (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), compiled with numba as kquants.py
compiles the K-quants, and for the same reason: the bytes of llama-quantize's file, at its speed.

These are the types a K-quant file falls back to where a row is not a multiple of 256 weights (SmolLM2's 576
columns: Q4_K -> Q5_0, Q6_K -> Q8_0) and the types q4_0 / q5_0 / q8_0 files are made of; with an importance
matrix, q4_0 / q5_0 files also hold Q4_1 / Q5_1 tensors. `gguf.quants` quantizes the `_ref` forms too, but
not with an importance vector: llama.cpp's `_impl` forms weight each column by it (make_qx_quants for the
symmetric types, make_qkx3_quants for the ones with a min), sigma2 being the mean square of the whole row.
Dispatch as in ggml-quants.c's quantize_q4_0 etc.: `_ref` without quant_weights, `_impl` with them; Q8_0 has
no `_impl` (llama.cpp ignores the importance).

Layouts (ggml-common.h): block_q4_0 d qs[16]; block_q4_1 d m qs[16]; block_q5_0 d qh[4] qs[16]; block_q5_1
d m qh[4] qs[16]; block_q8_0 d qs[32] (d, m f16; qh a little-endian uint32 of the 5th bits).
"""

# ruff: noqa: E741  (C's names kept: l, L, Laux are ggml-quants.c's, so the two read side by side)
from __future__ import annotations

import numpy as np
from numba import njit

from qlora_kit.gguf.kquants import JIT, c_int, int8, make_qkx_quants, make_qx_quants, put_fp16

QK = 32
FLT_MAX = np.float32(3.4028234663852886e38)


@njit(**JIT)
def _amax_signed(x):
    """The value of largest |x| in the block (the first one on a tie), as q4_0 / q5_0 ref find it."""
    amax = np.float32(0)
    mx = np.float32(0)
    for j in range(QK):
        v = x[j]
        if amax < abs(v):
            amax = abs(v)
            mx = v
    return mx


@njit(**JIT)
def _min_max(x):
    mn = FLT_MAX
    mx = -FLT_MAX
    for j in range(QK):
        v = x[j]
        if v < mn:
            mn = v
        if v > mx:
            mx = v
    return mn, mx


@njit(**JIT)
def _row_sigma2(x):
    """The `_impl` forms' sigma2: sum of x² over the whole row, in order, over n_per_row."""
    sum_x2 = np.float32(0)
    for j in range(x.shape[0]):
        sum_x2 += x[j] * x[j]
    return sum_x2 / np.float32(x.shape[0])


@njit(**JIT)
def _block_weights(x, qw, sigma2, weight):
    for j in range(QK):
        weight[j] = qw[j] * np.sqrt(sigma2 + x[j] * x[j])


@njit(**JIT)
def _pack_nibbles(qs, L):
    for j in range(16):
        qs[j] = (L[j] | (L[j + 16] << 4)) & 0xFF


@njit(**JIT)
def _pack_5bit(qh, qs, L):
    """qs: low nibbles (j, j+16 in one byte); qh: the 5th bits, bit j for L[j]."""
    bits = 0
    for j in range(16):
        xi0 = L[j] & 0xFF
        xi1 = L[j + 16] & 0xFF
        qs[j] = (xi0 & 0x0F) | ((xi1 & 0x0F) << 4)
        bits |= ((xi0 & 0x10) >> 4) << j
        bits |= ((xi1 & 0x10) >> 4) << (j + 16)
    for k in range(4):
        qh[k] = (bits >> (8 * k)) & 0xFF


@njit(**JIT)
def quantize_q4_0_rows(x, out, qw, use_qw, first, last):
    blocks = x.shape[1] // QK
    for r in range(first, last):
        xr, yr = x[r], out[r]
        L = np.empty(QK, np.int32)
        weight = np.empty(QK, np.float32)
        sigma2 = _row_sigma2(xr) if use_qw else np.float32(0)
        for ib in range(blocks):
            xb, y = xr[QK * ib:QK * (ib + 1)], yr[18 * ib:18 * (ib + 1)]
            if use_qw:  # quantize_row_q4_0_impl
                _block_weights(xb, qw[QK * ib:QK * (ib + 1)], sigma2, weight)
                put_fp16(y, 0, make_qx_quants(QK, 8, xb, L, weight, True))
            else:  # quantize_row_q4_0_ref
                d = _amax_signed(xb) / np.float32(-8)
                idv = np.float32(1) / d if d else np.float32(0)
                put_fp16(y, 0, d)
                for j in range(QK):
                    L[j] = min(15, int8(c_int(xb[j] * idv + np.float32(8.5))))
            _pack_nibbles(y[2:], L)


@njit(**JIT)
def quantize_q4_1_rows(x, out, qw, use_qw, first, last):
    blocks = x.shape[1] // QK
    for r in range(first, last):
        xr, yr = x[r], out[r]
        L = np.empty(QK, np.int32)
        Laux = np.empty(QK, np.int32)
        weight = np.empty(QK, np.float32)
        sigma2 = _row_sigma2(xr) if use_qw else np.float32(0)
        for ib in range(blocks):
            xb, y = xr[QK * ib:QK * (ib + 1)], yr[20 * ib:20 * (ib + 1)]
            if use_qw:  # quantize_row_q4_1_impl
                _block_weights(xb, qw[QK * ib:QK * (ib + 1)], sigma2, weight)
                d, the_min = make_qkx_quants(QK, 15, xb, weight, L, Laux, np.float32(-0.9), np.float32(0.05), 36)
                put_fp16(y, 0, d)
                put_fp16(y, 2, -the_min)
            else:  # quantize_row_q4_1_ref
                mn, mx = _min_max(xb)
                d = (mx - mn) / np.float32(15)
                idv = np.float32(1) / d if d else np.float32(0)
                put_fp16(y, 0, d)
                put_fp16(y, 2, mn)
                for j in range(QK):
                    L[j] = min(15, int8(c_int((xb[j] - mn) * idv + np.float32(0.5))))
            _pack_nibbles(y[4:], L)


@njit(**JIT)
def quantize_q5_0_rows(x, out, qw, use_qw, first, last):
    blocks = x.shape[1] // QK
    for r in range(first, last):
        xr, yr = x[r], out[r]
        L = np.empty(QK, np.int32)
        weight = np.empty(QK, np.float32)
        sigma2 = _row_sigma2(xr) if use_qw else np.float32(0)
        for ib in range(blocks):
            xb, y = xr[QK * ib:QK * (ib + 1)], yr[22 * ib:22 * (ib + 1)]
            if use_qw:  # quantize_row_q5_0_impl
                _block_weights(xb, qw[QK * ib:QK * (ib + 1)], sigma2, weight)
                put_fp16(y, 0, make_qx_quants(QK, 16, xb, L, weight, True))
            else:  # quantize_row_q5_0_ref
                d = _amax_signed(xb) / np.float32(-16)
                idv = np.float32(1) / d if d else np.float32(0)
                put_fp16(y, 0, d)
                for j in range(QK):
                    L[j] = min(31, int8(c_int(xb[j] * idv + np.float32(16.5))))
            _pack_5bit(y[2:], y[6:], L)


@njit(**JIT)
def quantize_q5_1_rows(x, out, qw, use_qw, first, last):
    blocks = x.shape[1] // QK
    for r in range(first, last):
        xr, yr = x[r], out[r]
        L = np.empty(QK, np.int32)
        Laux = np.empty(QK, np.int32)
        weight = np.empty(QK, np.float32)
        sigma2 = _row_sigma2(xr) if use_qw else np.float32(0)
        for ib in range(blocks):
            xb, y = xr[QK * ib:QK * (ib + 1)], yr[24 * ib:24 * (ib + 1)]
            if use_qw:  # quantize_row_q5_1_impl
                _block_weights(xb, qw[QK * ib:QK * (ib + 1)], sigma2, weight)
                d, the_min = make_qkx_quants(QK, 31, xb, weight, L, Laux, np.float32(-0.9), np.float32(0.05), 36)
                put_fp16(y, 0, d)
                put_fp16(y, 2, -the_min)
            else:  # quantize_row_q5_1_ref: `(uint8_t)(x0 + 0.5f)`, no clamp
                mn, mx = _min_max(xb)
                d = (mx - mn) / np.float32(31)
                idv = np.float32(1) / d if d else np.float32(0)
                put_fp16(y, 0, d)
                put_fp16(y, 2, mn)
                for j in range(QK):
                    L[j] = c_int((xb[j] - mn) * idv + np.float32(0.5)) & 0xFF
            _pack_5bit(y[4:], y[8:], L)


@njit(**JIT)
def _roundf(v):
    """C's roundf (half away from zero) as an integer; x86's conversion for nan / out of range."""
    t = c_int(v)
    if t == -2147483648:
        return t
    frac = v - np.float32(t)  # exact
    if frac >= np.float32(0.5):
        return t + 1
    if frac <= np.float32(-0.5):
        return t - 1
    return t


@njit(**JIT)
def quantize_q8_0_rows(x, out, qw, use_qw, first, last):
    """quantize_row_q8_0_ref (quantize_q8_0 ignores quant_weights)."""
    blocks = x.shape[1] // QK
    for r in range(first, last):
        xr, yr = x[r], out[r]
        for ib in range(blocks):
            xb, y = xr[QK * ib:QK * (ib + 1)], yr[34 * ib:34 * (ib + 1)]
            amax = np.float32(0)
            for j in range(QK):
                v = abs(xb[j])
                amax = amax if amax > v else v  # MAX(amax, fabsf(v))
            d = amax / np.float32(127)
            idv = np.float32(1) / d if d else np.float32(0)
            put_fp16(y, 0, d)
            for j in range(QK):
                y[2 + j] = _roundf(xb[j] * idv) & 0xFF


KERNELS = {"Q4_0": quantize_q4_0_rows, "Q4_1": quantize_q4_1_rows, "Q5_0": quantize_q5_0_rows,
           "Q5_1": quantize_q5_1_rows, "Q8_0": quantize_q8_0_rows}
