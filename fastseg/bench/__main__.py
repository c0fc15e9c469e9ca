"""``python -m fastseg.bench``: the command line; runs the registered cases (see :mod:`fastseg.bench`)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import fastseg.bench
from fastseg import ops
from fastseg.bench.budget import CASE_SECONDS, Plan, plan_timing, share_s
from fastseg.bench.cases import (DEFAULT_DTYPES, DTYPES, OPS, Case, Outputs, SkipCase, dtype_name, family_of, get_cases,
                                 op_backends)
from fastseg.bench.correctness import ATOL, cast_inputs, check_backend
from fastseg.bench.machine import loadavg, machine_info, measure_ceilings
from fastseg.bench.memory import memory_probe, peak_memory_bytes
from fastseg.bench.markdown import load_results, report_main
from fastseg.bench.plots import plot_results
from fastseg.bench.progress import Progress
from fastseg.bench.report import Row, table, write_csv, write_json
from fastseg.bench.timing import Timing, pool, time_fn, time_once

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INCOMPLETE = 0, 1, 2, 3


class _Stop(BaseException):
    """SIGTERM (e.g. from `timeout`): stop measuring, write what we have."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _usable_backends(op: str, device: torch.device, wanted: Sequence[str] | None) -> tuple[list[str], dict[str, str]]:
    avail = op_backends(op, device)
    status = ops.backend_status(device).get(op, {})
    skipped = {b: why for b, why in status.items() if why != "ok" and b != "reference"}
    out = []
    for b in avail:
        if b == "reference":
            continue
        if b == "triton" and os.environ.get("TRITON_INTERPRET", "0") == "1":
            skipped[b] = "TRITON_INTERPRET=1: the interpreter is a correctness tool, never benchmarked"
            continue
        if wanted and b not in wanted:
            skipped[b] = "not selected (--backends)"
            continue
        out.append(b)
    return out, skipped


def _full_plan(case: Case, args: argparse.Namespace, device: torch.device) -> Plan:
    """Today's exhaustive timing of a case: ``--rounds`` interleaved rounds (CPU) sharing ``--budget`` and
    ``--min-reps``, or the case's own rounds / samples / warm-up (whole models)."""
    rounds = max(1, case.rounds or args.rounds) if device.type == "cpu" else 1
    return Plan(rounds, args.budget / rounds, max(1, math.ceil((case.min_reps or args.min_reps) / rounds)),
                case.warmup)


def _timed(fn: Callable[[], Outputs], device: torch.device) -> tuple[Outputs, float]:
    """``fn()`` and its wall seconds (the estimate the budget plans with)."""
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t


def _measure(fn: Callable[[], Outputs], device: torch.device, plan: Plan) -> Timing:
    if plan.once:
        return time_once(fn, device)
    return time_fn(fn, device, plan.budget_s, plan.min_reps, plan.warmup)


def _bench_case(case: Case, dtype: torch.dtype, device: torch.device, backends: Sequence[str],
                args: argparse.Namespace, log: Callable[[str], None]) -> list[Row]:
    dname = dtype_name(dtype)
    base_row = {"op": case.op, "case": case.label, "mode": case.mode, "dtype": dname, "params": case.params,
                "family": family_of(case.op)}
    rows: list[Row] = []
    against = case.check_against or case.baseline
    grad_ctx = torch.no_grad if case.mode == "fwd" else torch.enable_grad
    try:
        inputs = case.make_inputs(device, dtype)

        def baseline_call() -> Outputs:
            with grad_ctx():
                return case.baseline(inputs)

        with grad_ctx():
            base, est_ref = _timed(lambda: against(inputs), device)
            oracle = against(cast_inputs(inputs, torch.float64)) if not args.no_check else None
        _sync(device)
        if case.check_against is not None:  # the baseline is another model (a peer): its first call
            _, est_ref = _timed(baseline_call, device)
    except SkipCase as e:
        log(f"skipped {case.label} {dname}: {e}")
        return [Row(**base_row, backend=b, status="skipped", message=str(e)) for b in (backends or ["-"])]
    except Exception as e:
        msg = f"baseline failed: {type(e).__name__}: {e}"
        log(f"ERROR {case.label} {dname}: {msg}")
        return [Row(**base_row, backend=b, status="ERROR", message=msg) for b in (backends or ["-"])]
    nbytes = case.bytes_moved(inputs) if case.bytes_moved else None
    flops = case.flops(inputs) if case.flops else None

    # Correctness first, for every backend (its call also gives the estimate the budget plans with).
    checked: list[tuple[str, Callable[[], Outputs]]] = []
    est: dict[str, float] = {}
    for b in backends:
        def call(b: str = b) -> Outputs:
            with grad_ctx():
                return case.run(inputs, b)
        row = Row(**base_row, backend=b, status="ok", bytes_moved=nbytes, flops=flops)
        rows.append(row)
        try:
            out, est[b] = _timed(call, device)
        except Exception as e:
            row.status, row.message = "ERROR", f"{type(e).__name__}: {e}"
            log(f"ERROR {case.label} {dname} {b}: {row.message}")
            continue
        if oracle is not None:
            res = check_backend(case, out, base, oracle, dtype)
            row.check = dataclasses.asdict(res)
            if not res.ok:
                row.status, row.message = "FAIL", res.message
                log(f"CORRECTNESS FAILURE {case.label} {dname} {b}: {res.message}")
                continue
        del out
        checked.append((b, call))
    del base, oracle

    if not backends:  # nothing to compare: still time the baseline
        rows.append(Row(**base_row, backend="-", status="skipped", message="no non-reference backend usable",
                        bytes_moved=nbytes, flops=flops))
    if not checked and backends:
        return rows
    # Timing: each function's plan is the full one (--full, or a GPU) or the most thorough that fits its
    # share of the case's seconds (see fastseg.bench.budget). Baseline and backends alternate round by round
    # (CPU: a shared machine's load then hits all of them alike).
    by_name = {r.backend: r for r in rows}
    full = _full_plan(case, args, device)
    share = None if args.full or device.type != "cpu" else share_s(args.case_seconds, len(checked))
    ref_plan = plan_timing(est_ref, share, full)
    plans = {b: plan_timing(est[b], share, full) for b, _ in checked}
    ref_parts: list[Timing] = []
    parts: dict[str, list[Timing]] = {b: [] for b, _ in checked}
    try:
        for k in range(max([ref_plan.rounds, *(p.rounds for p in plans.values())])):
            if k < ref_plan.rounds:
                ref_parts.append(_measure(baseline_call, device, ref_plan))
            for b, call in list(checked):
                if k >= plans[b].rounds:
                    continue
                try:
                    parts[b].append(_measure(call, device, plans[b]))
                except Exception as e:
                    r = by_name[b]
                    r.status, r.message = "ERROR", f"timing failed: {type(e).__name__}: {e}"
                    log(f"ERROR {case.label} {dname} {b}: {r.message}")
                    checked.remove((b, call))
        ref_t = pool(ref_parts)
        ref_peak = peak_memory_bytes(baseline_call, device) / 2**20
    except Exception as e:
        for r in rows:
            if r.status == "ok":
                r.status, r.message = "ERROR", f"baseline timing failed: {type(e).__name__}: {e}"
        return rows
    for r in rows:
        r.ref_ms, r.ref_iqr_ms, r.ref_peak_MB = ref_t.median_ms, ref_t.iqr_ms, ref_peak
        r.ref_reps, r.ref_once = ref_t.reps, ref_plan.once
        if nbytes:
            r.ref_GBps = nbytes / (ref_t.median_ms * 1e-3) / 1e9
        if flops:
            r.ref_TFLOPs = flops / (ref_t.median_ms * 1e-3) / 1e12
    for b, call in checked:
        r = by_name[b]
        t = pool(parts[b])
        try:
            r.peak_MB = peak_memory_bytes(call, device) / 2**20
        except Exception as e:
            r.status, r.message = "ERROR", f"peak memory failed: {type(e).__name__}: {e}"
            log(f"ERROR {case.label} {dname} {b}: {r.message}")
            continue
        r.ms, r.iqr_ms, r.reps, r.timing_method, r.once = t.median_ms, t.iqr_ms, t.reps, t.method, plans[b].once
        r.speedup = ref_t.median_ms / t.median_ms
        if nbytes:
            r.GBps = nbytes / (t.median_ms * 1e-3) / 1e9
        if flops:
            r.TFLOPs = flops / (t.median_ms * 1e-3) / 1e12
    return rows


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastseg.bench", description=fastseg.bench.__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when a GPU is visible, else cpu")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated ops (default: all: {','.join(OPS)})")
    p.add_argument("--cases", default=None, help="only cases whose name contains one of these comma-separated words")
    p.add_argument("--backends", default=None, help="comma-separated backends (default: every usable one)")
    p.add_argument("--dtype", default=None,
                   help="comma-separated dtypes: fp32,fp16,bf16 (default: fp32 on CPU; fp16,bf16,fp32 on CUDA)")
    p.add_argument("--batch", type=int, default=1, help="batch size of every case (default 1)")
    p.add_argument("--quick", action="store_true", help="the small CI subset, short measurements")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed runs per measurement (default 0.5 on CPU, 0.2 on CUDA; 0.1 with --quick)")
    p.add_argument("--min-reps", type=int, default=5, help="at least this many timed samples (default 5)")
    p.add_argument("--rounds", type=int, default=None,
                   help="CPU: baseline and backends timed alternately in this many rounds (default 3; 1 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks (not recommended)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds for the whole run, shared equally by the ops (time an op leaves unused goes to the "
                        "next); an op's remaining cases are skipped once its share is spent (exit 3; partial results "
                        "written)")
    p.add_argument("--full", action="store_true",
                   help="the exhaustive run: every function timed with --rounds, --budget and --min-reps however "
                        "slow (default on CPU: each case gets --case-seconds of timing, see fastseg.bench.budget)")
    p.add_argument("--case-seconds", type=float, default=CASE_SECONDS,
                   help=f"CPU, without --full: timing seconds per case, shared by the baseline and the backends "
                        f"(default {CASE_SECONDS:g}); slow functions get fewer samples, the slowest a single call")
    p.add_argument("--out", default="bench/out", help="output folder (default bench/out/)")
    p.add_argument("--no-plot", action="store_true", help="skip the figures")
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error(f"--batch must be >= 1, got {args.batch}")
    if args.case_seconds <= 0:
        p.error(f"--case-seconds must be > 0, got {args.case_seconds}")
    if args.budget is not None and args.budget <= 0:
        p.error(f"--budget must be > 0, got {args.budget}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.budget is None:
        args.budget = 0.1 if args.quick else 0.2 if args.device == "cuda" else 0.5
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.quick:
        args.min_reps = min(args.min_reps, 3)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks (or ``report ...``: see :mod:`fastseg.bench.markdown`); see the module docstring.
    Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    args = _parse_args(argv)
    started = time.monotonic()
    shown: list[Progress] = []  # the progress line, once there is one

    def log(msg: str) -> None:
        if shown:
            shown[0].close()  # a terminal's in-place progress line is redrawn after the next case
        print(msg, file=sys.stderr, flush=True)

    dev_name = args.device
    if dev_name == "cuda" and not torch.cuda.is_available():
        log("fastseg.bench: --device cuda but no CUDA GPU is visible")
        return EXIT_USAGE
    device = torch.device(dev_name)
    try:
        dtypes = (tuple(DTYPES[d.strip().lower()] for d in args.dtype.split(",") if d.strip()) if args.dtype
                  else DEFAULT_DTYPES[device.type])
    except KeyError as e:
        log(f"fastseg.bench: unknown dtype {e}; expected one of {sorted(DTYPES)}")
        return EXIT_USAGE
    op_names = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in op_names if o not in OPS]
    if unknown:
        log(f"fastseg.bench: no benchmark cases for {unknown}; known: {sorted(OPS)}")
        return EXIT_USAGE
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted_backends = [b.strip() for b in args.backends.split(",")] if args.backends else None
    words = [w.strip() for w in args.cases.split(",")] if args.cases else None

    def on_term(signum: int, frame: Any) -> None:
        raise _Stop()

    old_handler = signal.signal(signal.SIGTERM, on_term)
    info = machine_info(device)
    ext = (f"loaded {info['build_info'].get('compiled_backends')}" if info["extension_loaded"]
           else f"not loaded ({info['extension_error']})")
    print(f"fastseg.bench on {info['device_name']} ({device}), torch {torch.__version__}, "
          f"{info['threads']} threads, fastseg._C: {ext}", flush=True)
    load = info["loadavg_at_start"]
    if device.type == "cpu" and load and load[0] > 0.5:
        log(f"warning: the machine is busy (load average {load[0]:.2f} before the run): CPU timings of "
            "this run are unreliable, and penalise the many-small-ops eager baseline most")
    rows: list[Row] = []
    skipped_backends: dict[str, dict[str, str]] = {}
    incomplete = ""
    ceilings: dict[str, Any] = {}
    probe: dict[str, Any] = {}
    try:
        probe = memory_probe(device)
        if not probe.get("ok"):
            log(f"warning: memory probe off: {probe}")
        ceilings = measure_ceilings(device, dtypes, max(args.budget, 0.1))
        if ceilings:
            mm = ", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in ceilings.get("matmul_TFLOPs", {}).items())
            print(f"ceilings: copy {ceilings.get('copy_GBps', float('nan')):.0f} GB/s; matmul TFLOP/s: {mm}",
                  flush=True)
        cut: list[str] = []
        plan: list[tuple[str, list[tuple[Case, torch.dtype]]]] = []
        budgeted = not args.full and device.type == "cpu"
        for op in op_names:
            cases = get_cases(op, batch=args.batch, quick=args.quick)
            if words:
                cases = [c for c in cases if any(w in c.name for w in words)]
            if budgeted:  # cases too big for the budget run on their smaller input
                cases = [c.budget_variant() if c.budget_variant else c for c in cases]
            plan.append((op, [(case, dtype) for case in cases for dtype in dtypes]))
        progress = Progress([op for op, todo in plan for _ in todo], args.case_seconds if budgeted else None)
        shown.append(progress)
        print(f"{progress.total} cases; " + (f"{args.case_seconds:g} s of timing per case (--full: no limit)"
                                             if budgeted else "the full timing of every case"), flush=True)
        for i, (op, todo) in enumerate(plan):
            # With --time-limit every op gets an equal share of the time left (unused time rolls
            # over) and its first case whenever any time is left, so that a slow early op cannot
            # starve the later ones of every measurement.
            op_deadline, left = None, math.inf
            if args.time_limit is not None:
                left = args.time_limit - (time.monotonic() - started)
                op_deadline = time.monotonic() + max(left, 0.0) / (len(op_names) - i)
            backends, skipped = _usable_backends(op, device, wanted_backends)
            skipped_backends[op] = skipped
            for b, why in skipped.items():
                progress.print(f"{op}: backend {b} not benchmarked: {why}")
            for k, (case, dtype) in enumerate(todo):
                if op_deadline is not None and time.monotonic() > op_deadline and (k > 0 or left <= 0):
                    cut.append(f"{op} {k}/{len(todo)}")
                    incomplete = f"time limit of {args.time_limit:g} s; cases run (of all) where cut: {', '.join(cut)}"
                    progress.skip(op, len(todo) - k)
                    progress.print(f"{op}: its share of --time-limit is spent after {k} of {len(todo)} cases")
                    break
                t0 = time.monotonic()
                new = _bench_case(case, dtype, device, backends, args, log)
                case_s = time.monotonic() - t0
                copy_bw = ceilings.get("copy_GBps")
                for r in new:
                    r.case_s = round(case_s, 2)
                    if r.GBps is not None and isinstance(copy_bw, float):
                        r.pct_copy_bw = 100.0 * r.GBps / copy_bw
                rows += new
                summary = ", ".join(f"{r.backend} {r.speedup:.2f}x" if r.speedup else f"{r.backend} {r.status}"
                                    for r in new)
                once = " (eager timed once)" if any(r.ref_once for r in new) else ""
                progress.done(op, case_s, f"  {case.label} [{dtype_name(dtype)}] {case.params.get('shape', '')}: "
                                          f"{summary}{once} ({case_s:.1f} s)")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        progress.close()
    except (_Stop, KeyboardInterrupt):
        incomplete = incomplete or "interrupted (SIGTERM / Ctrl-C)"
        log(f"fastseg.bench: stopped early: {incomplete}; writing partial results")
    finally:
        signal.signal(signal.SIGTERM, old_handler)

    failures = [r for r in rows if r.status in ("FAIL", "ERROR")]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    which = "all" if set(op_names) == set(OPS) else "-".join(op_names)
    stem = f"{device.type}-{which}" + ("-quick" if args.quick else "")
    elapsed_s = round(time.monotonic() - started, 1)
    json_path = out_dir / f"{stem}.json"
    write_json(
        json_path, rows,
        argv=argv,
        settings={"device": str(device), "dtypes": [dtype_name(d) for d in dtypes], "batch": args.batch,
                  "quick": args.quick, "full": args.full or device.type != "cpu",
                  "case_seconds": None if args.full or device.type != "cpu" else args.case_seconds,
                  "budget_s": args.budget, "min_reps": args.min_reps, "rounds": args.rounds,
                  "check": not args.no_check, "atol": {dtype_name(k): v for k, v in ATOL.items()},
                  "baseline": "fastseg.ops._reference (eager PyTorch composition) unless a case's params name "
                              "another"},
        machine=info,
        memory_probe=probe,
        ceilings=ceilings,
        skipped_backends=skipped_backends,
        incomplete=incomplete or None,
        elapsed_s=elapsed_s,
        loadavg_at_end=loadavg(),
    )
    write_csv(out_dir / f"{stem}.csv", rows)
    figures: list[Path] = []
    why_no_plot = "--no-plot"
    if not args.no_plot:
        figures, why_no_plot = plot_results(load_results(json_path), out_dir, stem)
    print()
    print(table(rows, device))
    print()
    print(f"wrote {json_path}, {stem}.csv" + "".join(f", {f.name}" for f in figures)
          + ("" if figures else f" (no figures: {why_no_plot})") + f" in {elapsed_s} s")
    if failures:
        log(f"fastseg.bench: {len(failures)} FAILED: "
            + "; ".join(f"{r.case} {r.dtype} {r.backend}: {r.status} {r.message}" for r in failures))
        return EXIT_FAILED
    if incomplete:
        return EXIT_INCOMPLETE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
