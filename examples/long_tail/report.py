"""Tables, CSV files and plots of the long-tail demo and its multi-seed, multi-skew study."""

from __future__ import annotations

import csv
import math
import os
from typing import List, Sequence

__all__ = ["METRICS", "MARGIN_KEYS", "skew_order", "read_rows", "aggregate", "format_table", "write_rows", "paired_gains", "format_gains",
           "write_plot", "write_study_plot"]

METRICS = ("tar@far=1e-3", "tar@far=1e-2", "tail_acc", "mid_acc", "head_acc", "all_acc", "gap", "class_acc_std")
MARGIN_KEYS = ("margin_head", "margin_mid", "margin_tail", "margin_size_spearman")
ROW_KEYS = ("skew", "method", "seed") + METRICS + MARGIN_KEYS + ("train_s",)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    mean = sum(vals) / len(vals)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))


def aggregate(rows: List[dict]) -> List[dict]:
    """Per (skew, method), in first-seen order: mean and population std over seeds."""
    out = []
    for key in dict.fromkeys((r.get("skew", ""), r["method"]) for r in rows):
        rs = [r for r in rows if (r.get("skew", ""), r["method"]) == key]
        agg = {"skew": key[0], "method": key[1], "seeds": len(rs)}
        for k in METRICS + MARGIN_KEYS + ("train_s",):
            agg[k], agg[k + "_std"] = _mean_std([float(r.get(k, float("nan"))) for r in rs])
        out.append(agg)
    return out


def format_table(summary: List[dict]) -> str:
    """Markdown table of the means (± std over seeds when there are several)."""
    header = ["method", "TAR@1e-3", "TAR@1e-2", "tail acc", "mid acc", "head acc", "all acc", "head−tail gap",
              "per-class acc std", "train s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in summary:
        cells = [r["method"]]
        for k in METRICS:
            cells.append(f"{r[k]:.3f}" + (f" ± {r[k + '_std']:.3f}" if r["seeds"] > 1 else ""))
        cells.append(f"{r['train_s']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_margins(summary: List[dict]) -> str:
    """Markdown table of the final margins per third of the heads whose margins differ per class."""
    lines = ["| method | margin head third | middle | tail third | Spearman(class size, margin) |", "|---|---|---|---|---|"]
    for r in summary:
        if not math.isnan(r["margin_head"]):
            lines.append(f"| {r['method']} | {r['margin_head']:.3f} | {r['margin_mid']:.3f} | {r['margin_tail']:.3f} | "
                         f"{r['margin_size_spearman']:+.2f} |")
    return "\n".join(lines)


def write_rows(rows: List[dict], path: str) -> None:
    """One CSV row per (skew, method, seed); empty cells where a metric does not apply."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(ROW_KEYS)
        for r in rows:
            cells = []
            for k in ROW_KEYS:
                v = r.get(k, "")
                cells.append(f"{v:.4f}" if isinstance(v, float) and not math.isnan(v) else ("" if isinstance(v, float) else v))
            w.writerow(cells)


def read_rows(path: str) -> List[dict]:
    """Rows written by ``write_rows``: metrics as floats (NaN where empty), seed as int."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["seed"] = int(r["seed"])
        for k in METRICS + MARGIN_KEYS + ("train_s",):
            r[k] = float(r[k]) if r.get(k) not in (None, "") else float("nan")
    return rows


def paired_gains(rows: List[dict], reference: str, metrics=("tail_acc", "gap", "tar@far=1e-3", "all_acc")) -> List[dict]:
    """Per (skew, method ≠ reference): mean ± std over seeds of (method − reference) on the same
    seed, and in how many seeds the method is better (higher; lower for the gap)."""
    out = []
    by_key = {(r["skew"], r["method"], r["seed"]): r for r in rows}
    for skew, method in dict.fromkeys((r["skew"], r["method"]) for r in rows):
        if method == reference:
            continue
        seeds = [s for (k, m, s) in by_key if k == skew and m == method and (skew, reference, s) in by_key]
        if not seeds:
            continue
        g = {"skew": skew, "method": method, "seeds": len(seeds)}
        for k in metrics:
            diffs = [float(by_key[(skew, method, s)][k]) - float(by_key[(skew, reference, s)][k]) for s in seeds]
            g[k], g[k + "_std"] = _mean_std(diffs)
            g[k + "_wins"] = sum((d < 0) if k == "gap" else (d > 0) for d in diffs)
        out.append(g)
    return out


def format_gains(gains: List[dict], reference: str) -> str:
    header = ["skew", "method", "Δ tail acc", "Δ gap", "Δ TAR@1e-3", "Δ all acc"]
    lines = [f"Paired differences against {reference} (same seed), mean ± std, (seeds better / seeds):", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for g in gains:
        cells = [str(g["skew"]), g["method"]]
        for k in ("tail_acc", "gap", "tar@far=1e-3", "all_acc"):
            cells.append(f"{g[k]:+.3f} ± {g[k + '_std']:.3f} ({g[k + '_wins']}/{g['seeds']})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def skew_order(skews) -> List[str]:
    """Distinct skews, the balanced control first, then Zipf exponents ascending."""
    return sorted(dict.fromkeys(skews), key=lambda k: -1.0 if k == "balanced" else float(k))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plot(summary: List[dict], path: str, title: str) -> None:
    """Bars: TAR@1e-3 and head/mid/tail accuracy per method; beside them, the adaptive heads'
    final margins per third."""
    plt = _pyplot()
    adaptive = [r for r in summary if not math.isnan(r["margin_head"])]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [2.2, 1]})
    metrics = [("tar@far=1e-3", "TAR@FAR=1e-3 (unseen ids)"), ("head_acc", "head-third acc"), ("mid_acc", "middle acc"),
               ("tail_acc", "tail-third acc")]
    width = 0.8 / len(metrics)
    ax = axes[0]
    for j, (key, label) in enumerate(metrics):
        xs = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(summary))]
        errs = [r[key + "_std"] for r in summary]
        ax.bar(xs, [r[key] for r in summary], width, yerr=errs if any(e > 0 for e in errs) else None, capsize=2, label=label)
    ax.set_xticks(range(len(summary)))
    ax.set_xticklabels([r["method"] for r in summary], rotation=20, fontsize=8)
    ax.set_ylim(min([0.3] + [r[k] - 0.05 for r in summary for k, _ in metrics]), 1.02)
    ax.set_ylabel("fraction")
    ax.legend(loc="lower left", fontsize=7, ncol=2)
    ax.set_title(title, fontsize=9)
    ax = axes[1]
    for r in adaptive:
        ax.plot([0, 1, 2], [r["margin_head"], r["margin_mid"], r["margin_tail"]], marker="o", label=r["method"])
    ax.set_xticks([0, 1, 2])
    ax.set_xticklabels(["head third", "middle", "tail third"])
    ax.set_ylim(0.1, 0.5)
    ax.set_ylabel("mean final margin")
    ax.set_title("final margins by class size", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_study_plot(summary: List[dict], gains: List[dict], reference: str, path: str) -> None:
    """Three panels over skews: Δ tail accuracy and Δ TAR against ``reference``; the adaptive
    heads' final margins per third at each skew."""
    plt = _pyplot()
    skews = skew_order(g["skew"] for g in gains)
    methods = list(dict.fromkeys(g["method"] for g in gains))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for ax, key, label in ((axes[0], "tail_acc", "Δ tail-third accuracy"), (axes[1], "tar@far=1e-3", "Δ TAR@FAR=1e-3")):
        for i, m in enumerate(methods):
            pts = [next((g for g in gains if g["skew"] == s and g["method"] == m), None) for s in skews]
            xs = [j + (i - (len(methods) - 1) / 2) * 0.12 for j, p in enumerate(pts) if p]
            ax.errorbar(xs, [p[key] for p in pts if p], yerr=[p[key + "_std"] for p in pts if p], fmt="o", capsize=3, label=m)
        ax.axhline(0.0, color="gray", lw=0.8)
        ax.set_xticks(range(len(skews)))
        ax.set_xticklabels([s if s == "balanced" else f"zipf {s}" for s in skews])
        ax.set_title(f"{label} vs {reference} (mean ± std over seeds)", fontsize=9)
    axes[0].legend(fontsize=7)
    ax = axes[2]
    adaptive = [m for m in dict.fromkeys(r["method"] for r in summary)
                if any(not math.isnan(r["margin_head"]) for r in summary if r["method"] == m)]
    for i, m in enumerate(adaptive):
        rs = [next((r for r in summary if r["skew"] == s and r["method"] == m), None) for s in skews]
        xs = [j + (i - (len(adaptive) - 1) / 2) * 0.15 for j, r in enumerate(rs) if r]
        color = f"C{i}"
        ax.vlines(xs, [r["margin_head"] for r in rs if r], [r["margin_tail"] for r in rs if r], colors=color, lw=1)
        ax.plot(xs, [r["margin_head"] for r in rs if r], "v", color=color, label=m)
        ax.plot(xs, [r["margin_tail"] for r in rs if r], "^", color=color)
    ax.set_xticks(range(len(skews)))
    ax.set_xticklabels([s if s == "balanced" else f"zipf {s}" for s in skews])
    ax.set_ylim(0.1, 0.5)
    ax.set_title("mean final margin: head third (▼) to tail third (▲)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
