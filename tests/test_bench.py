"""The benchmark harness's own logic (the benchmarks themselves run in `make bench`)."""

import json
import time

from fastseg import bench


def test_time_limit_is_shared_by_the_ops(monkeypatch, tmp_path):
    """A slow first op must not starve the later ones: each gets an equal share of the time left and
    its first case while any is left; the run exits 3 and the JSON says which ops were cut."""
    calls = []

    def slow_case(case, dtype, device, backends, args, log):
        calls.append(case.op)
        time.sleep(0.4)
        return []

    monkeypatch.setattr(bench, "_bench_case", slow_case)
    monkeypatch.setattr(bench, "_memory_probe", lambda device: {"ok": True})
    monkeypatch.setattr(bench, "_ceilings", lambda *a: {})
    rc = bench.main(["--device", "cpu", "--ops", "matrix_nms,matrix_nms_boxes", "--time-limit", "2.0",
                     "--no-plot", "--out", str(tmp_path)])
    assert rc == 3
    assert 1 <= calls.count("matrix_nms") < 4 and calls.count("matrix_nms_boxes") >= 1
    result = json.loads((tmp_path / "cpu-matrix_nms-matrix_nms_boxes.json").read_text())
    assert "matrix_nms " in result["incomplete"]
