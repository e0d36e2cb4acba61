"""The results plot: time and peak extra memory against C, one line per provider, log scales."""

from __future__ import annotations

import math
from pathlib import Path

from marginkit.bench.config import METHODS

__all__ = ["plot_rows", "plot_labels", "rows_from_csv"]

_STYLE = {
    "marginkit": dict(color="tab:red", marker="o", linewidth=2.4),
    "marginkit-fast": dict(color="tab:pink", marker="D", linewidth=2.0),
    "marginkit-torch": dict(color="tab:orange", marker="o"),
    "torch-textbook": dict(color="tab:blue", marker="s"),
    "torch-compile": dict(color="tab:cyan", marker="s"),
    "pml": dict(color="tab:purple", marker="^"),
    "cce": dict(color="tab:green", marker="v"),
    "liger": dict(color="tab:olive", marker="v"),
    "floor-3gemm": dict(color="black", marker="", linestyle="--"),
}


def _fmt_c(c: int) -> str:
    for div, suf in ((1_000_000, "M"), (1_000, "K")):
        if c >= div and c % (div // 10) == 0:
            v = c / div
            return f"{v:g}{suf}"
    return str(c)


def plot_labels(device: str, date: str) -> tuple:
    """(title, memory_method) for a run on ``device`` (the CSV's device column) on ``date``."""
    if device == "cpu":
        return (f"marginkit bench, cpu, {date}\n(CPU: memory and relative overhead, not GPU speed)",
                "CPU: live tensor bytes (dispatch-mode tracker)")
    return f"marginkit bench, {device}, {date}", "CUDA allocator high-water mark"


def plot_rows(rows, path, title: str = "", memory_method: str = "") -> Path:
    """Write a PNG of ``rows`` (:class:`~marginkit.bench.records.Row`) to ``path``; one pair of panels
    per (B, D, dtype, margin) group. Out-of-memory runs are marked with an ✕ at the top.
    ``memory_method``: how the memory panel was measured (in its title)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    path = Path(path)
    groups = []
    for r in rows:
        key = (r.B, r.D, r.dtype, r.sweep_margin)
        if key not in groups:
            groups.append(key)
    n = max(1, len(groups))
    fig = Figure(figsize=(13, 4.8 * n), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, 2, squeeze=False)
    for gi, key in enumerate(groups or [None]):
        ax_t, ax_m = axes[gi]
        grows = [r for r in rows if key is not None and (r.B, r.D, r.dtype, r.sweep_margin) == key]
        any_mem = False
        for method in METHODS:
            mrows = sorted((r for r in grows if r.method == method), key=lambda r: r.C)
            if not mrows:
                continue
            style = dict(_STYLE.get(method, {}))
            margins = {r.margin for r in mrows}
            label = method if margins == {key[3]} else f"{method} ({'/'.join(sorted(margins))})"
            ok = [r for r in mrows if r.status == "ok" and not math.isnan(r.ms_median)]
            if ok:
                lines = ax_t.plot([r.C for r in ok], [r.ms_median for r in ok], label=label, **style)
                ax_t.fill_between(
                    [r.C for r in ok], [r.ms_p20 for r in ok], [r.ms_p80 for r in ok],
                    color=lines[0].get_color(), alpha=0.15, linewidth=0,
                )
                # the floor's "memory" is its GEMM output buffer, not something to compare against
                mem = [r for r in ok if not math.isnan(r.peak_extra_mib) and method != "floor-3gemm"]
                if mem:
                    any_mem = True
                    ax_m.plot([r.C for r in mem], [max(r.peak_extra_mib, 1e-3) for r in mem], label=label, **style)
            for r in mrows:
                if r.status == "oom":
                    for ax in ((ax_t, ax_m) if method != "floor-3gemm" else (ax_t,)):
                        ax.plot(r.C, 0.97, marker="x", markersize=10, linestyle="",
                                color=style.get("color", "gray"), transform=ax.get_xaxis_transform(),
                                label=None)
        if key is None:
            B = D = dtype = margin = "?"
        else:
            B, D, dtype, margin = key
        sub = f"B={B}, D={D}, {dtype}, {margin}"
        ax_t.set_title(f"{title}\nforward+backward time ({sub})" if title else f"forward+backward time ({sub})")
        ax_t.set_ylabel("ms per step (median, band p20–p80)")
        ax_m.set_title(f"peak extra memory ({sub})" + (f"\n{memory_method}" if memory_method else ""))
        ax_m.set_ylabel("MiB beyond inputs and their gradients")
        for ax in (ax_t, ax_m):
            ax.set_xlabel("C (classes)")
            ax.set_xscale("log")
            ax.grid(True, which="both", alpha=0.3)
        any_oom = any(r.status == "oom" for r in grows)
        if any(r.status == "ok" for r in grows):
            ax_t.set_yscale("log")
            ax_t.legend(fontsize=8, title="✕ = out of memory" if any_oom else None, title_fontsize=8)
        if any_mem:
            ax_m.set_yscale("log")
            ax_m.legend(fontsize=8)
        else:
            ax_m.text(0.5, 0.5, "not measured in these rows",
                      ha="center", va="center", transform=ax_m.transAxes)
            ax_m.set_yticks([])
        cs = sorted({r.C for r in grows})
        if cs:
            for ax in (ax_t, ax_m):
                ax.set_xticks(cs, [_fmt_c(c) for c in cs])
                ax.xaxis.set_minor_formatter(NullFormatter())
                ax.set_xlim(cs[0] / 1.5, cs[-1] * 1.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def rows_from_csv(path):
    """Rows of a results CSV (API.md schema), for re-plotting a file.

    The CSV has no status or sweep-margin column: ``oom``/``error`` in peak_extra_mib
    give the status, and a row whose margin differs from the floor's at its shape (a
    no-margin peer in an ArcFace sweep) is grouped with that floor's margin.
    """
    import csv

    from marginkit.bench.records import Row

    def num(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return math.nan

    rows = []
    with open(path, newline="") as f:
        for rec in csv.DictReader(f):
            peak = rec["peak_extra_mib"]
            status = peak if peak in ("oom", "error") else "ok"
            rows.append(Row(rec["device"], rec["date"], rec["method"], int(rec["B"]), int(rec["D"]), int(rec["C"]),
                            rec["dtype"], rec["margin"], num(rec["ms_median"]), num(rec["ms_p20"]),
                            num(rec["ms_p80"]), num(peak), num(rec["floor_ms"]), sweep_margin=rec["margin"],
                            status=status))
    floors = {}
    for r in rows:
        if r.method == "floor-3gemm":
            floors.setdefault((r.B, r.D, r.C, r.dtype), set()).add(r.margin)
    for r in rows:
        fm = floors.get((r.B, r.D, r.C, r.dtype), set())
        if r.margin not in fm and len(fm) == 1:
            r.sweep_margin = next(iter(fm))
    return rows


def main(argv=None) -> int:
    """python -m marginkit.bench.plot RESULTS.csv [OUT.png]: (re)draw a results file's plot."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m marginkit.bench.plot RESULTS.csv [OUT.png]")
        return 0 if argv else 2
    src = Path(argv[0])
    dst = Path(argv[1]) if len(argv) > 1 else src.with_suffix(".png")
    rows = rows_from_csv(src)
    title, memory_method = plot_labels(rows[0].device, rows[0].date) if rows else ("", "")
    print(f"wrote {plot_rows(rows, dst, title=title, memory_method=memory_method)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
