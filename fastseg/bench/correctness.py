"""Correctness of a backend against its baseline and a float64 oracle: the tests' ratio rule.

A backend passes when ``max|backend - oracle| <= 2 * max|baseline - oracle| + atol[dtype] * max|oracle|``,
the oracle being the baseline (or the case's ``check_against``) on the inputs cast to float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fastseg.bench.cases import Case, Inputs, Outputs

__all__ = ["ATOL", "CheckResult", "cast_inputs", "check_backend", "check_case"]

# Tolerance of a backend, relative to the output's magnitude, on top of the ratio rule (see module doc).
ATOL: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}


def _as_tuple(out: Outputs) -> tuple[Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def cast_inputs(inputs: Inputs, dtype: torch.dtype) -> Inputs:
    """Floating tensors of ``inputs`` cast to ``dtype`` (same values; requires_grad kept)."""
    out: Inputs = {}
    for k, v in inputs.items():
        if isinstance(v, Tensor) and v.is_floating_point():
            out[k] = v.detach().to(dtype).requires_grad_(v.requires_grad)
        else:
            out[k] = v
    return out


@dataclass
class CheckResult:
    """A backend's outputs against the baseline and the float64 oracle (worst output reported).

    ``max_abs_err``/``max_rel_err``: against the same-dtype baseline (rel = abs / max|baseline|);
    ``err_vs_fp64``/``baseline_err_vs_fp64``: of the backend and of the baseline against the oracle,
    relative to max|oracle|; ``limit``: what ``err_vs_fp64`` must not exceed.
    """

    ok: bool
    max_abs_err: float
    max_rel_err: float
    err_vs_fp64: float
    baseline_err_vs_fp64: float
    limit: float
    worst_output: str
    message: str = ""


def _output_names(case: Case, n: int) -> list[str]:
    wrt = case.params.get("wrt")
    if wrt and len(wrt) == n:
        return [f"grad_{w}" for w in wrt]
    return ["out"] if n == 1 else [f"out{i}" for i in range(n)]


def check_backend(case: Case, out: Outputs, base: Outputs, oracle: Outputs, dtype: torch.dtype) -> CheckResult:
    """Compare ``out`` (backend) with ``base`` (baseline, same dtype) and ``oracle`` (baseline in fp64)."""
    outs, bases, refs = _as_tuple(out), _as_tuple(base), _as_tuple(oracle)
    names = _output_names(case, len(refs))
    if len(outs) != len(refs):
        return CheckResult(False, math.inf, math.inf, math.inf, 0.0, 0.0, "-",
                           f"{len(outs)} outputs, expected {len(refs)}")
    atol = ATOL.get(dtype, 1e-2)
    worst: CheckResult | None = None
    for name, o, b, r in zip(names, outs, bases, refs, strict=True):
        if o.shape != r.shape:
            return CheckResult(False, math.inf, math.inf, math.inf, 0.0, 0.0, name,
                               f"{name}: shape {tuple(o.shape)}, expected {tuple(r.shape)}")
        if r.numel() == 0:
            continue
        o64, b64, r64 = o.detach().double(), b.detach().double(), r.detach().double()
        if not torch.isfinite(o64).all():
            return CheckResult(False, math.inf, math.inf, math.inf, 0.0, 0.0, name, f"{name}: non-finite values")
        scale = max(r64.abs().max().item(), 1e-30)
        abs_err = (o64 - b64).abs().max().item()
        err = (o64 - r64).abs().max().item() / scale
        base_err = (b64 - r64).abs().max().item() / scale
        limit = 2.0 * base_err + atol
        res = CheckResult(err <= limit, abs_err, abs_err / max(b64.abs().max().item(), 1e-30), err, base_err,
                          limit, name)
        if not res.ok:
            res.message = (f"{name}: error vs fp64 {err:.3g} (relative to max|ref| {scale:.3g}) > "
                           f"2 x baseline's {base_err:.3g} + {atol:g}")
        if worst is None or err / limit > worst.err_vs_fp64 / worst.limit:
            worst = res
    return worst or CheckResult(True, 0.0, 0.0, 0.0, 0.0, atol, "-", "empty output")


def check_case(case: Case, inputs: Inputs, backend: str, dtype: torch.dtype) -> CheckResult:
    """Run the baseline (or the case's ``check_against``), its float64 oracle and ``backend`` on ``inputs``
    and compare them."""
    against = case.check_against or case.baseline
    with torch.no_grad() if case.mode == "fwd" else torch.enable_grad():
        base = against(inputs)
        oracle = against(cast_inputs(inputs, torch.float64))
        out = case.run(inputs, backend)
    return check_backend(case, out, base, oracle, dtype)
