"""Figures of a results file: one per op family (and one for the model rows) and a summary.

A family's figure has two panels sharing the case names (one line each, so that long names fit):
speed-up over eager and peak memory over eager's, both on log axes with bars growing from the 1× line,
one bar per backend per case; a bar on the losing side (slower, or more memory) is red / orange. The
summary has, per op and backend, the geometric-mean speed-up (bar) and the worst case (marker), so that
"never slower than eager" is checked in one glance. Matplotlib is optional: without it
:func:`plot_results` says why and draws nothing.

Example::

    from fastseg.bench.markdown import load_results
    paths, why = plot_results(load_results("bench/results/cpu-all.json"), Path("/tmp"), "cpu-all")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastseg.bench.markdown import ONCE_MARK, geomean

__all__ = ["plot_results"]

_COLOURS = ["#3b75af", "#519e3e", "#8d69b8", "#84584e"]  # per backend: winning bars
_HATCHES = ["", "//", "..", "xx"]
_SLOWER, _MORE_MEMORY = "#d62728", "#ef8636"


def _label(r: dict[str, Any], several_ops: bool, several_dtypes: bool) -> str:
    return (f"{r['op']}: " if several_ops else "") + r["case"] + (f" [{r['dtype']}]" if several_dtypes else "")


def _limits(values: Sequence[float]) -> tuple[float, float]:
    """Log-axis limits around the values and 1, with room for the labels."""
    vals = [v for v in values if v and v > 0] + [1.0]
    return min(vals) / 1.6, max(vals) * 2.2


def _log_axis(ax: Any, values: Sequence[float], label: str) -> None:
    """Log x axis around ``values`` and 1 with ticks at 1, 2, 5 x 10^k written plainly, the 1x line marked."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.set_xlim(*_limits(values))
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xlabel(label)
    ax.grid(axis="x", which="major", alpha=0.3)


def _bars(ax: Any, ys: Sequence[float], values: Sequence[float | None], height: float, colour: str, worse: str,
          hatch: str, lower_is_better: bool) -> None:
    """Bars from 1 to each value (log x): the losing side in ``worse``."""
    for y, v in zip(ys, values, strict=True):
        if not v or v <= 0:
            continue
        loses = v > 1 if lower_is_better else v < 1
        ax.barh(y, v - 1, height, left=1, color=worse if loses else colour, hatch=hatch, edgecolor="white",
                linewidth=0.4)


def _family_figure(plt: Any, rows: list[dict[str, Any]], title: str, path: Path) -> None:
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    several_ops = len({r["op"] for r in rows}) > 1
    several_dtypes = len({r["dtype"] for r in rows}) > 1
    groups = list(dict.fromkeys(_label(r, several_ops, several_dtypes) for r in rows))
    data = {(_label(r, several_ops, several_dtypes), r["backend"]): r for r in rows}
    from matplotlib.patches import Patch

    height = 0.8 / len(backends)
    handles = [Patch(facecolor=_COLOURS[j % len(_COLOURS)], hatch=_HATCHES[j % len(_HATCHES)], label=b)
               for j, b in enumerate(backends)] + [Patch(facecolor=_SLOWER, label="slower than eager")]
    fig_h = 1.6 + 0.24 * len(groups) * len(backends)
    fig, (ax_s, ax_m) = plt.subplots(1, 2, figsize=(13, fig_h), sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    speed_all, mem_all = [], []
    for j, b in enumerate(backends):
        ys = [g - 0.4 + height * (j + 0.5) for g in range(len(groups))]
        rs = [data.get((g, b)) for g in groups]
        speed = [r["speedup"] if r and r["status"] == "ok" else None for r in rs]
        mem = [r["peak_MB"] / r["ref_peak_MB"] if r and r["status"] == "ok" and r["peak_MB"] is not None
               and r["ref_peak_MB"] else None for r in rs]
        speed_all += [v for v in speed if v]
        mem_all += [v for v in mem if v]
        colour, hatch = _COLOURS[j % len(_COLOURS)], _HATCHES[j % len(_HATCHES)]
        _bars(ax_s, ys, speed, height, colour, _SLOWER, hatch, lower_is_better=False)
        _bars(ax_m, ys, mem, height, colour, _MORE_MEMORY, hatch, lower_is_better=True)
        for y, v in zip(ys, mem, strict=True):  # the ratio written at the bar's end (an equal peak has no bar)
            if v:
                ax_m.annotate(f"{v:.2g}×", (v, y), xytext=(3 if v >= 1 else -3, 0), textcoords="offset points",
                              ha="left" if v >= 1 else "right", va="center", fontsize=7)
        for y, r, v in zip(ys, rs, speed, strict=True):
            if r is None:
                continue
            if v is None:
                ax_s.annotate(r["status"], (1, y), xytext=(3, 0), textcoords="offset points", va="center",
                              fontsize=7, color=_SLOWER)
                continue
            once = ONCE_MARK if r["ref_once"] or r["once"] else ""
            ax_s.annotate(f"{v:.2f}×{once}", (v, y), xytext=(3 if v >= 1 else -3, 0), textcoords="offset points",
                          ha="left" if v >= 1 else "right", va="center", fontsize=7)
    _log_axis(ax_s, speed_all, "speed-up over eager PyTorch (log)")
    _log_axis(ax_m, mem_all, "peak memory / eager's (log; orange: more)")
    ax_s.set_yticks(range(len(groups)))
    ax_s.set_yticklabels(groups, fontsize=8)
    ax_s.set_ylim(len(groups) - 0.5, -0.5)  # first case on top
    ax_s.legend(handles=handles, fontsize=7, loc="lower right")
    if any(r["ref_once"] or r["once"] for r in rows):
        title += f"\n{ONCE_MARK} timed with a single call (budgeted run)"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _summary_figure(plt: Any, rows: list[dict[str, Any]], title: str, path: Path) -> None:
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    ops = list(dict.fromkeys(r["op"] for r in rows))
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    height = 0.8 / len(backends)
    handles = [Patch(facecolor=_COLOURS[j % len(_COLOURS)], hatch=_HATCHES[j % len(_HATCHES)],
                     label=f"{b}: geo-mean") for j, b in enumerate(backends)]
    handles.append(Line2D([], [], marker="D", color="black", linestyle="",
                          label="worst case (red: slower than eager)"))
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.32 * len(ops) * len(backends)))
    vals = []
    for j, b in enumerate(backends):
        for i, op in enumerate(ops):
            sp = [r["speedup"] for r in rows if r["op"] == op and r["backend"] == b and r["status"] == "ok"
                  and r["speedup"]]
            if not sp:
                continue
            y = i - 0.4 + height * (j + 0.5)
            g, worst = geomean(sp), min(sp)
            vals += [g, worst, max(sp)]
            _bars(ax, [y], [g], height, _COLOURS[j % len(_COLOURS)], _SLOWER, _HATCHES[j % len(_HATCHES)], False)
            ax.plot([worst], [y], marker="D", color=_SLOWER if worst < 1 else "black", markersize=5)
            ax.annotate(f"{g:.2f}× (worst {worst:.2f}×, {len(sp)} cases)", (max(g, worst, 1.0), y), xytext=(4, 0),
                        textcoords="offset points", va="center", fontsize=7)
    _log_axis(ax, vals + [max(vals, default=1.0) * 4], "speed-up over eager PyTorch (log)")
    ax.set_yticks(range(len(ops)))
    ax.set_yticklabels(ops, fontsize=9)
    ax.set_ylim(len(ops) - 0.5, -0.5)
    ax.legend(handles=handles, fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_results(res: dict[str, Any], out_dir: Path, stem: str) -> tuple[list[Path], str | None]:
    """``<stem>-<family>.png`` per op family (the model rows: ``<stem>-models.png``) and
    ``<stem>-summary.png`` from a loaded results file (:func:`fastseg.bench.markdown.load_results`).
    Returns the paths written and, when none, why."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return [], f"matplotlib unavailable ({e}); the results JSON and CSV are complete without it"
    rows = [r for r in res["results"] if r["backend"] != "-"]
    if not rows:
        return [], "nothing to plot"
    m = res["machine"]
    load = m.get("loadavg_at_start")
    run = (f"{m.get('device_name', '?')}, torch {m.get('torch', '?')}, batch {res['settings'].get('batch', '?')}, "
           f"load {load[0]:.1f}" if load else f"{m.get('device_name', '?')}")
    paths = []
    for family in dict.fromkeys(r["family"] for r in rows):
        path = out_dir / f"{stem}-{family}.png"
        _family_figure(plt, [r for r in rows if r["family"] == family], f"{family}: fastseg vs eager ({run})", path)
        paths.append(path)
    path = out_dir / f"{stem}-summary.png"
    _summary_figure(plt, rows, f"per op: geo-mean and worst speed-up over eager ({run})", path)
    paths.append(path)
    return paths, None if paths else "nothing to plot"
