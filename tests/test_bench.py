"""The benchmark harness's own logic (the benchmarks themselves run in `make bench`)."""

import json
import types

from fastseg.bench import __main__ as cli


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
