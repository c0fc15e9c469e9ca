"""The hypothesis fuzz groups of tests/fuzz_ops.py, each in its own process: a segfault or abort in a
kernel fails the test with the example that caused it instead of taking the test run down.
FUZZ_EXAMPLES sets the examples per property (default 40)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

pytest.importorskip("hypothesis", reason="the fuzz suite is driven by hypothesis (a test dependency)")

from fuzz_ops import GROUPS  # tests/ is on sys.path under pytest

from fastseg._extension import has_ops, load_error

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.skipif(not has_ops(), reason=f"fastseg._C not loaded: {load_error()}")
@pytest.mark.parametrize("group", sorted(GROUPS))
def test_fuzz_group(group, tmp_path):
    last = tmp_path / "last_example"
    env = dict(os.environ, FUZZ_LAST=str(last),
               PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run([sys.executable, os.path.join(HERE, "fuzz_ops.py"), group], env=env,
                              capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.fail(f"fuzz group {group} ran past 900 s; last example: {_read(last)}")
    if proc.returncode < 0:
        pytest.fail(f"fuzz group {group} crashed with {signal.Signals(-proc.returncode).name} on: {_read(last)}\n"
                    f"{proc.stderr[-3000:]}")
    assert proc.returncode == 0, f"fuzz group {group} failed (last example: {_read(last)}):\n{proc.stdout}\n" \
                                 f"{proc.stderr[-6000:]}"


def _read(path) -> str:
    return path.read_text().strip() if path.exists() else "(none recorded)"
