"""The Markdown tables of a results document (also one line per finished trial, as it runs)."""

from __future__ import annotations

from qlora_kit.bench.counts import count_table


def _key(record: dict) -> tuple:
    return record["model"], record["setup"], record["kind"], record["length"]


def _mem(gib: float | None) -> str:
    if gib is None:
        return "?"
    return f"{gib:.2f} GiB" if gib >= 0.1 else f"{gib * 1024:.1f} MiB"


def describe(record: dict) -> str:
    head = f"{record['model']} {record['setup']} {record['kind']} {record['length']}: {record['status']}"
    if record["status"] not in ("ok", "oom"):
        return f"{head} - {record.get('error', '')}\n{record.get('log_tail', '')}".rstrip()
    if "peak_reserved_gib" in record:
        parts = [head, f"peak reserved {_mem(record['peak_reserved_gib'])} "
                       f"(planner {_mem(record['planner_reserved_gib'])})"]
    elif record["kind"] == "count":
        parts = [f"{head} ({record['layers']} of {record.get('full_layers', '?')} layers)",
                 f"peak tensors {_mem(record['tensor_peak_gib'])}",
                 f"full depth with the planner's per-layer terms {_mem(record.get('full_depth_planner_terms_gib'))}"]
    elif record.get("tensor_peak_gib"):
        planner = ("" if record["setup"] == "baseline" else  # the planner plans qlora_kit runs
                   f" (planner {_mem(record['planner_allocated_gib'])}, {record['planner_tensor_error']:+.1%})")
        parts = [head, f"peak tensors {_mem(record['tensor_peak_gib'])}{planner}",
                 f"RSS {_mem(record.get('peak_rss_gib'))}"]
    else:
        parts = [head, f"peak RSS {_mem(record.get('peak_rss_gib'))}"]
    if record.get("tokens_per_s"):
        parts.append(f"{record['tokens_per_s']:.0f} tok/s")
    if record.get("losses"):
        parts.append(f"loss {record['losses'][-1]:.3f}")
    parts.append(f"{record.get('wall_s', 0):.0f} s")
    return ", ".join(parts)




def merge_documents(docs: list[dict]) -> dict:
    merged = dict(docs[0])
    merged["trials"] = [r for d in docs for r in d["trials"]]
    merged["longest"] = [e for d in docs for e in d["longest"]]
    return merged


def markdown_tables(doc: dict) -> str:
    device, settings = doc.get("device") or {}, doc["settings"]
    on_gpu = device.get("kind") == "cuda"
    lora = settings["lora"]
    where = (f"{device.get('name', '?')} capped at {settings['budget_gib']} GiB" if on_gpu
             else f"CPU ({device.get('name', '?')}), no cap")
    note = (f"{where}; LoRA r {lora['r']}, alpha {lora['alpha']}, all linear layers; batch 1"
            + ("; tiny smoke models" if settings["smoke"] else ""))
    setups = list(dict.fromkeys(r["setup"] for r in doc["trials"]))
    models = list(dict.fromkeys(r["model"] for r in doc["trials"]))
    lines = []
    if doc["longest"]:
        lines += [f"**Longest trainable sequence** ({note})", "",
                  "| model | " + " | ".join(setups) + " |", "| --- |" + " ---: |" * len(setups)]
        for model in models:
            cells = [_longest_cell(next((e for e in doc["longest"] if (e["model"], e["setup"]) == (model, setup)),
                                        None)) for setup in setups]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines.append("")
    unit = "MiB" if settings["smoke"] else "GiB"
    memory = f"peak reserved {unit}" if on_gpu else f"peak live tensors {unit}"
    lines += count_table(doc["trials"])
    if not any(r["kind"] == "fixed" for r in doc["trials"]):
        return "\n".join(lines)
    lines += [f"**Fixed lengths** ({note}; tokens/s over {settings['steps']} steps after {settings['warmup']} "
              "warm-up steps)", "",
              f"| model | setup | tokens | under the cap | {memory} | planner {unit} | planner error | tokens/s "
              "| vs baseline | loss |", "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lengths = sorted({r["length"] for r in doc["trials"] if r["kind"] == "fixed"})
    for model in models:
        for length in lengths:
            for setup in setups:
                row = _fixed_row(doc["trials"], model, setup, length, on_gpu, unit)
                if row:
                    lines.append("| " + " | ".join(row) + " |")
    lines += ["", "The planner plans qlora_kit runs, so its columns are blank for the baseline (the JSON has its rough "
              "figure)." + ("" if on_gpu else " On a CPU the memory column counts live tensors "
                            "(qlora_kit.plan.tensor_peak) and the planner's figure is its `allocated` estimate for a "
                            "CPU step.")]
    if any(r["kind"] == "uncapped" and r["status"] == "ok" for r in doc["trials"]):
        lines += ["", "† measured without the cap, because this length does not fit under it: what it needs."]
    return "\n".join(lines)


def _longest_cell(entry: dict | None) -> str:
    if entry is None:
        return ""
    planner = f" (planner {entry['planner_longest']:,})" if entry["planner_longest"] else " (planner: none)"
    status = entry.get("status")
    if status == "skipped":
        return f"skipped{planner}"
    prefix = "≥ " if status in ("at_upper_bound", "incomplete") else ""
    suffix = {"incomplete": " (search incomplete)", "none_fit": " (none fit)"}.get(status, "")
    return f"{prefix}{entry.get('longest') or 0:,}{suffix}{planner}"


def _find(trials: list[dict], model: str, setup: str, kind: str, length: int) -> dict | None:
    return next((r for r in trials if _key(r) == (model, setup, kind, length)), None)


def _fixed_row(trials: list[dict], model: str, setup: str, length: int, on_gpu: bool, unit: str) -> list[str] | None:
    """One table row from the capped trial and, when that ran out of memory, the uncapped one."""
    capped = _find(trials, model, setup, "fixed", length)
    if capped is None:
        return None
    verdict = {"ok": "fits" if on_gpu else "ran", "oom": "OOM", "skipped": "OOM (shorter did)"}.get(
        capped["status"], capped["status"])
    measured, mark = capped, ""
    if capped["status"] != "ok":
        measured, mark = _find(trials, model, setup, "uncapped", length), " †"
    scale = 1024 if unit == "MiB" else 1
    figure = "planner_reserved_gib" if on_gpu else "planner_allocated_gib"  # CPU: no allocator slack, no context
    # The planner plans qlora_kit's runs; for the baseline (bf16 adapters, fp32 AdamW) it is only a rough guide.
    planner = None if setup == "baseline" else capped.get(figure, (measured or {}).get(figure))
    cells = [model, setup, f"{length:,}", verdict, "", f"{planner * scale:.2f}" if planner is not None else "",
             "", "", "", ""]
    if measured is None or measured["status"] != "ok":
        return cells
    peak = measured.get("peak_reserved_gib") if on_gpu else measured.get("tensor_peak_gib")
    cells[4] = f"{peak * scale:.2f}{mark}" if peak is not None else ""
    error = measured.get("planner_error" if on_gpu else "planner_tensor_error")
    if error is not None and setup != "baseline":
        cells[6] = f"{error:+.1%}"
    cells[7] = f"{measured['tokens_per_s']:,.0f}{mark}" if measured.get("tokens_per_s") else ""
    base = _find(trials, model, "baseline", "fixed", length)
    if base is not None and base["status"] != "ok":
        base = _find(trials, model, "baseline", "uncapped", length)
    if setup != "baseline" and base and base["status"] == "ok" and measured.get("tokens_per_s"):
        cells[8] = f"{measured['tokens_per_s'] / base['tokens_per_s']:.2f}x"
    cells[9] = f"{measured['losses'][-1]:.3f}" if measured.get("losses") else ""
    return cells
