"""The benchmark harness's own logic: time limit, budget, progress, results files, figures, Markdown and the
README's generated tables (the benchmarks themselves run in `make bench`)."""

import io
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from fastseg.bench import __main__ as cli
from fastseg.bench import budget, markdown, plots, timing
from fastseg.bench.cases import Case
from fastseg.bench.progress import Progress


def test_time_limit_is_shared_by_the_ops(monkeypatch, tmp_path):
    """A slow first op must not starve the later ones: each gets an equal share of the time left and
    its first case while any is left; the run exits 3 and the JSON says which ops were cut. The clock
    is fake (each case takes 0.4 s of it), so the outcome does not depend on the machine's load."""
    clock = [0.0]
    calls = []

    def slow_case(case, dtype, device, backends, args, log):
        calls.append(case.op)
        clock[0] += 0.4
        return []

    monkeypatch.setattr(cli, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(cli, "_bench_case", slow_case)
    monkeypatch.setattr(cli, "memory_probe", lambda device: {"ok": True})
    monkeypatch.setattr(cli, "measure_ceilings", lambda *a: {})
    rc = cli.main(["--device", "cpu", "--ops", "matrix_nms,matrix_nms_boxes", "--time-limit", "1.0",
                   "--no-plot", "--out", str(tmp_path)])
    assert rc == 3
    # matrix_nms (4 cases): share 0.5 s -> cases at 0.0 and 0.4, cut at 0.8; matrix_nms_boxes (2 cases):
    # 0.2 s left -> its first case only, cut at 1.2.
    assert calls == ["matrix_nms", "matrix_nms", "matrix_nms_boxes"]
    result = json.loads((tmp_path / "cpu-matrix_nms-matrix_nms_boxes.json").read_text())
    assert "matrix_nms 2/4" in result["incomplete"] and "matrix_nms_boxes 1/2" in result["incomplete"]


# --- the budget of the default run ---------------------------------------------------------------------

FULL = budget.Plan(rounds=3, budget_s=0.5 / 3, min_reps=2, warmup=2)


@pytest.mark.parametrize("est", [1e-5, 1e-3, 0.02, 0.1, 0.3, 0.7, 1.4, 3.0, 40.0])
def test_plan_fits_its_share_and_degrades_with_the_call_time(est):
    share = 1.5
    plan = budget.plan_timing(est, share, FULL)
    if plan.once:
        assert est > share / 2  # even one untimed + one timed call would not fit
    else:
        assert plan.cost_s(est) <= share * 1.05 + 1e-9
    assert budget.plan_timing(est, None, FULL) == FULL  # --full / GPU: the exhaustive plan, however slow


def test_plan_ladder_order():
    assert budget.plan_timing(0.001, 1.5, FULL).rounds == 3  # fast: every round, a shorter budget
    assert budget.plan_timing(0.4, 1.5, FULL).rounds == 1  # slow: one round
    assert budget.plan_timing(5.0, 1.5, FULL).once  # slowest: one call
    assert budget.share_s(3.0, 2) == 1.0


class _FakeClock:
    """perf_counter / monotonic that only move when a benchmarked function 'runs'."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


def _timed_case(clock, ref_s, fused_s):
    def baseline(inputs):
        clock.sleep(ref_s)
        return inputs["x"] * 2

    def run(inputs, backend):
        clock.sleep(fused_s)
        return inputs["x"] * 2

    return Case("fake_op", "slow_eager", "fwd", {"shape": "3"},
                lambda device, dtype: {"x": torch.arange(3.0, dtype=dtype)}, baseline, run)


@pytest.mark.parametrize("full", [False, True])
def test_budgeted_case_times_a_slow_baseline_once(monkeypatch, full):
    """Fake clock: eager takes 4 s a call, the backend 10 ms. Budgeted: eager timed with a single call
    (marked), the backend still with samples, the timing within the case's seconds; --full: every round."""
    clock = _FakeClock()
    fake_time = types.SimpleNamespace(perf_counter=clock, monotonic=clock)
    monkeypatch.setattr(cli, "time", fake_time)
    monkeypatch.setattr(timing, "time", fake_time)

    def fake_peak(fn, device):
        fn()
        return 2**20

    monkeypatch.setattr(cli, "peak_memory_bytes", fake_peak)
    args = cli._parse_args(["--device", "cpu"] + (["--full"] if full else []))
    case = _timed_case(clock, 4.0, 0.01)
    (row,) = cli._bench_case(case, torch.float32, torch.device("cpu"), ["cpu"], args, print)
    assert row.status == "ok" and row.check["ok"]
    assert row.speedup == pytest.approx(400.0)
    if full:
        assert not row.ref_once and row.ref_reps == 6  # 3 rounds x 2 samples, however slow
        return
    assert row.ref_once and row.ref_reps == 1 and "once" in row.timing_method or row.ref_once
    assert not row.once and row.reps > 1
    # correctness: eager 4 + fp64 oracle 4 + backend 0.01; memory: 4 + 0.01; timing: eager 4 + backend <= 1.5
    assert clock.t <= 4 * 4.0 + 0.02 + budget.share_s(args.case_seconds, 1) + 1e-6


def test_progress_counts_and_estimates_the_time_left():
    clock = _FakeClock()
    out = io.StringIO()
    p = Progress(["a", "a", "b"], case_s=3.0, stream=out, tty=False, clock=clock)
    clock.sleep(2.0)
    p.done("a", 2.0, "case 1")
    assert out.getvalue() == "case 1 [1/3, 2 s elapsed, ~5 s left]\n"  # a: 2 s; b unseen: max(mean 2, budget 3)
    tty = io.StringIO()
    p = Progress(["a", "a"], stream=tty, tty=True, clock=clock)
    p.done("a", 1.0, "case 1")
    assert tty.getvalue().endswith("\r[1/2, 0 s elapsed, ~1 s left]")  # rewritten in place
    p.close()
    assert tty.getvalue().endswith("\r\033[K")


# --- results files: metadata, figures, Markdown, the README ----------------------------------------------

def _row(op, case, speedup, family, **kw):
    r = {"op": op, "case": case, "mode": "fwd", "dtype": "fp32", "backend": "cpu", "status": "ok",
         "params": {"shape": "1x2"}, "ref_ms": 10.0 * (speedup or 1.0), "ms": 10.0, "speedup": speedup,
         "ref_peak_MB": 4.0, "peak_MB": 2.0, "family": family}
    r.update(kw)
    return r


def _results_file(tmp_path, name="r.json", scale=1.0):
    res = {"schema": 1, "created": "2026-01-01T00:00:00+00:00", "settings": {"device": "cpu", "dtypes": ["fp32"],
           "batch": 1, "full": False, "case_seconds": 3.0},
           "machine": {"device_name": "Test CPU", "threads": 2, "torch": "2.x", "triton": "3.x",
                       "git_commit": "0123456789abcdef", "loadavg_at_start": [1.5, 1.0, 1.0]},
           "elapsed_s": 321.0, "loadavg_at_end": [2.0, 1.0, 1.0],
           "results": [_row("separable_conv2d", "aspp", 2.0 * scale, "conv"),
                       _row("separable_conv2d", "exit_flow", 0.5 * scale, "conv", peak_MB=8.0),
                       _row("roi_upsample", "aunet", 100.0 * scale, "roi", ref_once=True),
                       _row("models", "deeplabv3plus", 3.0, "models", backend="fused"),
                       _row("models", "broken", None, "models", backend="fused", status="FAIL", ms=None)]}
    path = tmp_path / name
    path.write_text(json.dumps(res))
    return path


def test_figures_from_a_small_results_file(tmp_path):
    pytest.importorskip("matplotlib", reason="the figures need matplotlib (a test dependency)")
    paths, why = plots.plot_results(markdown.load_results(_results_file(tmp_path)), tmp_path, "r")
    assert why is None
    assert [p.name for p in paths] == ["r-conv.png", "r-roi.png", "r-models.png", "r-summary.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_run_without_matplotlib_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    paths, why = plots.plot_results(markdown.load_results(_results_file(tmp_path)), tmp_path, "r")
    assert paths == [] and "matplotlib unavailable" in why
    monkeypatch.setattr(cli, "memory_probe", lambda device: {"ok": True})
    monkeypatch.setattr(cli, "_bench_case", lambda case, *a: [
        cli.Row(case.op, case.label, case.mode, "fp32", "cpu", "ok", speedup=1.5, ms=1.0, ref_ms=1.5)])
    rc = cli.main(["--device", "cpu", "--ops", "matrix_nms_boxes", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "no figures: matplotlib unavailable" in out
    assert "[2/2," in out  # the progress, as plain lines (stdout is not a terminal here)
    result = json.loads((tmp_path / "cpu-matrix_nms_boxes.json").read_text())
    m = result["machine"]
    assert {"torch", "triton", "git_commit", "loadavg_at_start", "cpu"} <= set(m)
    assert result["elapsed_s"] is not None and "loadavg_at_end" in result
    assert result["settings"]["full"] is False and result["settings"]["case_seconds"] == budget.CASE_SECONDS


def test_markdown_report_and_comparison(tmp_path):
    res = markdown.load_results(_results_file(tmp_path))
    text = markdown.report(res)
    assert "commit `0123456789ab`" in text and "load average 1.50 at start, 2.00 at end" in text
    assert "| separable_conv2d | cpu | 2 | 1.00× | 0.50× exit_flow | 2.00× aspp | 1 |" in text
    assert f"| roi_upsample | aunet | 1x2 | cpu | 1000{markdown.ONCE_MARK} | 10.0 | 100× |" in text
    assert "| models | broken | 1x2 | fused | - | - | FAIL | - | - |" in text
    other = markdown.load_results(_results_file(tmp_path, "s.json", scale=2.0))
    for r in other["results"]:
        r["ms"] = r["ms"] and r["ms"] / 2  # twice as fast
    cmp = markdown.compare(res, other)
    assert "| separable_conv2d | aspp | fp32 | cpu | cpu | 10.0 | 5.00 | 0.50 | 2.00× | 4.00× |" in cmp
    assert "4 paired rows" in cmp


def test_cli_report_writes_markdown(tmp_path, capsys):
    path = _results_file(tmp_path)
    assert cli.main(["report", str(path)]) == 0
    assert "| op | case | shape |" in capsys.readouterr().out
    assert cli.main(["report", str(path), str(path)]) == 0
    assert "geometric mean of B/A time 1.00" in capsys.readouterr().out  # same file names: A and B


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "bench" / "results").glob("*.json")), ids=lambda p: p.name)
def test_committed_results_load_and_report(path):
    """Older files lack the newer metadata (commit, family, ref_once): they still load and report."""
    res = markdown.load_results(path)
    assert res["results"] and all(r["family"] for r in res["results"])
    assert "| op | case |" in markdown.report(res)


def test_readme_tables_are_generated_from_the_committed_results():
    """The README's measured tables equal what the committed JSON produces (regenerate them with
    `python -m fastseg.bench report --update-readme README.md`)."""
    text = (ROOT / "README.md").read_text()
    assert text.count("<!-- bench:begin ") >= 2
    assert markdown.check_readme(ROOT / "README.md") == []


def test_readme_blocks_are_rewritten(tmp_path):
    _results_file(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:begin r.json -->\nstale\n<!-- bench:end -->\nafter\n")
    assert markdown.check_readme(readme) == ["r.json"]
    assert cli.main(["report", "--update-readme", str(readme)]) == 0
    assert markdown.check_readme(readme) == []
    text = readme.read_text()
    assert text.startswith("intro\n<!-- bench:begin r.json -->\n") and text.endswith("<!-- bench:end -->\nafter\n")
    assert "stale" not in text and "| aspp |" in text
