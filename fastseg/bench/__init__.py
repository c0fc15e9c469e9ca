"""``python -m fastseg.bench``: every available backend of every fused op against its eager PyTorch
baseline, and every model fused against its unfused self, measured in the same run.

For each case (a shape taken from a real architecture) and dtype, and each usable backend other than
``reference``:

1. **correctness first**: the backend and the baseline both run on the same inputs and are compared
   with a float64 oracle (the baseline on the inputs cast to float64; a model row: the fused model
   against the same weights on the ``reference`` backend, in float64 for the oracle). A backend passes when
   ``max|backend - oracle| <= 2 * max|baseline - oracle| + atol[dtype] * max|oracle|`` (the tests'
   ratio rule, scaled by the output's magnitude); the max abs / rel error against the baseline are
   reported too. A failure is printed at once and makes the run exit with status 1;
2. **timing**: warm-up, then the median and interquartile range of repeated runs. CPU:
   ``time.perf_counter`` with the number of repetitions fitted to a time budget per measurement
   (``--budget``, 0.5 s by default), baseline and backends alternating in ``--rounds`` rounds so that
   a shared machine's load hits them alike. That is the ``--full`` run; by default (CPU) each case gets
   ``--case-seconds`` of timing (:mod:`fastseg.bench.budget`): slow functions get fewer rounds and
   samples, the slowest a single timed call (marked ``ref_once`` / ``once`` and ``¹`` in the tables), and
   whole models run on a smaller input (``Case.budget_variant``), so that ``make bench`` stays bounded.
   GPU: ``triton.testing.do_bench`` (L2 flushed before each run; 0.2 s per measurement), or CUDA events
   when Triton is absent. Speed-up = baseline time / backend time, both from the same run. On a busy
   CPU (load average printed and stored) the eager baseline, made of many small parallel ops, suffers
   most: measure on an idle machine;
3. **peak memory**: the peak of bytes allocated on top of what was live before the call. GPU:
   ``torch.cuda.max_memory_allocated`` delta. CPU: ``torch.profiler`` with ``profile_memory=True``,
   the cumulative sum of its allocation events in time order (only allocations through PyTorch's
   allocator are seen: a kernel's ``std::vector`` scratch is not);
4. achieved GB/s (minimum bytes moved: inputs + weights + outputs) and TFLOP/s; on GPU also the
   fraction of the device-to-device copy bandwidth measured at the start of the run (and a dense
   matmul TFLOP/s per dtype, for scale).

Outputs (``--out``, default ``bench/out/``): ``<device>-<ops>.json`` (results + machine, versions, git
commit, load average, wall time), ``.csv``, figures ``-<family>.png`` per op family and ``-summary.png``
(:mod:`fastseg.bench.plots`; matplotlib optional); a table on stdout, with a progress line (cases done /
total, time left). ``python -m fastseg.bench report FILE [FILE2]`` turns results into Markdown, or the
per-case ratios between two runs; ``report --update-readme README.md`` regenerates the README's measured
tables (:mod:`fastseg.bench.markdown`).
Exit status: 0 all good, 1 a correctness check failed or a backend raised, 2 bad arguments,
3 stopped early (``--time-limit`` or SIGTERM; the partial results are written).

Layout: the harness in ``cases`` (:class:`Case`, the registry), ``timing``, ``budget``, ``memory``,
``correctness``, ``progress``, ``report`` (table, JSON, CSV), ``plots``, ``markdown`` and ``machine``
(versions, hardware, GPU ceilings); the cases in one module per op family (its family's name: the module's,
less ``ops_``; one figure each) (``ops_conv``, ``ops_attention``, ``ops_roi``, ``ops_nms``, ``ops_crf``, ``ops_esp``,
``ops_solo``) and ``models`` (end-to-end rows, op ``models``: see :mod:`fastseg.bench.models`); the command line in
``__main__``.

Adding an op: in its family's module of cases, write a function that returns its :class:`Case` list and
decorate it with ``@register_op("<op name>")`` (see :func:`separable_conv2d_cases`); a new module of cases
is imported below.

Example::

    python -m fastseg.bench --device cpu --quick
    python -m fastseg.bench --full                  # every case timed exhaustively (tens of minutes on CPU)
    python -m fastseg.bench report bench/results/cpu-all.json
    python -m fastseg.bench --device cuda --dtype fp16,bf16 --out /tmp/bench
    python -m fastseg.bench --ops models --cases deeplabv3plus
"""

# The modules of cases register their ops on import, in this order (the default order of --ops).
from fastseg.bench import ops_conv, ops_attention, ops_roi, ops_nms, ops_crf, ops_esp, ops_solo, models  # noqa: F401
from fastseg.bench.cases import DEFAULT_DTYPES, DTYPES, OPS, Case, SkipCase, get_cases, register_op
from fastseg.bench.correctness import ATOL, CheckResult, check_backend, check_case
from fastseg.bench.machine import machine_info
from fastseg.bench.memory import peak_memory_bytes
from fastseg.bench.ops_conv import separable_conv2d_cases
from fastseg.bench.timing import Timing, time_fn

__all__ = [
    "ATOL",
    "Case",
    "CheckResult",
    "DEFAULT_DTYPES",
    "DTYPES",
    "OPS",
    "SkipCase",
    "Timing",
    "check_backend",
    "check_case",
    "get_cases",
    "machine_info",
    "main",
    "peak_memory_bytes",
    "register_op",
    "separable_conv2d_cases",
    "time_fn",
]


def __getattr__(name: str) -> object:
    """``main`` is imported on first use: importing ``fastseg.bench.__main__`` here would make
    ``python -m fastseg.bench`` warn that the module was imported before it ran."""
    if name == "main":
        from fastseg.bench.__main__ import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
