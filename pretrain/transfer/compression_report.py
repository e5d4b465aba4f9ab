"""The comparison report's compression part: a table of every row compressed (the
distilled rows and each post-training technique) with its size, speed and retained score,
and a plot of score against bytes on disk (`pretrain.transfer.compression`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pretrain.transfer.compression import DISTILLED

PLOT = "compression.png"
Results = Mapping[str, Mapping[str, Mapping[str, Any]]]  # row -> column -> downstream summary


def _teacher_of(row: str) -> str | None:
    """The row a distilled row was distilled from, or None."""
    suffix = DISTILLED.format(row="")
    return row[: -len(suffix)] if row.endswith(suffix) else None


def entries(results: Results) -> list[dict[str, Any]]:
    """One entry per (row, variant, column): the row's own model ('none'), each post-training
    technique of it, and (for a distilled row) 'distil' with its teacher as reference; each
    with parameters, bytes, tokens/s (where measured), its test mean ± std and the retained
    fraction of the uncompressed reference (mean ± std over seeds)."""
    out = []
    for row, columns in results.items():
        teacher = _teacher_of(row)
        if teacher is None and not any("compressed" in summary for summary in columns.values()):
            continue  # a row nothing compressed (the random-init control)
        for column, summary in columns.items():
            metric = summary["metric"]
            test = summary["test"][metric]
            compressed = summary.get("compressed", {})
            own = {"row": teacher or row, "variant": "distil" if teacher else "none", "column": column,
                   "metric": metric, "test": test, **{k: compressed.get("none", {}).get(k) for k in
                                                      ("parameters", "bytes", "tokens_per_second")}}
            if teacher is not None and column in results.get(teacher, {}):
                reference = results[teacher][column]["test"][metric]["per_seed"]
                base = np.asarray(reference, np.float64)
                ratios = np.asarray(test["per_seed"], np.float64) / np.where(base != 0, base, np.nan)
                own["retained"] = {"mean": float(ratios.mean()),
                                   "std": float(ratios.std(ddof=1)) if len(ratios) > 1 else 0.0}
            out.append(own)
            for technique, entry in compressed.items():
                if technique == "none":
                    continue
                out.append({"row": teacher or row, "variant": technique if not teacher else f"distil+{technique}",
                            "column": column, "metric": metric, "test": entry["test"],
                            "retained": entry["retained"], "parameters": entry["parameters"],
                            "bytes": entry["bytes"], "tokens_per_second": entry["tokens_per_second"]})
    return out


def _number(value: float | None, form: str) -> str:
    return "n/a" if value is None else format(value, form)


def table(results: Results) -> str:
    """The compression table (markdown), rows grouped by the row they compress."""
    found = entries(results)
    if not any(e["variant"] != "none" for e in found):
        return ""
    lines = ["| row | variant | column | parameters | bytes on disk | inference tokens/s | test (mean ± std) | "
             "retained (mean ± std) |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for e in sorted(found, key=lambda e: (e["row"], e["column"], e["variant"] != "none", e["variant"])):
        retained = e.get("retained")
        lines.append(
            f"| {e['row']} | {e['variant']} | {e['column']} | {_number(e['parameters'], ',')} | "
            f"{_number(e['bytes'], ',')} | {_number(e['tokens_per_second'], ',.0f')} | "
            f"{e['test']['mean']:.3f} ± {e['test']['std']:.3f} | "
            + (f"{retained['mean']:.1%} ± {retained['std']:.1%}" if retained else "—") + " |")
    return "\n".join(lines)


def caption() -> str:
    return ("Each fine-tuned model (the dev-selected step of every seed at the cell's chosen rate) scored on test "
            "again compressed: int8_weights (weights and embeddings int8 with a float32 scale per output channel), "
            "int8 (also the blocks' matmul inputs, per token), prune (attention heads removed by Michel et al.'s "
            "importance, iteratively), distil (a student of half the layers, distilled as DistilBERT, fine-tuned "
            "like a row; its retained fraction is against its teacher's row). Retained: compressed / uncompressed "
            "test score per seed, then mean ± std. Parameters and bytes (safetensors: int8 values with float32 "
            "scales, else float32) of the whole fine-tuned model; tokens/s: its forward pass on one test batch on "
            "this machine, as the variant runs here (XLA CPU has no int8 matmul kernel: the int8 variants "
            "dequantize, so their speed is float's or slower; their gain is memory).")


def plot(results: Results, path: str) -> None:
    """Test score against bytes on disk (log x) for every row and variant, one panel per column."""
    found = [e for e in entries(results) if e["bytes"] is not None]
    columns = list(dict.fromkeys(e["column"] for e in found))
    if not columns:
        return
    figure = Figure(figsize=(5.0 * min(2, len(columns)), 3.8 * ((len(columns) + 1) // 2)), dpi=120)
    FigureCanvasAgg(figure)
    for index, column in enumerate(columns):
        axes = figure.add_subplot((len(columns) + 1) // 2, min(2, len(columns)), index + 1)
        for row in dict.fromkeys(e["row"] for e in found if e["column"] == column):
            mine = sorted((e for e in found if e["column"] == column and e["row"] == row), key=lambda e: e["bytes"])
            x = [e["bytes"] for e in mine]
            y = [e["test"]["mean"] for e in mine]
            line = axes.plot(x, y, marker="o", linestyle="none", label=row)[0]
            axes.errorbar(x, y, yerr=[e["test"]["std"] for e in mine], fmt="none", color=line.get_color(),
                          capsize=2)
            for e in mine:
                axes.annotate(e["variant"], (e["bytes"], e["test"]["mean"]), fontsize=6, xytext=(3, 3),
                              textcoords="offset points")
        axes.set_xscale("log")
        axes.set_xlabel("bytes on disk")
        axes.set_ylabel(f"test {found[0]['metric']}")
        axes.set_title(column, fontsize=9)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
