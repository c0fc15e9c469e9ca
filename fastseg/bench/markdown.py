"""Markdown from results files: the tables of one run, the per-case ratios between two runs, and the
README's measured tables, regenerated from the committed JSON so that they cannot drift from it.

Command line (``python -m fastseg.bench report ...``)::

    report bench/results/cpu-all.json               # the run's tables (Markdown) on stdout
    report before.json after.json                   # per-case ratios between two runs
    report --update-readme README.md                # rewrite every generated block of the README
    report --check-readme README.md                 # exit 1 if a block differs from its JSON

A README block is delimited by ``<!-- bench:begin <results file> -->`` and ``<!-- bench:end -->``; the
file is relative to the README's folder, and everything between the markers is generated.
Older results files lack some fields (family, commit, ``ref_once``, ``case_s``): they read as unknown.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastseg.bench.cases import family_of

__all__ = [
    "case_table",
    "check_readme",
    "compare",
    "geomean",
    "load_results",
    "report",
    "report_main",
    "run_line",
    "summary_table",
    "update_readme",
]

_BLOCK = re.compile(r"(<!-- bench:begin (?P<file>\S+) -->\n)(?P<body>.*?)(<!-- bench:end -->)", re.DOTALL)
_ROW_DEFAULTS: dict[str, Any] = {
    "params": {}, "message": "", "check": {}, "ref_ms": None, "ms": None, "speedup": None, "ref_peak_MB": None,
    "peak_MB": None, "ref_once": False, "once": False, "case_s": None, "mode": "fwd", "dtype": "fp32",
}
ONCE_MARK = "¹"


def load_results(path: str | Path) -> dict[str, Any]:
    """A results JSON with every field the report reads present (None / empty when an older file lacks it);
    each row gets its ``family`` (from the registry when the file predates the field)."""
    res = json.loads(Path(path).read_text())
    res.setdefault("machine", {})
    res.setdefault("settings", {})
    for key in ("elapsed_s", "loadavg_at_end", "created", "incomplete"):
        res.setdefault(key, None)
    rows = []
    for r in res.get("results", []):
        r = {**_ROW_DEFAULTS, **r}
        r["family"] = r.get("family") or family_of(r["op"])
        rows.append(r)
    res["results"] = rows
    return res


def geomean(values: Sequence[float]) -> float:
    """Geometric mean (the mean of speed-ups that are ratios); nan for no values."""
    vals = [v for v in values if v and v > 0]
    return math.exp(sum(map(math.log, vals)) / len(vals)) if vals else math.nan


def _num(v: float | None) -> str:
    """Three significant digits, no exponent: 2646 / 139.7 / 12.4 / 0.98 / 0.052."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    a = abs(v)
    return f"{v:.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}" if a >= 0.1 else f"{v:.3f}"


def _speed(v: float | None) -> str:
    return "-" if v is None else _num(v) + "×"


def _load(v: Any) -> str:
    return f"{v[0]:.2f}" if isinstance(v, list) and v else "not recorded"


def run_line(res: dict[str, Any]) -> str:
    """One line saying what the run was: machine, threads, dtypes, versions, commit, load, wall time."""
    m, st = res["machine"], res["settings"]
    commit = m.get("git_commit")
    wall = res.get("elapsed_s")
    mode = "full" if st.get("full", True) else f"budgeted, {st.get('case_seconds')} s of timing a case"
    parts = [
        f"{m.get('device_name', '?')} ({st.get('device', m.get('device', '?'))}), {m.get('threads', '?')} threads, "
        f"{'/'.join(st.get('dtypes', ['?']))}, batch {st.get('batch', '?')}",
        f"torch {m.get('torch', '?')}, Triton {m.get('triton') or 'none'}",
        f"commit {'`' + commit[:12] + ('+dirty`' if commit.endswith('+dirty') else '`') if commit else 'not recorded'}",
        f"load average {_load(m.get('loadavg_at_start'))} at start, {_load(res.get('loadavg_at_end'))} at end",
        f"{'?' if wall is None else f'{wall / 60:.1f} min'} wall ({mode})",
        f"{res.get('created') or 'date not recorded'}",
    ]
    out = "Run: " + "; ".join(parts) + "."
    if res.get("incomplete"):
        out += f" Incomplete: {res['incomplete']}."
    return out


def _ok(r: dict[str, Any]) -> bool:
    return r["status"] == "ok" and r["speedup"] is not None


def _ops(rows: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["op"] for r in rows))


def summary_table(res: dict[str, Any]) -> str:
    """Per op and backend: cases, geometric-mean speed-up, the worst and best case, cases slower than eager."""
    rows = [r for r in res["results"] if r["backend"] != "-"]
    lines = ["| op | backend | cases | geo-mean speed-up | worst | best | slower than eager |",
             "| --- | --- | ---: | ---: | --- | --- | ---: |"]
    for op in _ops(rows):
        for b in dict.fromkeys(r["backend"] for r in rows if r["op"] == op):
            mine = [r for r in rows if r["op"] == op and r["backend"] == b]
            ok = [r for r in mine if _ok(r)]
            if not ok:
                lines.append(f"| {op} | {b} | {len(mine)} | - | - | - | - |")
                continue
            lo = min(ok, key=lambda r: r["speedup"])
            hi = max(ok, key=lambda r: r["speedup"])
            slower = sum(r["speedup"] < 1 for r in ok)
            lines.append(f"| {op} | {b} | {len(ok)}{'' if len(ok) == len(mine) else f' of {len(mine)}'} | "
                         f"{_speed(geomean([r['speedup'] for r in ok]))} | {_speed(lo['speedup'])} {lo['case']} | "
                         f"{_speed(hi['speedup'])} {hi['case']} | {slower} |")
    return "\n".join(lines)


def _baseline(r: dict[str, Any]) -> str:
    return str(r["params"].get("baseline", f"_reference.{r['op']}"))


def case_table(res: dict[str, Any]) -> str:
    """One row per case (and dtype / backend when the run has several): times, speed-up, peak memory."""
    rows = [r for r in res["results"] if r["backend"] != "-"]
    many_dtypes = len({r["dtype"] for r in rows}) > 1
    many_backends = len({r["backend"] for r in rows}) > 1
    backend = "fused" if many_backends else next(iter({r["backend"] for r in rows}), "fused")
    head = ["op", "case", "shape"] + (["dtype"] if many_dtypes else []) + (["backend"] if many_backends else [])
    head += ["eager ms", f"{backend} ms", "speed-up", "eager peak MB", f"{backend} peak MB"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * (len(head) - 5) + ["---:"] * 5) + " |"]
    for r in rows:
        cells = [r["op"], r["case"], str(r["params"].get("shape", "")).replace("|", "/")]
        cells += ([r["dtype"]] if many_dtypes else []) + ([r["backend"]] if many_backends else [])
        if r["status"] != "ok":
            cells += ["-", "-", r["status"], "-", "-"]
        else:
            cells += [_num(r["ref_ms"]) + (ONCE_MARK if r["ref_once"] else ""),
                      _num(r["ms"]) + (ONCE_MARK if r["once"] else ""), _speed(r["speedup"]),
                      _num(r["ref_peak_MB"]), _num(r["peak_MB"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _notes(res: dict[str, Any]) -> str:
    rows = res["results"]
    notes = []
    # A case's params name its baseline when it is not the op's own eager composition (named as the op, or
    # "reference", by some case modules).
    others = {op: sorted({_baseline(r) for r in rows if r["op"] == op} - {f"_reference.{op}", op, "reference"})
              for op in _ops(rows)}
    others = {op: b for op, b in others.items() if b}
    if others:
        notes.append("Eager baseline `fastseg.ops._reference` unless named: "
                     + "; ".join(f"{op}: {', '.join(b)}" for op, b in others.items()) + ".")
    if any(r["ref_once"] or r["once"] for r in rows):
        notes.append(f"{ONCE_MARK} timed with a single call (its share of the budgeted run's time per case "
                     "allowed no more; `--full` times it repeatedly).")
    notes.append("ms: median of one call; speed-up = eager ms / fused ms, same run; peak MB: allocated on top "
                 "of the live tensors during one call, outputs included.")
    return "\n".join(notes)


def report(res: dict[str, Any]) -> str:
    """The Markdown of one run: what it was, the per-op summary, the per-case table, notes."""
    return "\n\n".join([run_line(res), summary_table(res), case_table(res), _notes(res)]) + "\n"


def compare(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str] = ("A", "B")) -> str:
    """Per-case ratios between two runs (before / after a change, CPU / GPU): cases of the same op, name,
    dtype and shape are paired, backend by backend where both runs have it, else each run's fastest backend."""
    def best(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return min(rows, key=lambda r: r["ms"])

    def index(res: dict[str, Any]) -> dict[tuple[str, ...], list[dict[str, Any]]]:
        # The shape is part of the key: a budgeted run's model rows (smaller input) never pair with --full's.
        out: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for r in res["results"]:
            if r["status"] == "ok" and r["ms"]:
                out.setdefault((r["op"], r["case"], r["dtype"], str(r["params"].get("shape", ""))), []).append(r)
        return out

    ia, ib = index(a), index(b)
    na, nb = names
    lines = [f"{na}: {run_line(a)}", f"{nb}: {run_line(b)}", "",
             f"| op | case | dtype | {na} backend | {nb} backend | {na} ms | {nb} ms | {nb}/{na} time | "
             f"{na} speed-up | {nb} speed-up | {na} eager ms | {nb} eager ms | {nb}/{na} eager |",
             "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    ratios = []
    for key in [k for k in ia if k in ib]:
        ra, rb = ia[key], ib[key]
        common = [x for x in dict.fromkeys(r["backend"] for r in ra) if x in {r["backend"] for r in rb}]
        pairs = ([(next(r for r in ra if r["backend"] == x), next(r for r in rb if r["backend"] == x)) for x in common]
                 or [(best(ra), best(rb))])
        for x, y in pairs:
            t = y["ms"] / x["ms"]
            ratios.append(t)
            eager = y["ref_ms"] / x["ref_ms"] if x["ref_ms"] and y["ref_ms"] else None
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {x['backend']} | {y['backend']} | {_num(x['ms'])} | "
                         f"{_num(y['ms'])} | {_num(t)} | {_speed(x['speedup'])} | {_speed(y['speedup'])} | "
                         f"{_num(x['ref_ms'])} | {_num(y['ref_ms'])} | {_num(eager)} |")
    only = len(set(ia) ^ set(ib))
    lines += ["", f"{len(ratios)} paired rows; geometric mean of {nb}/{na} time {_num(geomean(ratios))} "
                  f"(below 1: {nb} faster); {only} cases in one run only."]
    return "\n".join(lines) + "\n"


def _block(file: str, base: Path) -> str:
    return (f"<!-- Generated from {file} by `python -m fastseg.bench report --update-readme`; "
            "edit the JSON's run, not this. -->\n" + report(load_results(base / file)))


def update_readme(text: str, base: Path) -> str:
    """``text`` with every ``bench:begin`` / ``bench:end`` block regenerated from its JSON (relative to
    ``base``)."""
    return _BLOCK.sub(lambda m: m.group(1) + _block(m.group("file"), base) + m.group(4), text)


def check_readme(path: str | Path) -> list[str]:
    """The results files whose README block differs from what they generate (empty: all up to date)."""
    path = Path(path)
    text = path.read_text()
    return [m.group("file") for m in _BLOCK.finditer(text) if m.group("body") != _block(m.group("file"), path.parent)]


def report_main(argv: Sequence[str]) -> int:
    """``python -m fastseg.bench report``: see the module docstring. Returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m fastseg.bench report",
                                description="Markdown tables of a results JSON, or the ratios between two")
    p.add_argument("files", nargs="*", help="one results JSON (its tables) or two (per-case ratios B / A)")
    p.add_argument("--update-readme", metavar="README", help="regenerate the README's bench:begin/end blocks")
    p.add_argument("--check-readme", metavar="README", help="exit 1 if a README block differs from its JSON")
    p.add_argument("--out", help="write the Markdown to this file instead of stdout")
    args = p.parse_args(argv)
    if args.update_readme:
        path = Path(args.update_readme)
        path.write_text(update_readme(path.read_text(), path.parent))
        print(f"updated {len(_BLOCK.findall(path.read_text()))} generated blocks of {path}")
        return 0
    if args.check_readme:
        stale = check_readme(args.check_readme)
        for f in stale:
            print(f"{args.check_readme}: the block of {f} differs from what {f} generates", file=sys.stderr)
        return 1 if stale else 0
    if len(args.files) not in (1, 2):
        p.error("give one results JSON (its tables) or two (per-case ratios)")
    res = [load_results(f) for f in args.files]
    stems = tuple(Path(f).stem for f in args.files)
    names = stems if len(set(stems)) == len(stems) else ("A", "B")  # same file names: A (first) and B
    text = report(res[0]) if len(res) == 1 else compare(res[0], res[1], names)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text, end="")
    return 0
