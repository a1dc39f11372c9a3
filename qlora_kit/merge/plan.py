"""The merge plan: what the update is folded into, the NF4 round trip of the base that the run trained against or
the original 16-bit base weights (--into). Decided, and refused for bases that are not 16-bit, before anything is
written.

Why the NF4 round trip is the default for a 4-bit run: the adapter was learnt against those weights, and that model
is the one the run evaluated, sampled and chatted with. Folding the update into the original weights gives a
different model: on SmolLM2-135M it wrote the trained model's greedy text for 17 of 72 tokens, the round trip for
all of them (bench/results/merge-comparison-smollm2.json, docs/merge.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from qlora_kit.errors import UserError
from qlora_kit.merge.checks import check_adapter_fits, check_architecture

if TYPE_CHECKING:
    from qlora_kit.merge.adapter import Adapter
    from qlora_kit.merge.base import Checkpoint

# bitsandbytes' 4-bit block size; transformers' BitsAndBytesConfig (the run's loader) has no knob for it. The round
# trip (shards.nf4_round_trip) quantizes with it, as the run's loader did.
QUANT_BLOCKSIZE = 64


@dataclass
class MergePlan:
    into: str
    """`original` or `dequantized`."""
    chosen: bool = False
    """--into was given (not the run's default)."""
    quant_type: str = ""
    double_quant: bool = False
    round_trip: set[str] = field(default_factory=set)
    """Weights that get the NF4 quantize -> dequantize round trip (dequantized mode, 16-bit base)."""
    prequantized: bool = False

    def describe(self) -> str:
        how = f"--into {self.into}" if self.chosen else "default"
        if self.into == "original":
            return (f"ORIGINAL 16-bit base weights + LoRA update ({how}"
                    f"{'' if self.chosen else ': the run trained LoRA on the 16-bit weights'})")
        if self.prequantized:
            return f"DEQUANTIZED weights of the pre-quantized bitsandbytes 4-bit base + LoRA update ({how})"
        return (f"DEQUANTIZED {self.quant_type.upper()} weights + LoRA update ({how}: the weights the adapter was "
                "trained against, so the merged model is the trained one; --into original for the 16-bit ones): the "
                f"{len(self.round_trip)} Linear weights the run quantized are quantized exactly as it did "
                f"({self.quant_type}, blocksize {QUANT_BLOCKSIZE}, double quant "
                f"{'on' if self.double_quant else 'off'}) and dequantized; embeddings, norms, lm_head and biases "
                "stay original")


def plan_merge(recipe, base: Checkpoint, adapter: Adapter, into: str | None, expected: dict | None) -> MergePlan:
    """`into` None: the run's default, the weights it trained against."""
    check_architecture(base, expected)
    chosen = into is not None
    if not chosen:
        into = "dequantized" if recipe.quant.load_in_4bit or base.quantization else "original"
    plan = MergePlan(into, chosen=chosen)
    quantization = base.quantization
    if quantization:
        method = quantization.get("quant_method", "unknown")
        is_bnb_4bit = method == "bitsandbytes" and quantization.get("load_in_4bit") and base.bnb_states
        if into == "original" or not is_bnb_4bit:
            raise UserError(f"The base at {base.folder} is itself quantized ({method}); merging needs its "
                            "16-bit weights.",
                            hint="Pass --base with the original 16-bit model (the usual fix). A bitsandbytes 4-bit "
                                 "base can instead be merged with --into dequantized.")
        plan.prequantized = True
    elif into == "dequantized":
        if not recipe.quant.load_in_4bit:
            raise UserError("--into dequantized: this run did not quantize its base (quant.load_in_4bit = false).",
                            hint="Merge into the original weights (--into original, the default for such a run): "
                                 "they are what the run trained on.")
        plan.quant_type, plan.double_quant = recipe.quant.quant_type, recipe.quant.double_quant
        plan.round_trip = quantized_weight_names(base, recipe)
    check_adapter_fits(base, adapter)
    return plan


def quantized_weight_names(base: Checkpoint, recipe) -> set[str]:
    """The Linear weights the run's 4-bit loader quantized, found the way transformers decides it (on an empty
    meta-device skeleton): every nn.Linear except the output head, tied weights and keep-in-fp32 modules."""
    import bitsandbytes as bnb
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.quantizers import AutoHfQuantizer

    config = AutoConfig.from_pretrained(base.folder, trust_remote_code=recipe.model.trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    quantizer = AutoHfQuantizer.from_config(BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=recipe.quant.quant_type,
        bnb_4bit_use_double_quant=recipe.quant.double_quant), pre_quantized=False)
    quantizer.preprocess_model(skeleton, device_map={"": "cpu"})
    names = {f"{n}.weight" for n, m in skeleton.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    unmatched = sorted(names - base.tensors.keys())
    if unmatched:
        raise UserError("--into dequantized: the checkpoint's tensor names differ from the model's module names, "
                        f"so the quantized layers cannot be found (e.g. {unmatched[0]}).",
                        hint="Merge into the original weights instead: --into original.")
    return names
