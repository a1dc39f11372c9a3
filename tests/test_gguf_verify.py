"""`--verify` can fail, and one answer to "which GGUF type".

For every type the export writes, a tiny Llama (rows 256 wide, so the K types themselves are used) is exported,
the file as written must PASS `--verify`, and copies damaged in their tensor bytes (gguf's own reader in r+
mode, tools/measure_gguf.py's `damaged_copy`: one tensor's block scales doubled, two layers' attn_q swapped)
must FAIL; a copy whose header lies (its RMS-norm epsilon) fails on what the file computes, its weights being
exact. The bounds are verify.py's own, the ones the command uses; how they were measured is docs/gguf.md.

The type advice: plan/gguf_sizes.recommended_type is what the README's quick start, docs/gguf.md, the merge's
last lines, the export without --type and the studio's Export screen say, for the models they name.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from qlora_kit.gguf import verify
from qlora_kit.plan import gguf_sizes

gguf = pytest.importorskip("gguf")  # the optional `export` extra

REPO = Path(__file__).resolve().parents[1]
QWEN_7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
           "num_key_value_heads": 4, "vocab_size": 152064, "architectures": ["Qwen2ForCausalLM"]}
SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
           "architectures": ["LlamaForCausalLM"]}


@pytest.fixture(scope="module")
def measure():
    """tools/measure_gguf.py as a module: the damages docs/gguf.md's table was measured with."""
    spec = importlib.util.spec_from_file_location("measure_gguf", REPO / "tools" / "measure_gguf.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, measure):
    """(merged folder, the folder's reference outputs, {type: GGUF file}) for every type, exported once: the
    tiny Llama bench/results/gguf_verify.json measured as "tiny" (tools/measure_gguf.py tiny_model)."""
    from qlora_kit.gguf.export import export_gguf

    folder = measure.tiny_model(tmp_path_factory.mktemp("verify") / "merged")
    files = {t: export_gguf(folder, folder.parent / f"{t}.gguf", t, modelfile=False, log=lambda *_: None).gguf_path
             for t in verify.TYPES}
    return folder, verify.reference_outputs(folder), files


@pytest.mark.parametrize("quant", verify.TYPES)
def test_the_file_as_written_passes_and_damaged_copies_fail(tiny, measure, tmp_path, quant):
    folder, reference, files = tiny
    clean = verify.check_gguf(folder, files[quant], quant, reference=reference)
    print(f"\n{quant} as written: {clean.describe()}")
    assert clean.passed, clean.describe()
    assert clean.tensors > 0 and not clean.missing

    damages = {"block scales x2": ("scale", "blk.1.ffn_down.weight", 2.0),
               "attn_q of layers 0 and 1 swapped": ("swap", "blk.0.attn_q.weight", "blk.1.attn_q.weight")}
    for what, damage in damages.items():
        broken = measure.damaged_copy(files[quant], tmp_path / f"{quant}-damaged.gguf", damage)
        check = verify.check_gguf(folder, broken, quant, reference=reference)
        print(f"{quant}, {what}: {check.describe()}")
        assert not check.passed, (what, check.describe())
        assert "weights:" in " ".join(check.failures()) and "FAIL" in check.describe()
        assert check.weight_error > 2 * verify.WEIGHT_TOLERANCE[quant]  # not a near miss


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_k_m", "q4_0"])
def test_a_header_that_lies_fails_on_what_the_file_computes(tiny, measure, tmp_path, quant):
    """The weights are the folder's to the bit of rounding; the norm epsilon the reader takes from the header is
    not: only the next-token distributions and the greedy tokens can see it, and they must."""
    folder, reference, files = tiny
    broken = measure.damaged_copy(files[quant], tmp_path / "eps.gguf", ("field", ".layer_norm_rms_epsilon", 1e6))
    check = verify.check_gguf(folder, broken, quant, reference=reference)
    print(f"\n{quant}, rms epsilon x1e6: {check.describe()}")
    assert check.weight_error <= verify.WEIGHT_TOLERANCE[quant] and not check.missing
    failures = " ".join(check.failures())
    assert "next-token KL" in failures and "greedy agreement" in failures


def test_the_command_line_says_fail_and_exits_1_on_a_damaged_file(tiny, measure, tmp_path, capsys):
    folder, _, files = tiny
    broken = measure.damaged_copy(files["q8_0"], tmp_path / "bad.gguf", ("scale", "blk.0.attn_v.weight", 0.5))
    assert verify.verify_export(folder, broken, "q8_0") == 1
    out = capsys.readouterr().out
    assert "→ FAIL" in out and "model.layers.0.self_attn.v_proj.weight is off by 0.5" in out
    assert verify.verify_export(folder, files["q8_0"], "q8_0") == 0
    assert "→ PASS" in capsys.readouterr().out


def test_every_type_the_export_writes_has_its_bounds():
    from qlora_kit.plan.gguf_mixture import FILE_TYPES

    assert set(verify.TYPES) == set(FILE_TYPES)
    for bounds in (verify.WEIGHT_TOLERANCE, verify.KL_TOLERANCE, verify.GREEDY_FLOOR):
        assert set(bounds) == set(FILE_TYPES)
    # coarser types are allowed more, never less
    order = ("f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")
    for bounds, sign in ((verify.WEIGHT_TOLERANCE, 1), (verify.KL_TOLERANCE, 1), (verify.GREEDY_FLOOR, -1)):
        values = [sign * bounds[t] for t in order]
        assert values == sorted(values)


def test_the_bounds_sit_between_the_measured_rounding_and_the_measured_damage():
    """bench/results/gguf_verify.json (python tools/measure_gguf.py verify): on every model measured, every file
    as written is within the bounds, and every damaged copy is out of them."""
    measured = json.loads((REPO / "bench" / "results" / "gguf_verify.json").read_text(encoding="utf-8"))

    def passes(quant: str, row: dict) -> bool:  # verify.GgufCheck.failures, on the recorded figures
        agreeing, of = row["greedy_forced"]
        return (not row["missing"] and row["weight_error"] <= verify.WEIGHT_TOLERANCE[quant]
                and row["kl_mean"] <= verify.KL_TOLERANCE[quant] and agreeing / of >= verify.GREEDY_FLOOR[quant])

    for model, types in measured["models"].items():
        for quant, rows in types.items():
            assert passes(quant, rows["as written"]), (model, quant)
            for what, row in rows.items():
                if what != "as written" and quant not in measured["invisible"].get(model, {}).get(what, ()):
                    assert not passes(quant, row), (model, quant, what)


# ---------------------------------------------------------------------------------------------------------------
# One answer to "which type"


def test_the_advice_is_the_best_type_that_fits_and_never_f16():
    from qlora_kit.plan.gguf_sizes import recommended_type

    assert recommended_type(SMOLLM2).type == "q8_0"
    assert recommended_type(QWEN_7B).type == "q6_k" and recommended_type(QWEN_7B, 12).type == "q8_0"
    assert recommended_type(QWEN_7B, 80).type == "q8_0"  # the largest type that fits would be f16: not advised
    tight = recommended_type(QWEN_7B, 4)
    assert tight.type == "q3_k_m" and not tight.fits and "CPU" in tight.reason  # the smallest: most on the GPU
    # SmolLM2's rows (576) are not a multiple of 256: the advice says what that does to the K types
    assert "576" in recommended_type(SMOLLM2).reason and "576" not in recommended_type(QWEN_7B).reason


def readme_type(path: Path) -> str:
    line = next(line for line in path.read_text(encoding="utf-8").splitlines()
                if line.startswith("python tools/export_gguf.py runs/medical/merged"))
    return re.search(r"--type (\S+)", line).group(1).lower()


def test_the_readmes_and_the_docs_say_what_the_advice_says():
    from qlora_kit.plan.estimate import read_config
    from qlora_kit.recipe.loading import load_recipe

    medical = read_config(load_recipe(REPO / "recipes" / "medical.toml").model)  # the quick start's model
    advised = gguf_sizes.recommended_type(medical).type
    assert readme_type(REPO / "README.md") == advised == readme_type(REPO / "README.zh-CN.md")
    for page in ("docs/gguf.md", "docs/zh-CN/gguf.md"):
        text = (REPO / page).read_text(encoding="utf-8")
        assert f"merged --type {advised} --verify" in text, page
        assert f"merged-{advised}.Modelfile" in text, page
    # docs/gguf.md's table of advice per model and card is the function's
    table = (REPO / "docs" / "gguf.md").read_text(encoding="utf-8").split("<!-- advice table -->")[1]
    rows = [line for line in table.splitlines() if line.startswith("| R1") or line.startswith("| SmolLM2")]
    assert len(rows) == 4
    for row in rows:
        name, *cells = [cell.strip() for cell in row.strip("|").split("|")]
        config = {"SmolLM2-135M": SMOLLM2, "R1-Distill-Qwen-7B": QWEN_7B}.get(name)
        if config is None:
            spec = measure_models()[name]
            config = spec
        for card, cell in zip((4, 6, 8, 12, 16, 24), cells, strict=True):
            assert cell.strip("*") .split()[0] == gguf_sizes.recommended_type(config, card).type, (name, card)


def measure_models() -> dict:
    spec = importlib.util.spec_from_file_location("measure_gguf_models", REPO / "tools" / "measure_gguf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {name: module.config_of(m) | {"architectures": ["Qwen2ForCausalLM"]} for name, m in module.MODELS.items()}


def test_the_merge_the_export_and_the_studio_say_the_same(tiny, capsys, tmp_path):
    from qlora_kit.gguf.export import main
    from qlora_kit.merge.cli import print_gguf_advice
    from qlora_kit.studio.views import gguf_advice

    folder, _, _ = tiny
    config = json.loads((folder / "config.json").read_text())
    advised = gguf_sizes.recommended_type(config).type

    import io

    from rich.console import Console

    console = Console(file=io.StringIO(), width=300)
    print_gguf_advice(config, folder, console)
    assert console.file.getvalue().splitlines()[-1].rstrip().endswith(f"--type {advised}")

    out = tmp_path / "advised.gguf"
    assert main([str(folder), "--no-modelfile", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"--type not given: {advised}, the advice for this model" in said
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == \
        {"q8_0": 7, "q6_k": 18, "q5_k_m": 17, "q4_k_m": 15}[advised]

    run = tmp_path / "run"
    (run / "merged").mkdir(parents=True)
    (run / "merged" / "config.json").write_text(json.dumps(config))
    assert gguf_advice(run).splitlines()[-1].strip() == f"for an 8 GB card: {advised}"
