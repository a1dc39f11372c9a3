"""The block quantizers (qlora_kit/gguf/kquants.py, block_quants.py) write llama.cpp's own bytes.

  * tests/data/quant_reference.npz: what llama.cpp's `ggml_quantize_chunk` wrote (tools/make_quant_reference.py,
    llama.cpp 0c1e5709, x86-64) for every type we quantize, with and without an importance vector, on edge rows
    (all zero, constant, one sign, tiny / huge / subnormal magnitudes, an outlier, exact ties, sparse) and
    random rows; ours must equal it byte for byte. The rows are regenerated from the seed the file records.
  * with a llama.cpp build (`LLAMA_QUANTIZE=/path/to/llama-quantize`, its libggml-base beside it; skipped
    otherwise): the library itself on other shapes and distributions, and whole files: a tiny model exported by
    us as f16, quantized by llama-quantize (with and without an imatrix file), against our export of the same
    folder, tensor by tensor; and llama-quantize reading our Q3_K file back.
  * without llama.cpp: the primitives (fp16 rounding as ggml's, nearest_int), Q3_K read back by gguf's own
    reader and dequantizer, what an importance vector changes, the interface and encode_tensor's chunks.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qlora_kit.gguf import kquants
from qlora_kit.gguf.kquants import BLOCK
from qlora_kit.gguf.quantize import quantize_k

gguf = pytest.importorskip("gguf")

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "tests" / "data" / "quant_reference.npz"
LLAMA_QUANTIZE = os.environ.get("LLAMA_QUANTIZE", "")
ALL_TYPES = tuple(BLOCK)


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


make_reference = load_tool("make_quant_reference")


def first_difference(ours: np.ndarray, expected: np.ndarray, qtype: str) -> str:
    rows = np.nonzero((ours != expected).any(axis=1))[0]
    if not len(rows):
        return ""
    r = int(rows[0])
    byte = int(np.nonzero(ours[r] != expected[r])[0][0])
    block_bytes = BLOCK[qtype][1]
    return (f"{len(rows)} of {len(ours)} rows differ, first row {r} at byte {byte} (block {byte // block_bytes}, "
            f"offset {byte % block_bytes}): ours {ours[r, byte]}, llama.cpp {expected[r, byte]}")


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp's bytes, committed

REFERENCE_CASES = [(name, qtype, weighted) for name, (_, _, qtypes) in make_reference.SETS.items()
                   for qtype in qtypes for weighted in (False, True) if not (weighted and qtype == "Q8_0")]


@pytest.fixture(scope="module")
def reference():
    return np.load(REFERENCE)


@pytest.mark.parametrize(("name", "qtype", "weighted"), REFERENCE_CASES,
                         ids=[f"{q}{'+imatrix' if w else ''}" for _, q, w in REFERENCE_CASES])
def test_bytes_are_llama_cpps(reference, name, qtype, weighted):
    columns, random_rows, _ = make_reference.SETS[name]
    rows, importance = make_reference.reference_inputs(columns, random_rows, int(reference["seed"]))
    assert make_reference.digest(rows) == str(reference[f"{name}/sha256"]), \
        "numpy drew other rows than when the reference was written: rerun tools/make_quant_reference.py"
    assert make_reference.digest(importance) == str(reference[f"{name}/importance_sha256"])
    expected = reference[f"{name}/{qtype}{'+imatrix' if weighted else ''}"]
    ours = quantize_k(rows, qtype, importance if weighted else None)
    assert ours.shape == expected.shape == gguf.quants.quant_shape_to_byte_shape(rows.shape,
                                                                                 gguf.GGMLQuantizationType[qtype])
    assert ours.tobytes() == expected.tobytes(), first_difference(ours, expected, qtype)


def test_the_reference_covers_every_type_both_ways(reference):
    keys = set(reference.files)
    for qtype in ALL_TYPES:
        assert any(k.endswith(f"/{qtype}") for k in keys)
        assert qtype == "Q8_0" or any(k.endswith(f"/{qtype}+imatrix") for k in keys)
    assert REFERENCE.stat().st_size < 300_000


def test_an_importance_vector_changes_the_bytes_and_q8_0_ignores_it():
    rows, importance = make_reference.reference_inputs(256, 16)
    for qtype in ALL_TYPES:
        plain, weighted = quantize_k(rows, qtype), quantize_k(rows, qtype, importance)
        if qtype == "Q8_0":  # quantize_q8_0: `(void)quant_weights;`
            assert plain.tobytes() == weighted.tobytes()
        else:
            assert plain.tobytes() != weighted.tobytes(), qtype


# ---------------------------------------------------------------------------------------------------------------
# Against a llama.cpp build, where one is given

needs_llama_cpp = pytest.mark.skipif(not LLAMA_QUANTIZE or not Path(LLAMA_QUANTIZE).is_file(),
                                     reason="set LLAMA_QUANTIZE to a llama-quantize binary to compare with it")


def ggml_library() -> Path:
    folder = Path(LLAMA_QUANTIZE).parent
    found = [p for pattern in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll") for p in folder.glob(pattern)]
    if not found:
        pytest.skip(f"no libggml-base beside {LLAMA_QUANTIZE}")
    return found[0]


@needs_llama_cpp
@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_bytes_equal_the_llama_cpp_library_on_other_shapes(qtype):
    ggml = make_reference.Ggml(ggml_library())
    rng = np.random.default_rng(7)
    columns = 1536 if qtype.endswith("_K") else 576  # R1-Distill-Qwen-1.5B's hidden size, SmolLM2's
    samples = {"normal": rng.normal(0, 0.02, (96, columns)), "t(3)": rng.standard_t(3, (64, columns)) * 0.01,
               "uniform": rng.uniform(-1, 1, (32, columns)),
               "scaled rows": rng.normal(0, 1, (64, columns)) * 10.0 ** rng.uniform(-6, 3, (64, 1))}
    importance = [rng.gamma(0.5, 0.01, columns), rng.uniform(0, 1, columns) ** 8, np.ones(columns)]
    for what, rows in samples.items():
        rows = rows.astype(np.float32)
        for qw in [None] + importance:
            qw = None if qw is None else qw.astype(np.float32)
            ours, theirs = quantize_k(rows, qtype, qw), ggml.quantize(rows, qtype, qw)
            assert ours.tobytes() == theirs.tobytes(), (what, qw is not None, first_difference(ours, theirs, qtype))


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory):
    """A tiny Llama (rows 256 wide: the K types themselves), exported as f16, q3_k_m and q4_k_m, and those two
    again with a random importance matrix saved as llama-imatrix saves one."""
    from qlora_kit.gguf.export import export_gguf
    from qlora_kit.gguf.imatrix import Imatrix, save_imatrix

    measure = load_tool("measure_gguf")
    root = tmp_path_factory.mktemp("kq")
    folder = measure.tiny_model(root / "merged")
    # weights f16 can hold exactly: the f16 file llama-quantize reads then has the weights our export reads
    from safetensors.torch import load_file, save_file

    for shard in folder.glob("*.safetensors"):
        weights = load_file(shard)
        save_file({k: v.to(torch.float16).to(v.dtype) for k, v in weights.items()}, shard, metadata={"format": "pt"})
    files = {t: export_gguf(folder, root / f"{t}.gguf", t, modelfile=False, log=lambda *_: None).gguf_path
             for t in ("f16", "q3_k_m", "q4_k_m")}
    f16 = {t.name: t for t in gguf.GGUFReader(files["f16"]).tensors}
    rng = np.random.default_rng(11)
    sums = {name: (rng.gamma(0.7, 1.0, t.shape[0]) * 64).astype(np.float32)
            for name, t in f16.items() if name.startswith("blk.") and len(t.shape) == 2}
    imatrix = Imatrix(sums, dict.fromkeys(sums, 64), datasets=["random"], chunk_count=1)
    imatrix_path = save_imatrix(imatrix, root / "random.imatrix")
    for t in ("q3_k_m", "q4_k_m"):
        files[f"{t}+imatrix"] = export_gguf(folder, root / f"{t}-imatrix.gguf", t, modelfile=False,
                                            log=lambda *_: None, imatrix=imatrix_path).gguf_path
    return folder, files, imatrix_path


def tensors_of(path: Path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_q3_k_files_read_back_with_ggufs_reader_and_dequantizer(tiny_exports):
    """llama.cpp's Python reader takes our Q3_K tensors, and its dequantizer gives the weights back within Q3_K's
    rounding; the file's bytes are quantize_k's of the f16 weights."""
    _, files, _ = tiny_exports
    ours, f16 = tensors_of(files["q3_k_m"]), tensors_of(files["f16"])
    q3 = [name for name, t in ours.items() if t.tensor_type == gguf.GGMLQuantizationType.Q3_K]
    assert "blk.0.ffn_gate.weight" in q3 and len(q3) >= 6
    fields = gguf.GGUFReader(files["q3_k_m"]).fields
    assert fields["general.file_type"].contents() == 12  # LLAMA_FTYPE_MOSTLY_Q3_K_M
    for name in q3:
        source = np.asarray(f16[name].data, dtype=np.float32)
        back = gguf.quants.dequantize(ours[name].data, gguf.GGMLQuantizationType.Q3_K)
        assert back.shape == source.shape
        assert ours[name].data.tobytes() == quantize_k(source, "Q3_K").tobytes()
        relative = np.sqrt(np.mean((back - source) ** 2) / np.mean(source ** 2))
        assert relative < 0.2, (name, relative)  # Q3_K on Gaussian weights: measured 0.14-0.15


@needs_llama_cpp
@pytest.mark.parametrize("kind", ["q3_k_m", "q4_k_m", "q3_k_m+imatrix", "q4_k_m+imatrix"])
def test_files_equal_llama_quantizes_tensor_by_tensor(tiny_exports, tmp_path, kind):
    _, files, imatrix_path = tiny_exports
    ft, _, weighted = kind.partition("+")
    out = tmp_path / f"llama-{ft}.gguf"
    command = [LLAMA_QUANTIZE] + (["--imatrix", str(imatrix_path)] if weighted else []) + [
        str(files["f16"]), str(out), ft.upper(), "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs, ours = tensors_of(out), tensors_of(files[kind])
    assert set(theirs) == set(ours)
    for name, tensor in theirs.items():
        assert ours[name].tensor_type == tensor.tensor_type, name
        assert ours[name].data.tobytes() == tensor.data.tobytes(), f"{kind}: {name} ({tensor.tensor_type.name})"


@needs_llama_cpp
def test_llama_quantize_reads_our_q3_k_file(tiny_exports, tmp_path):
    """llama.cpp's own loader takes our Q3_K file and dequantizes it (requantized to Q8_0 here)."""
    _, files, _ = tiny_exports
    out = tmp_path / "requantized.gguf"
    done = subprocess.run([LLAMA_QUANTIZE, "--allow-requantize", str(files["q3_k_m"]), str(out), "Q8_0", "1"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    ours, again = tensors_of(files["q3_k_m"]), tensors_of(out)
    name = "blk.0.ffn_gate.weight"
    assert ours[name].tensor_type == gguf.GGMLQuantizationType.Q3_K
    weights = gguf.quants.dequantize(ours[name].data, gguf.GGMLQuantizationType.Q3_K)
    assert again[name].data.tobytes() == quantize_k(weights, "Q8_0").tobytes()


# ---------------------------------------------------------------------------------------------------------------
# The primitives, and what the importance does


@pytest.fixture(scope="module")
def primitives():
    from numba import njit

    @njit
    def fp16_bits(values):
        out = np.empty(values.shape[0], np.int64)
        for i in range(values.shape[0]):
            out[i] = kquants.fp32_to_fp16(values[i])
        return out

    @njit
    def fp16_back(bits):
        out = np.empty(bits.shape[0], np.float32)
        for i in range(bits.shape[0]):
            out[i] = kquants.fp16_to_fp32(bits[i])
        return out

    @njit
    def nearest(values):
        out = np.empty(values.shape[0], np.int64)
        for i in range(values.shape[0]):
            out[i] = kquants.nearest_int(values[i])
        return out

    return fp16_bits, fp16_back, nearest


def test_fp16_is_round_to_nearest_even_for_every_float_and_back_is_exact(primitives):
    fp16_bits, fp16_back, _ = primitives
    rng = np.random.default_rng(5)
    bits = np.r_[rng.integers(0, 2**32, 200_000, dtype=np.uint64),
                 np.arange(0x33000000 - 64, 0x33000000 + 64), np.arange(0x477FE000 - 64, 0x477FF000 + 64)]
    values = bits.astype(np.uint32).view(np.float32)
    values = np.r_[values, np.float32([0.0, -0.0, np.inf, -np.inf, 65504, 65520, 65519.996, 5.96e-8, 2.98e-8])]
    finite = ~np.isnan(values)
    ours = fp16_bits(values)
    with np.errstate(over="ignore"):  # numpy's cast of values beyond f16's range to inf, as wanted
        assert (ours[finite] == values[finite].astype(np.float16).view(np.uint16)).all()
    assert (ours[~finite] & 0x7FFF == 0x7E00).all()  # ggml's quiet nan
    every = np.arange(65536)
    back = fp16_back(every)
    finite16 = ~np.isnan(every.astype(np.uint16).view(np.float16))
    assert (back[finite16].view(np.uint32) == every.astype(np.uint16).view(np.float16)[finite16]
            .astype(np.float32).view(np.uint32)).all()


def test_nearest_int_rounds_half_to_even(primitives):
    _, _, nearest = primitives
    values = np.r_[np.arange(-40, 41) * 0.5, np.random.default_rng(6).uniform(-4e6, 4e6, 100_000)].astype(np.float32)
    assert (nearest(values) == np.rint(values).astype(np.int64)).all()


def weighted_error(x, back, importance):
    return float(np.sum(importance * (back - x) ** 2))


@pytest.mark.parametrize("qtype", ALL_TYPES[:-1])
def test_the_importance_lowers_the_error_where_it_weighs(qtype):
    """What --imatrix is for: columns the model uses more are rounded more carefully."""
    rng = np.random.default_rng(8)
    x = rng.normal(0, 0.02, (128, 512)).astype(np.float32)
    importance = np.where(rng.random(512) < 0.1, 100.0, 0.01).astype(np.float32)
    kind = gguf.GGMLQuantizationType[qtype]
    plain = gguf.quants.dequantize(quantize_k(x, qtype), kind)
    weighted = gguf.quants.dequantize(quantize_k(x, qtype, importance), kind)
    ratio = weighted_error(x, weighted, importance) / weighted_error(x, plain, importance)
    print(f"\n{qtype}: weighted error {ratio:.2f} of the reference quantizer's")
    assert ratio < 0.9


# ---------------------------------------------------------------------------------------------------------------
# The interface


def test_bad_shapes_and_types_are_refused():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_k(np.zeros((2, 96), np.float32), "Q4_K")
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_k(np.zeros((2, 40), np.float32), "Q8_0")
    with pytest.raises(ValueError, match="importance has 255 values"):
        quantize_k(np.zeros((2, 256), np.float32), "Q4_K", np.ones(255, np.float32))
    with pytest.raises(ValueError, match="no quantizer for Q2_K"):
        quantize_k(np.zeros((2, 256), np.float32), "Q2_K")


def test_threads_and_input_dtype_do_not_change_the_bytes():
    x = np.random.default_rng(9).normal(0, 0.02, (37, 512))
    importance = np.random.default_rng(10).gamma(0.5, 0.01, 512)
    for qtype in ("Q4_K", "Q5_0"):
        once = quantize_k(x.astype(np.float32), qtype, importance)
        assert quantize_k(x, qtype, importance, threads=1).tobytes() == once.tobytes()  # float64 in, cast first
        assert quantize_k(x.astype(np.float32)[:, :], qtype, importance.astype(np.float32), threads=2).tobytes() \
            == once.tobytes()


@pytest.mark.parametrize("qtype", ["Q3_K", "Q4_K", "Q6_K", "Q4_0", "Q5_1", "Q8_0"])
def test_encode_tensor_passes_the_importance_in_bounded_chunks(monkeypatch, qtype):
    import qlora_kit.gguf.tensors as tensors

    monkeypatch.setattr(tensors, "CHUNK_WEIGHTS", 3 * 512)  # 3 rows per chunk: several chunks and a short last one
    data = torch.from_numpy(np.random.default_rng(3).normal(0, 0.02, (10, 512)).astype(np.float32)).to(torch.bfloat16)
    importance = np.random.default_rng(4).gamma(0.5, 0.01, 512).astype(np.float32)
    plan = tensors.TensorPlan("blk.0.ffn_up.weight", "x", None, (10, 512), qtype)
    for weights in (None, importance):
        done = []
        encoded = tensors.encode_tensor(plan, data, done.append, importance=weights)
        assert encoded.shape == tensors.stored_bytes(plan)[0]
        assert encoded.tobytes() == quantize_k(data.float().numpy(), qtype, weights).tobytes()
        assert sum(done) == data.numel() and len(done) == 4
