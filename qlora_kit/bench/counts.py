"""--count: live tensors of a training step at the targets' real shapes on a CPU, and the full-depth figures.

A count trial is a bench trial (real NF4 layers quantized by bitsandbytes on the CPU, real LoRA, two real TRL steps
under bf16 autocast) on a model with the target's real layer dimensions and full vocabulary but only 1 or 2 decoder
layers, counted by qlora_kit.plan.tensor_peak without computing (NoArithmetic: the same allocations, no values). Two
depths give what one more layer adds to the peak, measured: its NF4 weights and norms, its LoRA weights, gradients
and optimizer state, its checkpointed input. The full-depth figure is the 2-layer peak plus the remaining layers at
that measured increment; beside it, the same with the planner's per-layer terms instead (qlora_kit.plan.estimate).
"""

from __future__ import annotations

from qlora_kit.bench.setups import GIB, planner_estimate


def add_full_depth(record: dict, full_config: dict, setup, settings: dict) -> None:
    """The planner's view of the rest of the model: its per-layer increment and the full-depth figure with it."""
    if record.get("status") != "ok" or not record.get("tensor_peak_bytes"):
        return
    layers, full = record["layers"], full_config["num_hidden_layers"]
    shallow = dict(full_config, num_hidden_layers=layers)
    at = {n: planner_estimate(config, setup, record["length"], settings, "cpu").allocated
          for n, config in ((layers, shallow), (full, full_config))}
    record["full_layers"] = full
    record["planner_per_layer_gib"] = round((at[full] - at[layers]) / (full - layers) / GIB, 5) if full > layers else 0
    record["full_depth_planner_terms_gib"] = round((record["tensor_peak_bytes"] + at[full] - at[layers]) / GIB, 4)


def full_depth_rows(trials: list[dict]) -> list[dict]:
    """One row per (model, length, setup) with counts at two depths: the measured increment and the full depth."""
    counted = [r for r in trials if r["kind"] == "count" and r["status"] == "ok" and r.get("tensor_peak_bytes")]
    rows = []
    for key in dict.fromkeys((r["model"], r["length"], r["setup"]) for r in counted):
        depths = {r["layers"]: r for r in counted if (r["model"], r["length"], r["setup"]) == key}
        deep = depths[max(depths)]
        row = {"model": key[0], "length": key[1], "setup": key[2], "layers": sorted(depths),
               "full_layers": deep.get("full_layers"), "peaks_gib": {n: depths[n]["tensor_peak_bytes"] / GIB
                                                                      for n in sorted(depths)},
               "phase": max(deep["tensor_phase_peaks_bytes"], key=deep["tensor_phase_peaks_bytes"].get),
               "planner_per_layer_gib": deep.get("planner_per_layer_gib"),
               "full_depth_planner_terms_gib": deep.get("full_depth_planner_terms_gib")}
        if len(depths) >= 2:
            low = depths[min(depths)]
            step = (deep["tensor_peak_bytes"] - low["tensor_peak_bytes"]) / (deep["layers"] - low["layers"])
            row["measured_per_layer_gib"] = step / GIB
            row["full_depth_gib"] = (deep["tensor_peak_bytes"] + step * (row["full_layers"] - deep["layers"])) / GIB
            # The layer-backward moment alone (what tiled_mlp bounds; on a GPU, where Triton folds the loss tiles in
            # place, it is more often the step's peak than on a CPU).
            low_b, deep_b = (r["tensor_phase_peaks_bytes"].get("backward", 0) for r in (low, deep))
            step_b = (deep_b - low_b) / (deep["layers"] - low["layers"])
            row["full_depth_layer_backward_gib"] = (deep_b + step_b * (row["full_layers"] - deep["layers"])) / GIB
        rows.append(row)
    for row in rows:
        base = next((b for b in rows if (b["model"], b["length"], b["setup"]) == (row["model"], row["length"],
                                                                                 "baseline")), None)
        for figure in ("full_depth_gib", "full_depth_planner_terms_gib"):
            if base and base.get(figure) and row.get(figure):
                row[figure.replace("_gib", "_vs_baseline")] = row[figure] / base[figure]
    return rows


def count_table(trials: list[dict]) -> list[str]:
    rows = full_depth_rows(trials)
    if not rows:
        return []
    depths = sorted({n for row in rows for n in row["layers"]})
    lines = ["**Live tensors of a training step at the real shapes, counted on a CPU** (bf16 autocast, batch 1, two "
             "TRL steps, LoRA r 32 on all linear layers; GiB)", "",
             "| model | tokens | setup | " + " | ".join(f"{n} layer{'s' if n > 1 else ''}, counted" for n in depths)
             + " | + per layer (counted / planner) | full depth | vs baseline | peak at | layer backward, full depth |",
             "| --- | ---: | --- |" + " ---: |" * len(depths) + " ---: | ---: | ---: | --- | ---: |"]
    for row in rows:
        counted = [f"{row['peaks_gib'][n]:.3f}" if n in row["peaks_gib"] else "" for n in depths]
        per_layer = (f"{row['measured_per_layer_gib'] * 1024:.1f} / {row['planner_per_layer_gib'] * 1024:.1f} MiB"
                     if row.get("measured_per_layer_gib") is not None else "")
        full = f"{row['full_depth_gib']:.2f} ({row['full_layers']} layers)" if row.get("full_depth_gib") else ""
        ratio = f"{row['full_depth_vs_baseline']:.3f}x" if row.get("full_depth_vs_baseline") else ""
        lines.append(f"| {row['model']} | {row['length']:,} | {row['setup']} | " + " | ".join(counted)
                     + f" | {per_layer} | {full} | {ratio} | {row['phase']} | "
                     + (f"{row['full_depth_layer_backward_gib']:.2f} |" if row.get("full_depth_layer_backward_gib")
                        else " |"))
    lines += ["", "Full depth: the deepest count plus the remaining layers at the counted per-layer increment (the "
              "planner's per-layer terms give `full_depth_planner_terms_gib` in the JSON). Live tensors only: no CUDA "
              "context, no allocator slack, no Triton loss kernel, nothing moved to host RAM."]
    return lines
