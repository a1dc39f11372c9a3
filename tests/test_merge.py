"""The merge tool on real (tiny) models: real safetensors shards, a real PEFT adapter, real bitsandbytes NF4.

References are peft's own `merge_and_unload()` on the unquantized base, and PEFT applied to the 4-bit base the
way training loads it. Offline, CPU only, no mocks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora_kit.errors import UserError
from qlora_kit.merge import check_free_disk, compare_logits, main
from qlora_kit.recipe.loading import recipe_to_toml
from qlora_kit.recipe.schema import Recipe

REPO = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
                 "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>{% endif %}"
                 "{% endfor %}{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}")
SPECIAL = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]
PROBE_IDS = torch.tensor([[1, 17, 42, 99, 250, 3, 7, 300, 11, 64, 128, 5]])


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: a tiny tokenizer, tiny Qwen2 bases in several shards, run directories with real PEFT adapters


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE trained here (~300 tokens) with R1's special tokens and an R1-like chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = ["A patient presents with chest pain and shortness of breath.", "The first-line treatment is a diuretic.",
            "Explain why the sky is blue.", "Reasoning: consider the differential diagnosis step by step."] * 20
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(text, trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=SPECIAL[0], eos_token=SPECIAL[1],
                                        pad_token=SPECIAL[1])
    tokenizer.chat_template = CHAT_TEMPLATE
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(folder)
    return folder


def qwen2_config(tied: bool, layers: int = 2, intermediate: int = 128):
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=intermediate, vocab_size=512, max_position_embeddings=256,
                       tie_word_embeddings=tied, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def save_base(folder: Path, tokenizer_dir: Path, config, seed: int = 0, dtype=torch.bfloat16) -> Path:
    """A random base saved like a hub model: 16-bit safetensors in several shards, with the tokenizer files."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(folder, max_shard_size="100KB")
    for file in tokenizer_dir.iterdir():
        shutil.copyfile(file, folder / file.name)
    return folder


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tokenizer_dir) -> dict[bool, Path]:
    """tied -> base folder."""
    root = tmp_path_factory.mktemp("bases")
    return {tied: save_base(root / f"tied-{tied}", tokenizer_dir, qwen2_config(tied)) for tied in (True, False)}


def make_run(folder: Path, base_model, model_name: str, tokenizer_dir: Path, *, use_dora: bool = False,
             init: str = "pretrained", seed: int = 42, **lora_extra) -> Path:
    """A run directory as `python -m qlora_kit.run` leaves it: adapter/ (+ tokenizer), recipe.toml, summary.json."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    recipe = Recipe()
    recipe.model.name, recipe.model.init, recipe.train.seed = model_name, init, seed
    recipe.lora.r, recipe.lora.alpha, recipe.lora.use_dora = 8, 16, use_dora
    recipe.output.dir = str(folder)
    torch.manual_seed(seed)
    # init_lora_weights=False: B is random, not zero, so the update is large and any merge mistake shows.
    config = LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "use_dora": use_dora,
                           "init_lora_weights": False, "task_type": "CAUSAL_LM", **lora_extra})
    get_peft_model(base_model, config).save_pretrained(folder / "adapter")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder / "adapter")
    (folder / "recipe.toml").write_text(recipe_to_toml(recipe), encoding="utf-8")
    summary = {"steps": 60, "wall_time_s": 41.2, "final_train_loss": 1.234, "model_weights": "pretrained"}
    (folder / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return folder


def load_fp32(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, bases, tokenizer_dir) -> dict[bool, Path]:
    """tied -> run directory with a plain LoRA adapter on that base."""
    root = tmp_path_factory.mktemp("runs")
    return {tied: make_run(root / f"run-tied-{tied}", load_fp32(base), str(base), tokenizer_dir)
            for tied, base in bases.items()}


def peft_reference(base_dir: Path, adapter_dir: Path, dtype: torch.dtype):
    """peft's own merge_and_unload() on the unquantized base, in the output dtype."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_fp32(base_dir), adapter_dir).merge_and_unload().to(dtype).eval()


@torch.inference_mode()
def logits(model) -> torch.Tensor:
    return model(input_ids=PROBE_IDS).logits[0].float()


def load_merged(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()  # plain loading: dtype from config.json


def safetensors_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    state = {}
    for file in sorted(set(index["weight_map"].values())):
        state.update(load_file(folder / file))
    assert set(state) == set(index["weight_map"])
    return state


# ---------------------------------------------------------------------------------------------------------------
# Merging


@pytest.mark.parametrize(("dtype_name", "tied"), [("float16", False), ("bfloat16", True), ("float16", True),
                                                  ("bfloat16", False)])
def test_merge_matches_peft_merge_and_unload(runs, bases, tokenizer_dir, tmp_path, capsys, dtype_name, tied):
    out = tmp_path / "merged"
    assert main([str(runs[tied]), "--out", str(out), "--dtype", dtype_name, "--max-shard-size", "100KB",
                 "--into", "original"]) == 0
    printed = capsys.readouterr().out
    assert "ORIGINAL 16-bit" in printed and "verification:" in printed and "PASS" in printed
    assert "peak RAM" in printed

    dtype = getattr(torch, dtype_name)
    reference = peft_reference(bases[tied], runs[tied] / "adapter", dtype)
    merged = load_merged(out)
    assert merged.dtype == dtype
    # Same arithmetic as peft (float32 W + scale*B@A, one rounding): the weights agree to the last bit or one ulp.
    ref_state = reference.state_dict()
    for name, tensor in safetensors_state(out).items():
        assert tensor.dtype == dtype
        torch.testing.assert_close(tensor, ref_state[name], rtol=1e-2 if dtype_name == "bfloat16" else 1e-3, atol=0)
    tol = {"float16": 2e-3, "bfloat16": 2e-2}[dtype_name]
    torch.testing.assert_close(logits(merged), logits(reference), rtol=tol, atol=tol)
    # The update is really in there: the merged model differs from the base.
    assert (logits(merged) - logits(load_fp32(bases[tied]).to(dtype))).abs().max() > 0.05

    # Output files: shards of at most 100 KB + index, config without quantization_config, tokenizer byte-identical.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    state = safetensors_state(out)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards == sorted(p.name for p in out.glob("*.safetensors"))
    for shard in shards:
        names = [n for n, f in index["weight_map"].items() if f == shard]
        assert len(names) == 1 or sum(state[n].numel() * state[n].element_size() for n in names) <= 100_000
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == dtype_name
    assert config["tie_word_embeddings"] is tied
    assert ("lm_head.weight" in safetensors_state(out)) is not tied
    assert (out / "generation_config.json").is_file()
    for file in tokenizer_dir.iterdir():
        assert (out / file.name).read_bytes() == file.read_bytes(), file.name
    assert "chat_template.jinja" in {f.name for f in tokenizer_dir.iterdir()}
    card = (out / "README.md").read_text()
    assert "top-1 token agreement" in card and "final_train_loss" in card and "[lora]" in card
    assert not list(out.parent.glob(".merged.partial-*"))


def test_dora_adapter_matches_peft(bases, tokenizer_dir, tmp_path):
    run = make_run(tmp_path / "run", load_fp32(bases[False]), str(bases[False]), tokenizer_dir, use_dora=True)
    out = tmp_path / "merged"
    assert main([str(run), "--out", str(out), "--dtype", "float32", "--into", "original"]) == 0
    reference = peft_reference(bases[False], run / "adapter", torch.float32)
    torch.testing.assert_close(logits(load_merged(out)), logits(reference), rtol=1e-5, atol=1e-5)
    assert "DoRA" in (out / "README.md").read_text()


def test_rslora_and_rank_pattern_scales(bases, tokenizer_dir, tmp_path):
    run = make_run(tmp_path / "run", load_fp32(bases[False]), str(bases[False]), tokenizer_dir, use_rslora=True,
                   rank_pattern={"q_proj": 4}, alpha_pattern={"down_proj": 3})
    out = tmp_path / "merged"
    assert main([str(run), "--out", str(out), "--dtype", "float32", "--no-verify", "--into", "original"]) == 0
    reference = peft_reference(bases[False], run / "adapter", torch.float32)
    torch.testing.assert_close(logits(load_merged(out)), logits(reference), rtol=1e-5, atol=1e-5)


def test_into_dequantized_matches_peft_on_the_nf4_base(runs, bases, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora_kit.model.loading import keep_cpu_weights_trainable

    original, dequantized = tmp_path / "original", tmp_path / "dequantized"
    assert main([str(runs[False]), "--out", str(original), "--dtype", "float32", "--no-verify",
                 "--into", "original"]) == 0
    assert main([str(runs[False]), "--out", str(dequantized), "--dtype", "float32", "--into", "dequantized"]) == 0
    printed = capsys.readouterr().out
    assert "DEQUANTIZED NF4" in printed and "14 Linear weights" in printed and "PASS" in printed

    # Reference: the run's own model, loaded 4-bit by bitsandbytes exactly as training did, adapter unmerged.
    quantized = AutoModelForCausalLM.from_pretrained(bases[False], dtype=torch.float32, device_map={"": "cpu"},
                                                     quantization_config=BitsAndBytesConfig(
                                                         load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                         bnb_4bit_use_double_quant=True,
                                                         bnb_4bit_compute_dtype=torch.float32))
    keep_cpu_weights_trainable(quantized)  # the path training ran (no bfloat16 CPU inference repacking)
    reference = logits(PeftModel.from_pretrained(quantized, runs[False] / "adapter").eval())
    torch.testing.assert_close(logits(load_merged(dequantized)), reference, rtol=1e-4, atol=1e-4)

    # Against the original-mode merge: only the quantized Linear weights differ, by NF4's rounding.
    a, b = safetensors_state(original), safetensors_state(dequantized)
    for name in a:
        differs = not torch.equal(a[name], b[name])
        assert differs == (".layers." in name and name.endswith("proj.weight")), name
    gap = (logits(load_merged(original)) - logits(load_merged(dequantized))).abs().max()
    assert 0 < gap < 0.5 * (logits(load_merged(original)).abs().max())

    # The default for a run that trained on a 4-bit base is this merge: the model it trained, evaluated and sampled.
    default = tmp_path / "default"
    assert main([str(runs[False]), "--out", str(default), "--dtype", "float32", "--no-verify"]) == 0
    assert "DEQUANTIZED NF4 weights + LoRA update (default" in capsys.readouterr().out
    assert all(torch.equal(t, safetensors_state(dequantized)[n]) for n, t in safetensors_state(default).items())


def test_random_init_run_rebuilds_the_same_base(tokenizer_dir, tmp_path, capsys):
    """init = "random": the model folder holds only config + tokenizer; merge rebuilds the run's seeded weights."""
    from peft import PeftModel

    from qlora_kit.model.loading import random_model
    from qlora_kit.recipe.schema import ModelSection

    model_dir = tmp_path / "config-only"
    qwen2_config(tied=True).save_pretrained(model_dir)
    for file in tokenizer_dir.iterdir():
        shutil.copyfile(file, model_dir / file.name)
    section = ModelSection(name=str(model_dir), init="random")
    run = make_run(tmp_path / "run", random_model(section, 7), str(model_dir), tokenizer_dir, init="random", seed=7)
    out = tmp_path / "merged"
    assert main([str(run), "--out", str(out), "--dtype", "float32", "--into", "original"]) == 0
    printed = capsys.readouterr().out
    assert "RANDOM-INIT" in printed and "PASS" in printed
    reference = PeftModel.from_pretrained(random_model(section, 7).float(), run / "adapter").merge_and_unload()
    torch.testing.assert_close(logits(load_merged(out)), logits(reference.eval()), rtol=1e-5, atol=1e-5)
    assert "Demo model" in (out / "README.md").read_text()
    assert (out / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()


def test_overwrite_replaces_a_previous_merge(runs, tmp_path):
    out = tmp_path / "merged"
    assert main([str(runs[True]), "--out", str(out), "--no-verify"]) == 0
    (out / "stale.txt").write_text("old")
    assert main([str(runs[True]), "--out", str(out), "--no-verify", "--dtype", "bfloat16", "--overwrite"]) == 0
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_cli_script_with_a_hub_base_from_the_offline_cache(runs, bases, tmp_path):
    """`tools/merge.py RUN --base org/name`: the hub id resolves through huggingface_hub's cache with
    HF_HUB_OFFLINE=1 (a cache laid out as huggingface_hub writes it); output defaults to RUN/merged."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub-cache" / "models--someone--tiny-qwen2"
    shutil.copytree(bases[False], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    run = tmp_path / "run"
    shutil.copytree(runs[False], run)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub-cache"), "COLUMNS": "120"}
    done = subprocess.run([sys.executable, str(REPO / "tools" / "merge.py"), str(run), "--base", "someone/tiny-qwen2",
                           "--no-verify"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (run / "merged" / "model.safetensors.index.json").is_file()
    assert "peak RAM" in done.stdout and "merging shards" in done.stdout
    assert "float16" in (run / "merged" / "config.json").read_text()
    assert (run / "merged" / "tokenizer.json").read_bytes() == (bases[False] / "tokenizer.json").read_bytes()

    missing = subprocess.run([sys.executable, "-m", "qlora_kit.merge", str(run), "--base", "someone/not-cached",
                              "--out", str(tmp_path / "never")], capture_output=True, text=True,
                             env={**env, "PYTHONPATH": str(REPO)}, timeout=300)
    assert missing.returncode == 2 and "HF_HUB_OFFLINE" in missing.stderr, missing.stderr
    assert not (tmp_path / "never").exists()


# ---------------------------------------------------------------------------------------------------------------
# Refusals: exit code 2, a message naming the problem, nothing written


def refuse(capsys, args: list[str], out: Path, expected: str) -> None:
    before = sorted(out.parent.iterdir()) if out.parent.exists() else []
    assert main([*args, "--out", str(out)]) == 2
    message = capsys.readouterr().err
    assert expected in message, message
    assert not out.exists() or out.is_dir()
    assert (sorted(out.parent.iterdir()) if out.parent.exists() else []) == before  # nothing written


def test_refuses_run_dir_without_adapter_or_recipe(runs, tmp_path, capsys):
    for missing in ("adapter", "recipe.toml"):
        run = tmp_path / f"no-{missing}"
        shutil.copytree(runs[False], run)
        target = run / missing
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        refuse(capsys, [str(run)], tmp_path / "out" / "merged", f"{missing} missing")


def test_refuses_non_empty_output_dir(runs, bases, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refuse(capsys, [str(runs[False])], out, "exists and is not empty")
    # --overwrite only ever replaces a model folder, never an arbitrary one.
    assert main([str(runs[False]), "--out", str(out), "--overwrite", "--no-verify"]) == 2
    assert (out / "notes.txt").read_text() == "mine"
    # ... nor a folder the merge reads from, even one that looks like a model.
    refuse(capsys, [str(runs[False]), "--overwrite"], bases[False], "holds the run or the base model")


def test_refuses_base_of_another_shape(runs, tokenizer_dir, tmp_path, capsys):
    wider = save_base(tmp_path / "wider", tokenizer_dir, qwen2_config(False, intermediate=192))
    refuse(capsys, [str(runs[False]), "--base", str(wider)], tmp_path / "o" / "m", "does not fit the base")


def test_refuses_base_missing_modules(runs, tokenizer_dir, tmp_path, capsys):
    shallow = save_base(tmp_path / "shallow", tokenizer_dir, qwen2_config(False, layers=1))
    refuse(capsys, [str(runs[False]), "--base", str(shallow)], tmp_path / "o" / "m", "no `model.layers.1.")


def test_refuses_other_architecture(runs, tokenizer_dir, tmp_path, capsys):
    from transformers import LlamaConfig

    llama = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=128, vocab_size=512, tie_word_embeddings=False)
    other = save_base(tmp_path / "llama", tokenizer_dir, llama)
    refuse(capsys, [str(runs[False]), "--base", str(other)], tmp_path / "o" / "m", "different architecture")


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes"])
def test_refuses_quantized_base_without_into_dequantized(bases, runs, tmp_path, capsys, method):
    quantized = tmp_path / "quantized"
    shutil.copytree(bases[False], quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    (quantized / "config.json").write_text(json.dumps(config))
    refuse(capsys, [str(runs[False]), "--base", str(quantized)], tmp_path / "o" / "m", f"itself quantized ({method})")
    if method != "bitsandbytes":  # GPTQ/AWQ cannot be dequantized here either
        refuse(capsys, [str(runs[False]), "--base", str(quantized), "--into", "dequantized"], tmp_path / "o" / "m",
               "itself quantized")


def test_into_dequantized_of_a_prequantized_bnb_base(runs, bases, tmp_path, capsys):
    """A bitsandbytes 4-bit base (saved pre-quantized) is dequantized from its stored codes."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantized = tmp_path / "bnb-base"
    AutoModelForCausalLM.from_pretrained(bases[False], dtype=torch.float32, device_map={"": "cpu"},
                                         quantization_config=BitsAndBytesConfig(
                                             load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True,
                                             bnb_4bit_compute_dtype=torch.float32)).save_pretrained(quantized)
    refuse(capsys, [str(runs[False]), "--base", str(quantized), "--into", "original"], tmp_path / "o" / "m",
           "itself quantized")
    from_codes, from_16bit = tmp_path / "from-codes", tmp_path / "from-16bit"
    assert main([str(runs[False]), "--base", str(quantized), "--into", "dequantized", "--dtype", "float32",
                 "--out", str(from_codes)]) == 0
    assert "PASS" in capsys.readouterr().out
    assert main([str(runs[False]), "--into", "dequantized", "--dtype", "float32", "--no-verify",
                 "--out", str(from_16bit)]) == 0
    torch.testing.assert_close(logits(load_merged(from_codes)), logits(load_merged(from_16bit)), rtol=1e-5, atol=1e-5)


def test_refuses_pickle_weights_unless_the_recipe_allows_them(bases, runs, tmp_path, capsys):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for file in bases[False].iterdir():
        if not file.name.startswith("model"):
            shutil.copyfile(file, pickled / file.name)
    torch.save(load_fp32(bases[False]).to(torch.bfloat16).state_dict(), pickled / "pytorch_model.bin")
    refuse(capsys, [str(runs[False]), "--base", str(pickled)], tmp_path / "o" / "m", "pickle")

    run = tmp_path / "run-allows-pickle"
    shutil.copytree(runs[False], run)
    recipe = (run / "recipe.toml").read_text().replace("allow_pickle_weights = false", "allow_pickle_weights = true")
    (run / "recipe.toml").write_text(recipe)
    out = tmp_path / "merged"
    assert main([str(run), "--base", str(pickled), "--out", str(out), "--dtype", "float32"]) == 0
    assert (out / "model-00001-of-00001.safetensors").is_file() and not list(out.glob("*.bin"))


def test_refuses_unsupported_adapters(bases, tokenizer_dir, tmp_path, capsys):
    run = make_run(tmp_path / "run", load_fp32(bases[False]), str(bases[False]), tokenizer_dir,
                   target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    refuse(capsys, [str(run)], tmp_path / "o" / "m", "modules_to_save")
    config_path = run / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(modules_to_save=None, lora_bias=True)
    config_path.write_text(json.dumps(config))
    refuse(capsys, [str(run)], tmp_path / "o" / "m", "lora_bias = True")


def test_refuses_float16_overflow_and_leaves_nothing_behind(runs, tokenizer_dir, tmp_path, capsys):
    """A weight beyond float16's range is found mid-merge: the half-written output is removed."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(qwen2_config(False), dtype=torch.bfloat16)
    with torch.no_grad():
        model.model.norm.weight[0] = 1e5
    model.save_pretrained(tmp_path / "big", max_shard_size="100KB")
    out = tmp_path / "o" / "m"
    refuse(capsys, [str(runs[False]), "--base", str(tmp_path / "big"), "--max-shard-size", "100KB"], out,
           "beyond float16's range")
    assert not out.parent.exists()
    assert main([str(runs[False]), "--base", str(tmp_path / "big"), "--dtype", "bfloat16", "--no-verify",
                 "--out", str(out)]) == 0


def test_refuses_when_the_disk_is_too_small(tmp_path):
    with pytest.raises(UserError, match="Not enough free disk"):
        check_free_disk(tmp_path / "not" / "yet" / "there", needed=10**18)
    check_free_disk(tmp_path / "not" / "yet" / "there", needed=1)
    assert list(tmp_path.iterdir()) == []


def test_verification_fails_beyond_the_tolerance():
    reference = [torch.tensor([[4.0, -2.0, 1.0]]), torch.tensor([[0.5, 3.0, -1.0]])]
    base_only = [r * 0.5 for r in reference]
    close = [r + 0.02 for r in reference]
    result = compare_logits(reference, close, base_only, "float16")
    assert result.passed and result.top1_agreement == 1.0 and result.tolerance == pytest.approx(0.08)
    far = [reference[0] + torch.tensor([[0.0, 7.0, 0.0]]), reference[1]]
    result = compare_logits(reference, far, base_only, "float16")
    assert not result.passed and result.top1_agreement == 0.5 and result.max_abs_diff == pytest.approx(7.0)


def test_verification_memory_is_one_merged_model_plus_headroom(runs, tmp_path):
    """Verification loads whole models (the merge does not): merge skips it rather than be killed by it."""
    from qlora_kit.merge.verify import memory_for_verification

    out = tmp_path / "merged"
    assert main([str(runs[False]), "--out", str(out), "--dtype", "float32", "--no-verify"]) == 0
    needed, free, where = memory_for_verification(out)
    shards = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert needed == pytest.approx(1.2 * shards) and shards > 0
    assert where == "RAM" and free > 0
