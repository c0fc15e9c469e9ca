"""Compile every Triton kernel launch of some interpreter tests for sm_90a, without a GPU.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute, not that they compile for a GPU
(layouts, tensor-core dot shapes, register pressure). This script runs the given pytest files under
the interpreter, records every distinct launch signature (argument types, constexprs, the JIT's
16-divisibility and ==1 specialisations, num_warps/num_stages), then compiles each one for sm_90a with
Triton's own ptxas and prints registers, spills and shared memory. Exit 1 if any fails to compile.

    .venv/bin/python bench/triton_sm90_compile.py tests/test_roi_align_triton.py tests/test_matrix_nms_triton.py

The block sizes are those the tests launch (often small ones); the GPU launchers' own choices are in
the tests only where a test forces them.
"""

import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int32": "i32",
           "int64": "i64", "int8": "i8", "uint8": "u8", "bool": "i1", "int16": "i16"}


def _record_plugin(out: str) -> None:
    """Imported inside the pytest process (as a plugin): patch the interpreter's launch to record."""
    import atexit

    import torch
    import triton.runtime.interpreter as interp

    seen: dict[str, dict] = {}
    launch = interp.InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        bound = dict(zip(params, args, strict=False)) | {k: v for k, v in kwargs.items() if k in params}
        sig, const, div16 = {}, {}, []
        for i, (name, p) in enumerate(params.items()):
            v = bound.get(name, p.default)
            if "constexpr" in str(p.annotation) or v is None or (type(v) is int and v == 1):
                if not (v is None or isinstance(v, (bool, int, float, str))):
                    raise TypeError(f"{self.fn.__name__}: constexpr {name}={v!r} is not recordable")
                sig[name], const[name] = "constexpr", v
                continue
            if isinstance(v, torch.Tensor):
                sig[name] = "*" + _DTYPES[str(v.dtype).removeprefix("torch.")]
                aligned = v.data_ptr() % 16 == 0
            elif isinstance(v, float):
                sig[name], aligned = "fp32", False
            else:
                sig[name], aligned = ("i32" if -2**31 <= v < 2**31 else "i64"), type(v) is int and v % 16 == 0
            if aligned:
                div16.append(i)
        rec = {"module": self.fn.__module__, "name": self.fn.__name__, "sig": sig, "const": const, "div16": div16,
               "num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 3)}
        seen[json.dumps(rec, sort_keys=True)] = rec
        return launch(self, *args, grid=grid, warmup=warmup, **kwargs)

    interp.InterpretedFunction.run = run
    atexit.register(lambda: json.dump(list(seen.values()), open(out, "w")))


def _compile(records: list[dict]) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    failed = 0
    for r in sorted(records, key=lambda r: (r["module"], r["name"], json.dumps(r["const"], sort_keys=True))):
        fn = getattr(importlib.import_module(r["module"]), r["name"])
        shown = {k: v for k, v in r["const"].items() if k.isupper()}
        try:
            attrs = {(i,): [["tt.divisibility", 16]] for i in r["div16"]}
            k = triton.compile(ASTSource(fn, r["sig"], r["const"], attrs), target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": r["num_warps"], "num_stages": r["num_stages"]})
            with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
                f.write(k.asm["ptx"])
                f.flush()
                log = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True,
                                     text=True).stderr
            regs = re.search(r"Used (\d+) registers", log)
            spills = re.search(r"(\d+) bytes spill stores", log)
            print(f"ok    {r['name']} {shown}: {regs and regs[1]} registers, {spills and spills[1]} B spilled, "
                  f"{k.metadata.shared} B shared", flush=True)
        except Exception as e:  # report every failure, then exit 1
            failed += 1
            print(f"FAIL  {r['name']} {shown} {r['sig']}: {type(e).__name__}: {str(e).strip()[-2000:]}", flush=True)
    print(f"{len(records) - failed} of {len(records)} launch signatures compiled for sm_90a")
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "launches.json")
        plugin = os.path.join(tmp, "_triton_record.py")
        with open(plugin, "w") as f:
            f.write(f"import sys\nsys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
                    f"import triton_sm90_compile\ntriton_sm90_compile._record_plugin({out!r})\n")
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([tmp, root]))
        rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "_triton_record", "-m", "interpret", *argv],
                            env=env, cwd=root).returncode
        if rc != 0:
            print(f"pytest failed (exit {rc}); compiling what it launched")
        records = json.load(open(out))
    sys.path.insert(0, root)
    os.environ.pop("TRITON_INTERPRET", None)
    return _compile(records) or (1 if rc else 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
