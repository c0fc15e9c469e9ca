"""The report of a run: the table on stdout, JSON and CSV (figures: :mod:`fastseg.bench.plots`; Markdown
tables and comparisons of results files: :mod:`fastseg.bench.markdown`)."""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["Row", "table", "write_csv", "write_json"]


@dataclass
class Row:
    """One (case, dtype, backend) of a run: status, timings, peak memory, throughput and the check."""

    op: str
    case: str
    mode: str
    dtype: str
    backend: str
    status: str  # ok | FAIL | ERROR | skipped
    params: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    check: dict[str, Any] = field(default_factory=dict)
    ref_ms: float | None = None
    ref_iqr_ms: float | None = None
    ref_reps: int | None = None
    ms: float | None = None
    iqr_ms: float | None = None
    reps: int | None = None
    speedup: float | None = None
    ref_peak_MB: float | None = None
    peak_MB: float | None = None
    bytes_moved: int | None = None
    flops: float | None = None
    ref_GBps: float | None = None
    GBps: float | None = None
    pct_copy_bw: float | None = None
    ref_TFLOPs: float | None = None
    TFLOPs: float | None = None
    timing_method: str = ""
    family: str = ""  # the op's family (its module of cases): one figure each
    ref_once: bool = False  # the baseline was timed with a single call (a budgeted run's slowest baselines)
    once: bool = False  # the backend was timed with a single call
    case_s: float | None = None  # wall seconds of the whole case (all its rows), correctness and memory included


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: Sequence[Row], device: torch.device) -> str:
    head = ["op", "case", "dtype", "backend", "ref ms", "ms", "speed-up", "ref peak MB", "peak MB", "rel err", "status"]
    if device.type == "cuda":
        head[9:9] = ["ref GB/s", "GB/s", "%copy", "TFLOP/s"]
    lines = []
    for r in rows:
        speed = "-" if r.speedup is None else f"{r.speedup:.2f}x"
        err = r.check.get("err_vs_fp64")
        cells = [r.op, r.case, r.dtype, r.backend,
                 _fmt(r.ref_ms, ".3f") + ("" if r.ref_iqr_ms is None else f" ±{r.ref_iqr_ms / 2:.3f}"),
                 _fmt(r.ms, ".3f") + ("" if r.iqr_ms is None else f" ±{r.iqr_ms / 2:.3f}"),
                 speed, _fmt(r.ref_peak_MB, ".2f"), _fmt(r.peak_MB, ".2f"),
                 "-" if err is None else f"{err:.1e}", r.status + (f": {r.message[:60]}" if r.message else "")]
        if device.type == "cuda":
            cells[9:9] = [_fmt(r.ref_GBps, ".0f"), _fmt(r.GBps, ".0f"), _fmt(r.pct_copy_bw, ".0f"),
                          _fmt(r.TFLOPs, ".1f")]
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt_line = "  ".join(f"{{:{'<' if i < 4 or i == len(head) - 1 else '>'}{w}}}" for i, w in enumerate(widths))
    out = [fmt_line.format(*head), "  ".join("-" * w for w in widths)]
    out += [fmt_line.format(*c) for c in lines]
    others = sorted({f"; {r.op}: {_baseline_name(r)}" for r in rows if not _baseline_name(r).startswith("_ref")})
    out.append("ms: median ± IQR/2 of one call; speed-up = ref ms / ms (ref = eager PyTorch from "
               f"fastseg.ops._reference, same run; the CSV's baseline column names the others{''.join(others)});"
               "\npeak MB: bytes allocated on top of the live "
               "ones during one call, outputs included; rel err: max|out - fp64 oracle| / max|oracle| (worst output)")
    return "\n".join(out)


_CSV_FIELDS = ["op", "case", "mode", "dtype", "backend", "status", "shape", "baseline", "ref_ms", "ref_iqr_ms",
               "ref_reps", "ms", "iqr_ms", "reps", "speedup", "ref_peak_MB", "peak_MB", "bytes_moved", "flops",
               "ref_GBps", "GBps", "pct_copy_bw", "ref_TFLOPs", "TFLOPs", "max_abs_err", "max_rel_err", "err_vs_fp64",
               "baseline_err_vs_fp64", "limit", "message"]


def _baseline_name(r: Row) -> str:
    """What the case's ``ref`` is: named in its params when not fastseg.ops._reference's eager op."""
    return str(r.params.get("baseline", f"_reference.{r.op}"))


def write_csv(path: Path, rows: Sequence[Row]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            d = dataclasses.asdict(r)
            d.update({k: v for k, v in r.check.items() if k in _CSV_FIELDS})
            d["shape"] = r.params.get("shape", "")
            d["baseline"] = _baseline_name(r)
            w.writerow(d)


def write_json(path: Path, rows: Sequence[Row], **fields: Any) -> None:
    """The results file: schema, creation time, ``fields`` (settings, machine, ...) in order, the rows."""
    result = {
        "schema": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **fields,
        "results": [dataclasses.asdict(r) for r in rows],
    }
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
