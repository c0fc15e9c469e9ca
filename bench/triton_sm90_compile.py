"""Compile every Triton kernel launch of fastseg for sm_90a, without a GPU, with the installed Triton.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute, not that they compile for a GPU
(layouts, tensor-core dot shapes, dtype rules of the front end, register pressure, shared memory).
This script collects launches from two sources, each in a pytest/python child under the interpreter:

* ``tests``: every launch of the ``interpret`` tests (whatever block sizes the tests force);
* ``bench``: the launches the ops make at the shapes of ``python -m fastseg.bench`` on CUDA (fp16,
  bf16 and fp32, forward and backward): the launchers' own default GPU configurations. These are
  recorded without running the kernels (the outputs are garbage; nothing is checked).

Each launch is then specialised exactly as Triton's JIT would (its own binder: the ==1 / %16 integer
and 16-byte pointer alignment specialisations, ``do_not_specialize``), deduplicated, compiled for
sm_90a and assembled with Triton's ptxas (-v) to read registers, spills and shared memory.

Exit 1 on: a compile error, shared memory above what an sm_90 block may use (227 KiB), or a register
spill in a ``bench`` launch (a default GPU configuration). Spills in test-only configurations are
reported, not failed.

    python bench/triton_sm90_compile.py                      # both sources
    python bench/triton_sm90_compile.py --tests tests/test_roi_align_triton.py --no-bench
"""

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SM90_MAX_SHARED = 227 * 1024  # bytes of shared memory one block may opt in to on sm_90
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


# ---- recording (runs in the child, under TRITON_INTERPRET=1) -------------------------------------

def _encode(v):
    import torch

    if isinstance(v, torch.Tensor):
        return {"tensor": str(v.dtype).removeprefix("torch."), "aligned": v.data_ptr() % 16 == 0}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"cannot record a launch argument of type {type(v).__name__}")


def record(out: str, execute: bool) -> list[int]:
    """Patch the interpreter's launch to append each launch to ``out`` (JSON lines); ``execute=False``
    records without running the kernel. Returns a one-element counter of the launches made so far."""
    import atexit

    import triton.runtime.interpreter as interp

    seen: set[str] = set()
    launches = [0]
    launch = interp.InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        rec = {"module": self.fn.__module__, "name": self.fn.__name__, "args": [_encode(a) for a in args],
               "kwargs": {k: _encode(v) for k, v in kwargs.items()}}
        seen.add(json.dumps(rec, sort_keys=True))
        launches[0] += 1
        return launch(self, *args, grid=grid, warmup=warmup, **kwargs) if execute else None

    interp.InterpretedFunction.run = run

    def dump():
        with open(out, "a") as f:
            f.writelines(s + "\n" for s in sorted(seen))

    atexit.register(dump)
    return launches


def record_bench(out: str) -> None:
    """Launch (without running) every Triton op at the CUDA benchmark's shapes and dtypes."""
    import torch

    launches = record(out, execute=False)
    from fastseg import bench, ops

    backends = ops.available_backends("cpu")
    for op in sorted(bench.OPS):
        if "triton" not in backends.get(op, []):
            continue
        for case in bench.get_cases(op):
            for dtype in bench.DEFAULT_DTYPES["cuda"]:
                before = launches[0]
                try:
                    inputs = case.make_inputs(torch.device("cpu"), dtype)
                    case.run(inputs, "triton")
                except Exception as e:  # a launcher that cannot even be called is a failure too
                    if isinstance(e, ValueError) and launches[0] > before:
                        # A later stage checks data that the unexecuted kernels never wrote (e.g. Matrix NMS
                        # after dynamic_mask_head: NaN scores); what launched up to there is recorded.
                        print(f"note  bench {op}/{case.label}/{dtype}: stopped at a data check after "
                              f"{launches[0] - before} launch(es): {e}", flush=True)
                        continue
                    print(f"FAIL  bench {op}/{case.label}/{dtype}: {type(e).__name__}: {e}", flush=True)
                    with open(out + ".errors", "a") as f:
                        f.write(f"{op}/{case.label}/{dtype}\n")


# ---- compiling (runs with the real Triton JIT classes, no interpreter) ---------------------------

def _decode(v):
    import torch

    if isinstance(v, dict):
        dtype = getattr(torch, v["tensor"])
        base = torch.empty(64, dtype=dtype)  # CPU allocations are 64-byte aligned
        return base if v["aligned"] else base[1:]
    return v


def _specialise(rec: dict):
    """(key, compile arguments) as the JIT's binder computes them for this launch on sm_90a."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = getattr(importlib.import_module(rec["module"]), rec["name"])
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args = [_decode(a) for a in rec["args"]]
    kwargs = {k: _decode(v) for k, v in rec["kwargs"].items()} | {"debug": False}
    bound, specialization, options = binder(*args, **kwargs)
    key = json.dumps([rec["module"], rec["name"], repr(specialization),
                      {k: kwargs.get(k) for k in _OPTIONS}], sort_keys=True)
    return key, (fn, target, backend, kwargs, bound, specialization, options)


def _compile_one(job: tuple[str, dict]) -> dict:
    import triton
    from triton.compiler import ASTSource

    source, rec = job
    consts = {k: v for k, v in rec["kwargs"].items() if k[:1].isupper()}
    dtype = next((a["tensor"] for a in rec["args"] if isinstance(a, dict)), "-")  # the first pointer's
    res = {"source": source, "name": rec["name"], "dtype": dtype, "consts": consts,
           "warps": rec["kwargs"].get("num_warps", 4)}
    try:
        _, (fn, target, backend, kwargs, bound, specialization, options) = _specialise(rec)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(k.asm["ptx"])
            f.flush()
            log = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True,
                                 text=True).stderr
        regs = re.search(r"Used (\d+) registers", log)
        spills = re.search(r"(\d+) bytes spill stores", log)
        res |= {"ok": True, "registers": int(regs[1]) if regs else None,
                "spill_bytes": int(spills[1]) if spills else 0, "shared_bytes": int(k.metadata.shared)}
    except Exception as e:  # every failure is reported, then the script exits 1
        res |= {"ok": False, "error": f"{type(e).__name__}: {str(e).strip()[-1500:]}"}
    return res


def _collect(tests: list[str], bench: bool, tmp: str) -> tuple[list[tuple[str, dict]], int]:
    """Run the recording children; returns (launch records with their source, number of failures)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([tmp, ROOT]))
    here = os.path.dirname(os.path.abspath(__file__))
    failures = 0
    jobs: list[tuple[str, dict]] = []
    if tests:
        out = os.path.join(tmp, "tests.jsonl")
        with open(os.path.join(tmp, "_triton_record.py"), "w") as f:
            f.write(f"import sys\nsys.path.insert(0, {here!r})\nimport triton_sm90_compile\n"
                    f"triton_sm90_compile.record({out!r}, execute=True)\n")
        rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "_triton_record", "-m", "interpret",
                             "-p", "no:cacheprovider", *tests], env=env, cwd=ROOT).returncode
        if rc != 0:
            print(f"FAIL  the interpret tests exited {rc}; compiling what they launched", flush=True)
            failures += 1
        jobs += [("tests", json.loads(line)) for line in open(out)] if os.path.exists(out) else []
    if bench:
        out = os.path.join(tmp, "bench.jsonl")
        code = f"import sys; sys.path.insert(0, {here!r}); import triton_sm90_compile as t; t.record_bench({out!r})"
        rc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT).returncode
        errors = open(out + ".errors").read().split() if os.path.exists(out + ".errors") else []
        if rc != 0 or errors:
            print(f"FAIL  recording the benchmark launches: exit {rc}, {len(errors)} case(s) failed", flush=True)
            failures += 1
        jobs += [("bench", json.loads(line)) for line in open(out)] if os.path.exists(out) else []
    return jobs, failures


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tests", nargs="*", default=None,
                   help="interpret test files to record (default: every tests/test_*triton*.py)")
    p.add_argument("--no-bench", action="store_true", help="skip the benchmark's default GPU configurations")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    p.add_argument("--json", help="write every result to this file")
    a = p.parse_args(argv)
    tests = a.tests if a.tests is not None else sorted(
        os.path.relpath(os.path.join(ROOT, "tests", f), ROOT) for f in os.listdir(os.path.join(ROOT, "tests"))
        if f.startswith("test_") and "triton" in f and f.endswith(".py"))
    import triton

    print(f"triton {triton.__version__}: recording launches of {len(tests)} test file(s)"
          f"{'' if a.no_bench else ' and the benchmark cases'}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        jobs, failures = _collect(tests, not a.no_bench, tmp)
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, ROOT)

    # One compile per distinct specialisation; a bench launch marks its specialisation as a default.
    unique: dict[str, tuple[str, dict]] = {}
    for source, rec in jobs:
        key, _ = _specialise(rec)
        if key not in unique or source == "bench":
            unique[key] = (source, rec)
    print(f"{len(jobs)} launches -> {len(unique)} distinct specialisations; compiling with {a.jobs} process(es)",
          flush=True)
    with ProcessPoolExecutor(a.jobs) as pool:
        results = list(pool.map(_compile_one, sorted(unique.values(), key=lambda j: (j[1]["name"], json.dumps(j)))))

    for r in results:
        consts = " ".join(f"{k}={v}" for k, v in sorted(r["consts"].items()))
        if not r["ok"]:
            failures += 1
            print(f"FAIL  [{r['source']}] {r['name']} {r['dtype']} {consts}: {r['error']}")
            continue
        bad = []
        if r["shared_bytes"] > SM90_MAX_SHARED:
            bad.append(f"shared memory {r['shared_bytes']} B > {SM90_MAX_SHARED} B")
        if r["spill_bytes"] and r["source"] == "bench":
            bad.append("spills in a default GPU configuration")
        failures += bool(bad)
        tag = "FAIL " if bad else ("spill" if r["spill_bytes"] else "ok   ")
        print(f"{tag} [{r['source']}] {r['name']} {r['dtype']} {consts} warps={r['warps']}: "
              f"{r['registers']} registers, {r['spill_bytes']} B spilled, {r['shared_bytes']} B shared"
              + "".join("; " + b for b in bad))
    per_kernel: dict[str, list[dict]] = {}
    for r in results:
        per_kernel.setdefault(r["name"], []).append(r)
    print(f"\n{'kernel':40s} {'configs':>7s} {'max regs':>8s} {'max spill B':>11s} {'max shared B':>12s} failed")
    for name, rs in sorted(per_kernel.items()):
        ok = [r for r in rs if r["ok"]]
        print(f"{name:40s} {len(rs):7d} {max((r['registers'] or 0 for r in ok), default=0):8d} "
              f"{max((r['spill_bytes'] for r in ok), default=0):11d} "
              f"{max((r['shared_bytes'] for r in ok), default=0):12d} {len(rs) - len(ok)}")
    n_ok = sum(r["ok"] for r in results)
    print(f"{n_ok} of {len(results)} specialisations compiled for sm_90a with triton {triton.__version__}; "
          f"{'FAILED' if failures else 'passed'} ({failures} failure(s))")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"triton": triton.__version__, "results": results}, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
