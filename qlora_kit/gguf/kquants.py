"""llama.cpp's block quantizers, compiled with numba: the K-quants here (Q3_K, Q4_K, Q5_K, Q6_K) and the
primitives block_quants.py's 32-weight blocks share with them; quantize.py's `quantize_k` is the one entry point
for all nine types (a module of its own, so that these two never import each other).

Why a transcription and not our own algorithm: a GGUF file is judged against llama-quantize's, so the bytes
should be llama-quantize's. Each kernel is ggml/src/ggml-quants.c (llama.cpp 0c1e5709, 2026-10-01) loop for
loop: the same float32 operations in the same order (numba's fastmath stays off, so no sum is reordered and
no a*b+c is fused; every literal is an np.float32, so nothing is widened to float64), `nearest_int` as C's
1.5·2^23 bit trick, fp16 as ggml's own GGML_FP32_TO_FP16 (round to nearest even, bit for bit), integers
wrapped where C stores them in uint8_t / int8_t, and x86's float->int conversion where C converts a value
that may be out of range. tests/test_kquants.py holds every type, with and without an importance vector, to
the bytes of llama.cpp's `ggml_quantize_chunk` (x86-64 build: ggml-base is compiled without -march=native, so
without FMA; an aarch64 build may contract a*b+c into one rounding and differ from both in a last bit).

Why numba: the numpy port this replaces allocated full-size temporaries for each of the ~21 trial scales of
every sub-block and ran 3x slower than llama-quantize; a compiled loop keeps a 256-weight block in L1 as the C
code does, and runs the searches of a block's sub-blocks side by side (below, "lanes"). numba ships wheels for
Linux, macOS and Windows; `cache=True` keeps the compiled kernels on disk (the first call of each type
compiles it once, a few seconds). The kernels release the GIL, so a thread pool spreads pieces of the rows
over every core (NUMBA_NUM_THREADS or `threads` says fewer); numba's own parallel loops are not used: their
compile time was twice the kernels' own. The dispatch is llama.cpp's `quantize_q*_K`:
without an importance vector the `_ref` quantizer, with one the `_impl` quantizer (`quant_weights`: one float
per column, llama-imatrix's mean of x²), as `llama-quantize --imatrix` runs them.

    Q3_K: 16 sub-blocks of 16, symmetric 3-bit values (make_q3_quants; with an importance make_qx_quants),
          6-bit signed scales against one f16 d; 3.4375 bits/weight.
    Q4_K: 8 sub-blocks of 32, a 6-bit scale and a 6-bit min each (make_qkx2_quants; with an importance
          make_qkx3_quants, and the scales themselves fitted by make_qp_quants), f16 d / dmin; 4.5 bits/weight.
    Q5_K: the same with 5-bit values and their 5th bits in qh; 5.5 bits/weight.
    Q6_K: 16 sub-blocks of 16, symmetric 6-bit values, a signed 8-bit scale each (make_qx_quants), f16 d;
          6.5625 bits/weight.

Block layouts are ggml-common.h's block_q3_K / block_q4_K / block_q5_K / block_q6_K, which `gguf.quants`
dequantizes.
"""

# ruff: noqa: E741  (C's names kept: l, L, Laux are ggml-quants.c's, so the two read side by side)
from __future__ import annotations

from collections import namedtuple

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

QK_K = 256
GROUP_MAX_EPS = np.float32(1e-15)
SCALE_TO_INF = np.float32(2.0 ** 112)  # ggml_compute_fp32_to_fp16's 0x1.0p+112f and 0x1.0p-110f
SCALE_TO_ZERO = np.float32(2.0 ** -110)
# error_model numpy: a float division by zero is inf / nan as in C (numba's default raises)
JIT = {"cache": True, "error_model": "numpy", "nogil": True}
BLOCK = {"Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
         "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34)}
"""weights per block, bytes per block (ggml_blck_size, ggml_type_size)"""


# ---------------------------------------------------------------------------------------------------------------
# C's scalar primitives


@intrinsic
def f32_bits(typingctx, value):
    """The IEEE bits of a float32 (C's `memcpy(&i, &f, 4)`)."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def bits_f32(typingctx, bits):
    """The float32 with these IEEE bits."""
    if bits != types.uint32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@njit(**JIT)
def nearest_int(fval):
    """ggml-quants.c nearest_int: round half to even through the float32 sum with 1.5·2^23."""
    i = np.int64(f32_bits(fval + np.float32(12582912.0)))
    return (i & 0x007FFFFF) - 0x00400000


@njit(**JIT)
def c_int(value):
    """A C float -> int conversion as x86 does it (cvttss2si): toward zero; nan or out of range gives INT_MIN."""
    if not (value > np.float32(-2147483648.0) and value < np.float32(2147483648.0)):
        return np.int64(-2147483648)
    return np.int64(value)


@njit(**JIT)
def int8(value):
    """C's store into an int8_t: the low byte, signed."""
    return ((value + 128) & 0xFF) - 128


@njit(**JIT)
def fp32_to_fp16(f):
    """ggml-impl.h ggml_compute_fp32_to_fp16 (GGML_FP32_TO_FP16 without F16C), bit for bit: the f16 bits."""
    base = (abs(f) * SCALE_TO_INF) * SCALE_TO_ZERO
    w = np.int64(f32_bits(f))
    shl1_w = (w + w) & 0xFFFFFFFF
    sign = w & 0x80000000
    bias = shl1_w & 0xFF000000
    if bias < 0x71000000:
        bias = 0x71000000
    base = bits_f32(np.uint32((bias >> 1) + 0x07800000)) + base
    bits = np.int64(f32_bits(base))
    exp_bits = (bits >> 13) & 0x00007C00
    mantissa_bits = bits & 0x00000FFF
    nonsign = exp_bits + mantissa_bits
    return (sign >> 16) | (0x7E00 if shl1_w > 0xFF000000 else nonsign)


@njit(**JIT)
def fp16_to_fp32(h):
    """GGML_FP16_TO_FP32: the exact float32 of f16 bits."""
    sign = (h & 0x8000) << 16
    exponent = (h >> 10) & 0x1F
    mantissa = h & 0x3FF
    if exponent == 0:  # zero or subnormal: mantissa · 2^-24, exact in float32
        value = np.float32(mantissa) * np.float32(2.0 ** -24)
        return -value if sign else value
    if exponent == 31:
        return bits_f32(np.uint32(sign | 0x7F800000 | (mantissa << 13)))
    return bits_f32(np.uint32(sign | ((exponent + 112) << 23) | (mantissa << 13)))


@njit(**JIT)
def put_fp16(out, offset, value):
    """`y.d = GGML_FP32_TO_FP16(value)`, little-endian; returns the float32 the file now holds."""
    h = fp32_to_fp16(value)
    out[offset] = h & 0xFF
    out[offset + 1] = h >> 8
    return fp16_to_fp32(h)


# ---------------------------------------------------------------------------------------------------------------
# The scale searches (ggml-quants.c helper functions). Arrays are views starting where C's pointers point
# (C's `x + 16*j` is x[16 * j:]): every index is then a loop counter, which lets LLVM drop numba's
# negative-index wraparound from the inner loops.


@njit(**JIT)
def make_qx_quants(n, nmax, x, L, qw, use_qw):
    """make_qx_quants with rmse_type 1 (the only one its callers here pass): symmetric levels L - nmax in
    -nmax..nmax-1, weights qw (or x² when use_qw is false), the scale refined over 19 trial scales."""
    mx = np.float32(0)
    amax = np.float32(0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < GROUP_MAX_EPS:  # all zero
        for i in range(n):
            L[i] = 0
        return np.float32(0)
    iscale = np.float32(-nmax) / mx
    sumlx = np.float32(0)
    suml2 = np.float32(0)
    for i in range(n):
        v = x[i]
        l = max(-nmax, min(nmax - 1, nearest_int(iscale * v)))
        L[i] = l + nmax
        w = qw[i] if use_qw else v * v
        fl = np.float32(l)
        sumlx += w * v * fl
        suml2 += w * fl * fl
    scale = sumlx / suml2 if suml2 != 0 else np.float32(0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(np.float32(nmax) + np.float32(0.1) * np.float32(step)) / mx
        sumlx = np.float32(0)
        suml2 = np.float32(0)
        for i in range(n):
            v = x[i]
            fl = np.float32(max(-nmax, min(nmax - 1, nearest_int(iscale * v))))
            w = qw[i] if use_qw else v * v
            sumlx += w * v * fl
            suml2 += w * fl * fl
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[i] = nmax + max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(**JIT)
def make_qkx_quants(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep):
    """make_qkx2_quants and make_qkx3_quants (use_mad false, weights given: the two are then the same code;
    qkx2's `max == min` and qkx3's `max <= min` agree once min is clamped to <= 0). x ≈ scale·L - the_min,
    L in 0..nmax, the (scale, min) pair a weighted least-squares fit at nstep+1 trial inverse scales.
    Returns (scale, the_min)."""
    mn = x[0]
    mx = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        v = x[i]
        if v < mn:
            mn = v
        if v > mx:
            mx = v
        w = weights[i]
        sum_w += w
        sum_x += w * v
    if mn > 0:
        mn = np.float32(0)
    if mx <= mn:
        for i in range(n):
            L[i] = 0
        return np.float32(0), -mn
    iscale = np.float32(nmax) / (mx - mn)
    scale = np.float32(1) / iscale
    best_error = np.float32(0)
    for i in range(n):
        v = x[i]
        l = max(0, min(nmax, nearest_int(iscale * (v - mn))))
        L[i] = l
        diff = scale * np.float32(l) + mn - v
        best_error += weights[i] * (diff * diff)
    if nstep < 1:
        return scale, -mn
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * np.float32(step) + np.float32(nmax)) / (mx - mn)
        sum_l = np.float32(0)
        sum_l2 = np.float32(0)
        sum_xl = np.float32(0)
        for i in range(n):
            v = x[i]
            l = max(0, min(nmax, nearest_int(iscale * (v - mn))))
            Laux[i] = l
            w = weights[i]
            fl = np.float32(l)
            sum_l += w * fl
            sum_l2 += w * fl * fl
            sum_xl += w * fl * v
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = np.float32(0)
                this_scale = sum_xl / sum_l2
            cur_error = np.float32(0)
            for i in range(n):
                diff = this_scale * np.float32(Laux[i]) + this_min - x[i]
                cur_error += weights[i] * (diff * diff)
            if cur_error < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                mn = this_min
    return scale, -mn


@njit(**JIT)
def make_qp_quants(n, nmax, x, L, quant_weights):
    """make_qp_quants: positive values (the 8 scales or mins of a Q4_K / Q5_K block) on 0..nmax, weighted by
    quant_weights; L is C's uint8_t array (a negative level wraps, as it does there)."""
    mx = np.float32(0)
    for i in range(n):
        mx = mx if mx > x[i] else x[i]  # MAX(max, x[i])
    if mx < GROUP_MAX_EPS:  # all zero
        for i in range(n):
            L[i] = 0
        return np.float32(0)
    iscale = np.float32(nmax) / mx
    for i in range(n):
        L[i] = nearest_int(iscale * x[i]) & 0xFF
    scale = np.float32(1) / iscale
    best_mse = np.float32(0)
    for i in range(n):
        diff = x[i] - scale * np.float32(L[i])
        best_mse += quant_weights[i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (np.float32(0.1) * np.float32(step) + np.float32(nmax)) / mx
        scale_is = np.float32(1) / iscale_is
        mse = np.float32(0)
        for i in range(n):
            l = min(nmax, nearest_int(iscale_is * x[i]))
            diff = x[i] - scale_is * np.float32(l)
            mse += quant_weights[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = np.float32(0)
    suml2 = np.float32(0)
    for i in range(n):
        l = min(nmax, nearest_int(iscale * x[i]))
        L[i] = l & 0xFF
        w = quant_weights[i]
        fl = np.float32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = quant_weights[i]
            fl = np.float32(L[i])
            slx = sumlx - w * x[i] * fl
            sl2 = suml2 - w * fl * fl
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, nearest_int(x[i] * sl2 / slx))
                if new_l != L[i]:
                    fn = np.float32(new_l)
                    slx += w * x[i] * fn
                    sl2 += w * fn * fn
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if not n_changed:
            break
    return sumlx / suml2 if suml2 > 0 else np.float32(0)


# ---------------------------------------------------------------------------------------------------------------
# The same searches for all sub-blocks of a block at once. The C code runs one sub-block after another, and each
# of its sums is a chain of dependent float additions (latency-bound: a few cycles per term). Here the
# sub-blocks are lanes: X[i * lanes + j] is weight i of sub-block j, every per-sub-block variable is an array
# over lanes, and the innermost loops run over lanes, which LLVM turns into SIMD instructions. Each lane still
# computes its own sums term by term in C's order with the same float32 operations, and takes its own
# branches (as selects), so every lane's result is bit for bit the C function's on that sub-block.


@njit(**JIT)
def make_qkx_quants_lanes(n, nmax, X, W, L, Laux, rmin, rdelta, nstep, F, flags, scales, mins):
    """make_qkx_quants on `lanes` sub-blocks of n weights (X, W: n x lanes). Writes L (n x lanes, 0..nmax), and
    per lane scales[j] and mins[j] (the_min). F: float32 scratch (13, lanes); flags: bool scratch (2, lanes)."""
    lanes = scales.shape[0]
    mn, mx, sum_w, sum_x, iscale, scale, best_error = F[0], F[1], F[2], F[3], F[4], F[5], F[6]
    sum_l, sum_l2, sum_xl, this_scale, this_min, cur_error = F[7], F[8], F[9], F[10], F[11], F[12]
    flat, accept = flags[0], flags[1]
    for j in range(lanes):
        mn[j] = X[j]
        mx[j] = X[j]
        sum_w[j] = W[j]
        sum_x[j] = W[j] * X[j]
    for i in range(1, n):
        for j in range(lanes):
            v = X[i * lanes + j]
            w = W[i * lanes + j]
            mn[j] = v if v < mn[j] else mn[j]
            mx[j] = v if v > mx[j] else mx[j]
            sum_w[j] += w
            sum_x[j] += w * v
    for j in range(lanes):
        mn[j] = np.float32(0) if mn[j] > 0 else mn[j]
        flat[j] = mx[j] <= mn[j]
        iscale[j] = np.float32(nmax) / (mx[j] - mn[j])
        scale[j] = np.float32(1) / iscale[j]
        best_error[j] = np.float32(0)
    for i in range(n):
        for j in range(lanes):
            v = X[i * lanes + j]
            l = max(0, min(nmax, nearest_int(iscale[j] * (v - mn[j]))))
            L[i * lanes + j] = l
            diff = scale[j] * np.float32(l) + mn[j] - v
            best_error[j] += W[i * lanes + j] * (diff * diff)
    for step in range(nstep + 1):
        for j in range(lanes):
            iscale[j] = (rmin + rdelta * np.float32(step) + np.float32(nmax)) / (mx[j] - mn[j])
            sum_l[j] = np.float32(0)
            sum_l2[j] = np.float32(0)
            sum_xl[j] = np.float32(0)
        for i in range(n):
            for j in range(lanes):
                v = X[i * lanes + j]
                l = max(0, min(nmax, nearest_int(iscale[j] * (v - mn[j]))))
                Laux[i * lanes + j] = l
                w = W[i * lanes + j]
                fl = np.float32(l)
                sum_l[j] += w * fl
                sum_l2[j] += w * fl * fl
                sum_xl[j] += w * fl * v
        for j in range(lanes):
            D = sum_w[j] * sum_l2[j] - sum_l[j] * sum_l[j]
            ts = (sum_w[j] * sum_xl[j] - sum_x[j] * sum_l[j]) / D
            tm = (sum_l2[j] * sum_x[j] - sum_l[j] * sum_xl[j]) / D
            positive = tm > 0
            this_min[j] = np.float32(0) if positive else tm
            this_scale[j] = sum_xl[j] / sum_l2[j] if positive else ts
            accept[j] = D > 0 and not flat[j]
            cur_error[j] = np.float32(0)
        for i in range(n):
            for j in range(lanes):
                diff = this_scale[j] * np.float32(Laux[i * lanes + j]) + this_min[j] - X[i * lanes + j]
                cur_error[j] += W[i * lanes + j] * (diff * diff)
        better = False
        for j in range(lanes):
            take = accept[j] and cur_error[j] < best_error[j]
            accept[j] = take
            better |= take
            if take:
                best_error[j] = cur_error[j]
                scale[j] = this_scale[j]
                mn[j] = this_min[j]
        if better:
            for i in range(n):
                for j in range(lanes):
                    if accept[j]:
                        L[i * lanes + j] = Laux[i * lanes + j]
    for j in range(lanes):
        scales[j] = np.float32(0) if flat[j] else scale[j]
        mins[j] = -mn[j]
    for i in range(n):
        for j in range(lanes):
            if flat[j]:
                L[i * lanes + j] = 0


@njit(**JIT)
def make_qx_quants_lanes(n, nmax, X, W, use_w, L, F, flags, scales):
    """make_qx_quants (rmse_type 1) on `lanes` sub-blocks (X, W: n x lanes; weights W, or x² when use_w is
    false). Writes L (n x lanes, nmax + level) and scales[j]. F: float32 scratch (7, lanes); flags: (1, lanes)."""
    lanes = scales.shape[0]
    mx, amax, iscale, trial, sumlx, suml2, best = F[0], F[1], F[2], F[3], F[4], F[5], F[6]
    zero = flags[0]
    for j in range(lanes):
        mx[j] = np.float32(0)
        amax[j] = np.float32(0)
    for i in range(n):
        for j in range(lanes):
            v = X[i * lanes + j]
            bigger = abs(v) > amax[j]
            amax[j] = abs(v) if bigger else amax[j]
            mx[j] = v if bigger else mx[j]
    for j in range(lanes):
        zero[j] = amax[j] < GROUP_MAX_EPS
        iscale[j] = np.float32(-nmax) / mx[j]
        sumlx[j] = np.float32(0)
        suml2[j] = np.float32(0)
    for i in range(n):
        for j in range(lanes):
            v = X[i * lanes + j]
            fl = np.float32(max(-nmax, min(nmax - 1, nearest_int(iscale[j] * v))))
            w = W[i * lanes + j] if use_w else v * v
            sumlx[j] += w * v * fl
            suml2[j] += w * fl * fl
    for j in range(lanes):
        scales[j] = sumlx[j] / suml2[j] if suml2[j] != 0 else np.float32(0)
        best[j] = scales[j] * sumlx[j]
    for step in range(-9, 10):
        if step == 0:
            continue
        for j in range(lanes):
            trial[j] = -(np.float32(nmax) + np.float32(0.1) * np.float32(step)) / mx[j]
            sumlx[j] = np.float32(0)
            suml2[j] = np.float32(0)
        for i in range(n):
            for j in range(lanes):
                v = X[i * lanes + j]
                fl = np.float32(max(-nmax, min(nmax - 1, nearest_int(trial[j] * v))))
                w = W[i * lanes + j] if use_w else v * v
                sumlx[j] += w * v * fl
                suml2[j] += w * fl * fl
        for j in range(lanes):
            if suml2[j] > 0 and sumlx[j] * sumlx[j] > best[j] * suml2[j]:
                iscale[j] = trial[j]  # the levels are those of the last accepted trial (computed once, below)
                scales[j] = sumlx[j] / suml2[j]
                best[j] = scales[j] * sumlx[j]
    for i in range(n):
        for j in range(lanes):
            l = nmax + max(-nmax, min(nmax - 1, nearest_int(iscale[j] * X[i * lanes + j])))
            L[i * lanes + j] = 0 if zero[j] else l
    for j in range(lanes):
        scales[j] = np.float32(0) if zero[j] else scales[j]


@njit(**JIT)
def make_q3_quants_lanes(n, nmax, X, L, F, scales):
    """make_q3_quants with do_rmse on `lanes` sub-blocks (X: n x lanes). Writes L (n x lanes, nmax + level)
    and scales[j]. A lane whose pass changes nothing would change nothing in the next pass either (its state
    is the same), so running the passes until no lane changes, 5 at most, is C's per-sub-block loop.
    F: float32 scratch (5, lanes)."""
    lanes = scales.shape[0]
    mx, amax, iscale, sumlx, suml2 = F[0], F[1], F[2], F[3], F[4]
    for j in range(lanes):
        mx[j] = np.float32(0)
        amax[j] = np.float32(0)
    for i in range(n):
        for j in range(lanes):
            v = X[i * lanes + j]
            bigger = abs(v) > amax[j]
            amax[j] = abs(v) if bigger else amax[j]
            mx[j] = v if bigger else mx[j]
    for j in range(lanes):
        iscale[j] = np.float32(-nmax) / mx[j]
        sumlx[j] = np.float32(0)
        suml2[j] = np.float32(0)
    for i in range(n):
        for j in range(lanes):
            v = X[i * lanes + j]
            l = max(-nmax, min(nmax - 1, nearest_int(iscale[j] * v)))
            L[i * lanes + j] = l
            w = v * v
            fl = np.float32(l)
            sumlx[j] += w * v * fl
            suml2[j] += w * fl * fl
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            for j in range(lanes):
                v = X[i * lanes + j]
                w = v * v
                fl = np.float32(L[i * lanes + j])
                slx = sumlx[j] - w * v * fl
                if slx > 0:
                    sl2 = suml2[j] - w * fl * fl
                    new_l = max(-nmax, min(nmax - 1, nearest_int(v * sl2 / slx)))
                    if new_l != L[i * lanes + j]:
                        fn = np.float32(new_l)
                        slx += w * v * fn
                        sl2 += w * fn * fn
                        if sl2 > 0 and slx * slx * suml2[j] > sumlx[j] * sumlx[j] * sl2:
                            L[i * lanes + j] = new_l
                            sumlx[j] = slx
                            suml2[j] = sl2
                            n_changed += 1
        if not n_changed:
            break
    for j in range(lanes):
        zero = amax[j] < GROUP_MAX_EPS
        scales[j] = np.float32(0) if zero else (sumlx[j] / suml2[j] if suml2[j] > 0 else np.float32(0))
        for i in range(n):
            L[i * lanes + j] = 0 if zero else L[i * lanes + j] + nmax


@njit(**JIT)
def u8(y, i):
    """A byte of the block as int64: numba types a shifted uint8 as uint64, which unifies with int64 as
    float64."""
    return np.int64(y[i])


# ---------------------------------------------------------------------------------------------------------------
# Q3_K: hmask[32] qs[64] scales[12] d. `y` is one block's bytes, `x` its 256 weights.


@njit(**JIT)
def _q3_k_pack_scale(y, j, l):
    """One 6-bit scale into block_q3_K's scales[12] (zeroed before): low 4 bits in bytes 0-7, high 2 in 8-11."""
    if j < 8:
        y[96 + j] = l & 0xF
    else:
        y[96 + j - 8] |= (l & 0xF) << 4
    l >>= 4
    y[104 + j % 4] |= (l << (2 * (j // 4))) & 0xFF


@njit(**JIT)
def _q3_k_finish(x, y, L, d_all):
    """The shared end of quantize_row_q3_K_ref / _impl: levels against the stored scales, then hmask and qs."""
    for j in range(16):
        sc = u8(y, 96 + j) & 0xF if j < 8 else u8(y, 96 + j - 8) >> 4
        sc = int8((sc | (((u8(y, 104 + j % 4) >> (2 * (j // 4))) & 3) << 4)) - 32)
        d = d_all * np.float32(sc)
        if not d:
            continue
        for ii in range(16):
            l = nearest_int(x[16 * j + ii] / d)
            L[16 * j + ii] = max(-4, min(3, l)) + 4
    for m in range(32):
        y[m] = 0
    # the high bit of the 1st 32 quants into bit 0 of hmask[0..31], the next 32 into bit 1, etc.
    for j in range(QK_K):
        if L[j] > 3:
            y[j % 32] |= 1 << (j // 32)
            L[j] -= 4
    for j in range(0, QK_K, 128):
        for l in range(32):
            y[32 + j // 4 + l] = (L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4)
                                  | (L[j + l + 96] << 6)) & 0xFF


@njit(**JIT)
def _lanes_of(x, n, lanes, X):
    """X[i * lanes + j] = x[n * j + i]: sub-block j of the block as lane j."""
    for j in range(lanes):
        for i in range(n):
            X[i * lanes + j] = x[n * j + i]


@njit(**JIT)
def _from_lanes(Lt, n, lanes, L):
    for j in range(lanes):
        for i in range(n):
            L[n * j + i] = Lt[i * lanes + j]


@njit(**JIT)
def _q3_k_ref(x, y, L, S):
    """quantize_row_q3_K_ref, one block."""
    X, Lt, F, scales = S.X, S.Lt, S.F, S.scales
    _lanes_of(x, 16, 16, X)
    make_q3_quants_lanes(16, 4, X, Lt, F, scales)
    _from_lanes(Lt, 16, 16, L)
    max_scale = np.float32(0)
    amax = np.float32(0)
    for j in range(16):
        scale = abs(scales[j])
        if scale > amax:
            amax = scale
            max_scale = scales[j]
    for k in range(12):
        y[96 + k] = 0
    if max_scale:
        iscale = np.float32(-32.0) / max_scale
        for j in range(16):
            l = int8(nearest_int(iscale * scales[j]))
            _q3_k_pack_scale(y, j, max(-32, min(31, l)) + 32)
        d_all = put_fp16(y, 108, np.float32(1) / iscale)
    else:
        d_all = put_fp16(y, 108, np.float32(0))
    _q3_k_finish(x, y, L, d_all)


@njit(**JIT)
def _sigma2(x):
    """quantize_row_q*_K_impl's `2*sum_x2/QK_K`: twice the block's mean square."""
    sum_x2 = np.float32(0)
    for l in range(QK_K):
        sum_x2 += x[l] * x[l]
    return np.float32(2) * sum_x2 / np.float32(QK_K)


@njit(**JIT)
def _q3_k_impl(x, qw, y, L, S):
    """quantize_row_q3_K_impl with quant_weights, one block (qw: the block's 256 importances)."""
    X, W, Lt, F, flags, scales, sw, Ls = S.X, S.W, S.Lt, S.F, S.flags, S.scales, S.sw, S.Ls
    sigma2 = _sigma2(x)
    _lanes_of(x, 16, 16, X)
    for j in range(16):
        sw[j] = np.float32(0)
    for i in range(16):
        for j in range(16):
            v = X[i * 16 + j]
            w = qw[16 * j + i] * np.sqrt(sigma2 + v * v)
            W[i * 16 + j] = w
            sw[j] += w
    make_qx_quants_lanes(16, 4, X, W, True, Lt, F, flags, scales)
    _from_lanes(Lt, 16, 16, L)
    for k in range(12):
        y[96 + k] = 0
    d_block = make_qx_quants(16, 32, scales, Ls, sw, True)
    for j in range(16):
        _q3_k_pack_scale(y, j, Ls[j])
    d_all = put_fp16(y, 108, d_block)
    _q3_k_finish(x, y, L, d_all)


# ---------------------------------------------------------------------------------------------------------------
# Q4_K: d dmin scales[12] qs[128]; Q5_K: d dmin scales[12] qh[32] qs[128]


@njit(**JIT)
def _pack_scale_min_k4(y, j, ls, lm):
    """One (scale, min) pair into the 12 scale bytes (y[4:16]) of Q4_K / Q5_K, uint8_t stores as C's."""
    if j < 4:
        y[4 + j] = ls & 0xFF
        y[4 + j + 4] = lm & 0xFF
    else:
        y[4 + j + 4] = ((ls & 0xF) | ((lm & 0xF) << 4)) & 0xFF
        y[4 + j - 4] |= ((ls >> 4) << 6) & 0xFF
        y[4 + j] |= ((lm >> 4) << 6) & 0xFF


@njit(**JIT)
def _get_scale_min_k4(y, j):
    if j < 4:
        return u8(y, 4 + j) & 63, u8(y, 4 + j + 4) & 63
    return ((u8(y, 4 + j + 4) & 0xF) | ((u8(y, 4 + j - 4) >> 6) << 4),
            (u8(y, 4 + j + 4) >> 4) | ((u8(y, 4 + j) >> 6) << 4))


@njit(**JIT)
def _levels_k4(x, y, L, nmax):
    """The final levels of Q4_K / Q5_K against the stored scales: `if (!d) continue;` keeps the search's."""
    d_all = fp16_to_fp32(u8(y, 0) | (u8(y, 1) << 8))
    dmin_all = fp16_to_fp32(u8(y, 2) | (u8(y, 3) << 8))
    for j in range(8):
        sc, m = _get_scale_min_k4(y, j)
        d = d_all * np.float32(sc)
        if not d:
            continue
        dm = dmin_all * np.float32(m)
        for ii in range(32):
            l = nearest_int((x[32 * j + ii] + dm) / d)
            L[32 * j + ii] = max(0, min(nmax, l))


@njit(**JIT)
def _qk_ref(x, y, L, S, nmax, rmin, nstep):
    """quantize_row_q4_K_ref (nmax 15, rmin -1, 20 steps) / q5_K_ref (31, -0.5, 15) up to the levels."""
    X, W, Lt, Lauxt, F, flags, scales, mins = S.X, S.W, S.Lt, S.Lauxt, S.F, S.flags, S.scales, S.mins
    _lanes_of(x, 32, 8, X)
    av_x = F[0]  # (overwritten by the search below, once W is made)
    for j in range(8):
        av_x[j] = np.float32(0)
    for i in range(32):
        for j in range(8):
            av_x[j] += X[i * 8 + j] * X[i * 8 + j]
    for j in range(8):
        av_x[j] = np.sqrt(av_x[j] / np.float32(32))
    for i in range(32):
        for j in range(8):
            W[i * 8 + j] = av_x[j] + abs(X[i * 8 + j])
    make_qkx_quants_lanes(32, nmax, X, W, Lt, Lauxt, rmin, np.float32(0.1), nstep, F, flags, scales[:8], mins)
    _from_lanes(Lt, 32, 8, L)
    max_scale = np.float32(0)  # as we are deducting the min, scales are always positive
    max_min = np.float32(0)
    for j in range(8):
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    inv_scale = np.float32(63) / max_scale if max_scale > 0 else np.float32(0)
    inv_min = np.float32(63) / max_min if max_min > 0 else np.float32(0)
    for j in range(8):
        ls = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)
        lm = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
        _pack_scale_min_k4(y, j, ls, lm)
    put_fp16(y, 0, max_scale / np.float32(63))
    put_fp16(y, 2, max_min / np.float32(63))
    _levels_k4(x, y, L, nmax)


@njit(**JIT)
def _qk_impl(x, qw, y, L, S, nmax, clamp_scales):
    """quantize_row_q4_K_impl / q5_K_impl with quant_weights up to the levels (q5_K clamps the 6-bit scales
    to 63 before packing, q4_K does not)."""
    X, W, Lt, Lauxt, F, flags, scales, mins = S.X, S.W, S.Lt, S.Lauxt, S.F, S.flags, S.scales[:8], S.mins
    sw, Ls, Lm = S.sw[:8], S.Ls[:8], S.Lm
    sigma2 = _sigma2(x)
    _lanes_of(x, 32, 8, X)
    for j in range(8):
        sw[j] = np.float32(0)
    for i in range(32):
        for j in range(8):
            v = X[i * 8 + j]
            w = qw[32 * j + i] * np.sqrt(sigma2 + v * v)
            W[i * 8 + j] = w
            sw[j] += w
    make_qkx_quants_lanes(32, nmax, X, W, Lt, Lauxt, np.float32(-0.9), np.float32(0.05), 36, F, flags, scales, mins)
    _from_lanes(Lt, 32, 8, L)
    d_block = make_qp_quants(8, 63, scales, Ls, sw)
    m_block = make_qp_quants(8, 63, mins, Lm, sw)
    for j in range(8):
        ls, lm = Ls[j], Lm[j]
        if clamp_scales:
            ls, lm = min(63, ls), min(63, lm)
        _pack_scale_min_k4(y, j, ls, lm)
    put_fp16(y, 0, d_block)
    put_fp16(y, 2, m_block)
    _levels_k4(x, y, L, nmax)


@njit(**JIT)
def _q4_k_pack(y, L):
    for j in range(0, QK_K, 64):
        for l in range(32):
            y[16 + j // 2 + l] = (L[j + l] | (L[j + l + 32] << 4)) & 0xFF


@njit(**JIT)
def _q5_k_pack(y, L):
    for j in range(32):
        y[16 + j] = 0
    m1 = 1
    m2 = 2
    for n in range(0, QK_K, 64):
        for j in range(32):
            l1 = L[n + j]
            if l1 > 15:
                l1 -= 16
                y[16 + j] |= m1
            l2 = L[n + j + 32]
            if l2 > 15:
                l2 -= 16
                y[16 + j] |= m2
            y[48 + n // 2 + j] = (l1 | (l2 << 4)) & 0xFF
        m1 <<= 2
        m2 <<= 2


# ---------------------------------------------------------------------------------------------------------------
# Q6_K: ql[128] qh[64] scales[16] d


@njit(**JIT)
def _q6_k(x, qw, use_qw, y, L, S):
    """quantize_row_q6_K_ref (use_qw false) / quantize_row_q6_K_impl (quant_weights straight into
    make_qx_quants), one block."""
    X, W, Lt, F, flags, scales = S.X, S.W, S.Lt, S.F, S.flags, S.scales
    _lanes_of(x, 16, 16, X)
    if use_qw:
        _lanes_of(qw, 16, 16, W)
    make_qx_quants_lanes(16, 32, X, W, use_qw, Lt, F, flags, scales)
    _from_lanes(Lt, 16, 16, L)
    max_scale = np.float32(0)
    max_abs_scale = np.float32(0)
    for ib in range(16):
        abs_scale = abs(scales[ib])
        if abs_scale > max_abs_scale:
            max_abs_scale = abs_scale
            max_scale = scales[ib]
    if max_abs_scale < GROUP_MAX_EPS:
        for k in range(210):
            y[k] = 0
        put_fp16(y, 208, np.float32(0))
        return
    iscale = np.float32(-128.0) / max_scale
    d_all = put_fp16(y, 208, np.float32(1) / iscale)
    for ib in range(16):
        y[192 + ib] = min(127, nearest_int(iscale * scales[ib])) & 0xFF
    for j in range(16):
        d = d_all * np.float32(int8(u8(y, 192 + j)))
        if not d:
            continue
        for ii in range(16):
            l = nearest_int(x[16 * j + ii] / d)
            L[16 * j + ii] = max(-32, min(31, l)) + 32
    for j in range(0, QK_K, 128):
        for l in range(32):
            q1 = L[j + l + 0] & 0xF
            q2 = L[j + l + 32] & 0xF
            q3 = L[j + l + 64] & 0xF
            q4 = L[j + l + 96] & 0xF
            y[j // 2 + l] = q1 | (q3 << 4)
            y[j // 2 + l + 32] = q2 | (q4 << 4)
            y[128 + j // 4 + l] = ((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4)
                                   | ((L[j + l + 96] >> 4) << 6)) & 0xFF


# ---------------------------------------------------------------------------------------------------------------
# Whole tensors: rows in parallel. Without quant_weights llama.cpp quantizes the tensor as one long row
# (quantize_row_*_ref over nrow·n_per_row): the blocks are independent, so row by row gives the same bytes.


Scratch = namedtuple("Scratch", "X W Lt Lauxt F flags scales mins sw Ls Lm")


@njit(**JIT)
def _scratch():
    """One task's working memory (a C function's locals): reused for every block of its rows."""
    return Scratch(np.empty(QK_K, np.float32), np.empty(QK_K, np.float32), np.empty(QK_K, np.int32),
                   np.empty(QK_K, np.int32), np.empty((13, 16), np.float32), np.empty((2, 16), np.bool_),
                   np.empty(16, np.float32), np.empty(8, np.float32), np.empty(16, np.float32),
                   np.empty(16, np.int32), np.empty(8, np.int32))


@njit(**JIT)
def _q3_k_task(x, out, qw, use_qw, first, last):
    S = _scratch()
    L = np.empty(QK_K, np.int32)
    for r in range(first, last):
        xr, yr = x[r], out[r]
        for i in range(x.shape[1] // QK_K):
            xb, yb = xr[QK_K * i:QK_K * (i + 1)], yr[110 * i:110 * (i + 1)]
            if use_qw:
                _q3_k_impl(xb, qw[QK_K * i:QK_K * (i + 1)], yb, L, S)
            else:
                _q3_k_ref(xb, yb, L, S)


@njit(**JIT)
def _q45_k_rows(x, out, qw, use_qw, first, last, five_bits):
    """Q4_K and Q5_K: the same search (make_qkx2/3_quants), 4 or 5 bits per value, 144 or 176 bytes a block."""
    S = _scratch()
    L = np.empty(QK_K, np.int32)
    nmax, block_bytes = (31, 176) if five_bits else (15, 144)
    rmin, nstep = (np.float32(-0.5), 15) if five_bits else (np.float32(-1.0), 20)
    for r in range(first, last):
        xr, yr = x[r], out[r]
        for i in range(x.shape[1] // QK_K):
            xb, yb = xr[QK_K * i:QK_K * (i + 1)], yr[block_bytes * i:block_bytes * (i + 1)]
            if use_qw:
                _qk_impl(xb, qw[QK_K * i:QK_K * (i + 1)], yb, L, S, nmax, five_bits)
            else:
                _qk_ref(xb, yb, L, S, nmax, rmin, nstep)
            if five_bits:
                _q5_k_pack(yb, L)
            else:
                _q4_k_pack(yb, L)


@njit(**JIT)
def _q4_k_task(x, out, qw, use_qw, first, last):
    _q45_k_rows(x, out, qw, use_qw, first, last, False)


@njit(**JIT)
def _q5_k_task(x, out, qw, use_qw, first, last):
    _q45_k_rows(x, out, qw, use_qw, first, last, True)


@njit(**JIT)
def _q6_k_task(x, out, qw, use_qw, first, last):
    S = _scratch()
    L = np.empty(QK_K, np.int32)
    for r in range(first, last):
        xr, yr = x[r], out[r]
        for i in range(x.shape[1] // QK_K):
            qb = qw[QK_K * i:QK_K * (i + 1)] if use_qw else qw
            _q6_k(xr[QK_K * i:QK_K * (i + 1)], qb, use_qw, yr[210 * i:210 * (i + 1)], L, S)


K_KERNELS = {"Q3_K": _q3_k_task, "Q4_K": _q4_k_task, "Q5_K": _q5_k_task, "Q6_K": _q6_k_task}
"""qtype -> its compiled task `(x, out, quant_weights, use_quant_weights, first_row, last_row)`: rows
first..last-1 of x quantized into the same rows of out. gguf/quantize.py joins them with block_quants.KERNELS."""
