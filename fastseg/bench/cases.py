"""Benchmark cases and the registry of the ops (and models) that have them.

A :class:`Case` is one shape of one op: how to make its inputs, the eager baseline, the op on a given
backend, and what the harness needs to report (bytes moved, FLOPs). A module of cases registers a
function returning its cases with :func:`register_op`; :func:`get_cases` builds them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fastseg import ops

__all__ = [
    "DEFAULT_DTYPES",
    "DTYPES",
    "OPS",
    "Case",
    "Inputs",
    "Outputs",
    "SkipCase",
    "dtype_name",
    "family_of",
    "get_cases",
    "grad_step",
    "nbytes",
    "op_backends",
    "register_op",
]

Inputs = dict[str, Any]
Outputs = Tensor | tuple[Tensor, ...]

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp64": torch.float64, "float64": torch.float64,
}
DEFAULT_DTYPES: dict[str, tuple[torch.dtype, ...]] = {
    "cpu": (torch.float32,),
    "cuda": (torch.float16, torch.bfloat16, torch.float32),
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"fp32"`` (the names of the table, JSON and ``--dtype``)."""
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}.get(
        dtype, str(dtype).removeprefix("torch."))


@dataclass(frozen=True)
class Case:
    """One benchmark case of one op.

    Attributes:
        op: the op's name in ``fastseg.ops`` (the key of ``available_backends()``), or a registry entry
            with its own backends (``"models"``).
        name: unique within the op, e.g. ``"aspp_os16_r6"``.
        mode: ``"fwd"`` or ``"fwd+bwd"`` (forward, then the gradients of the inputs in ``params['wrt']``).
        params: what the case is (shape, stride, ...), for the JSON and the table.
        make_inputs: ``(device, dtype) -> inputs``, fresh seeded random tensors; raises :class:`SkipCase`
            when the case cannot run here.
        baseline: ``inputs -> outputs``, the eager PyTorch composition from ``fastseg.ops._reference``.
        run: ``(inputs, backend) -> outputs``, the op on that backend; same output structure as baseline.
        bytes_moved: ``inputs -> int``, the minimum bytes a kernel must read and write.
        flops: ``inputs -> float``, floating point operations of one call.
        quick: part of the ``--quick`` subset.
        check_against: ``inputs -> outputs``, what ``run`` is checked against (in the case's dtype and,
            as the oracle, on the inputs cast to float64) when ``baseline`` computes something else (a peer
            library's model); None: ``baseline``.
        rounds, min_reps: CPU timing rounds and timed samples of this case; None: ``--rounds``,
            ``--min-reps`` (whole models take seconds a call: one round, three samples).
        warmup: untimed calls after the first one (CPU; a model: 0).
        budget_variant: ``() -> Case``, the same case on a smaller input for the budgeted (default CPU) run,
            where even its correctness check and one timed call would not fit (whole models at 513x513);
            None: the case runs as it is in both runs.
    """

    op: str
    name: str
    mode: str
    params: dict[str, Any]
    make_inputs: Callable[[torch.device, torch.dtype], Inputs]
    baseline: Callable[[Inputs], Outputs]
    run: Callable[[Inputs, str], Outputs]
    bytes_moved: Callable[[Inputs], int] | None = None
    flops: Callable[[Inputs], float] | None = None
    quick: bool = False
    check_against: Callable[[Inputs], Outputs] | None = None
    rounds: int | None = None
    min_reps: int | None = None
    warmup: int = 2
    budget_variant: Callable[[], Case] | None = None

    @property
    def label(self) -> str:
        """``name`` plus the mode when it is not a plain forward."""
        return self.name if self.mode == "fwd" else f"{self.name} ({self.mode})"

    @property
    def id(self) -> str:
        """A pytest-friendly id."""
        return self.name if self.mode == "fwd" else f"{self.name}-{self.mode.replace('+', '')}"


class SkipCase(Exception):
    """Raised by a case's ``make_inputs`` when it cannot run here (a model whose module does not exist
    yet, a peer library that is not installed); the harness reports the case as skipped, with the message."""


OpCases = Callable[..., list[Case]]
OPS: dict[str, OpCases] = {}
# Registry entries whose backends are their own, not fastseg.ops': name -> (device -> backends).
_OWN_BACKENDS: dict[str, Callable[[torch.device], list[str]]] = {}


def register_op(name: str, backends: Callable[[torch.device], list[str]] | None = None
                ) -> Callable[[OpCases], OpCases]:
    """Register ``fn(batch: int, quick: bool) -> list[Case]`` as the cases of op ``name``.

    ``backends``: ``device -> [backend, ...]`` that the cases' ``run`` takes, for an entry that is not an
    op of ``fastseg.ops`` (the models: ``["fused"]``); default: ``fastseg.ops.available_backends()``'s.
    """
    def deco(fn: OpCases) -> OpCases:
        OPS[name] = fn
        if backends is not None:
            _OWN_BACKENDS[name] = backends
        return fn
    return deco


def op_backends(op: str, device: torch.device) -> list[str]:
    """The backends ``op``'s cases can run on ``device``, ``reference`` included for ``fastseg.ops``' ops."""
    if op in _OWN_BACKENDS:
        return _OWN_BACKENDS[op](device)
    return ops.available_backends(device).get(op, [])


def family_of(op: str) -> str:
    """The family of a registered op: the module its cases live in, less ``ops_`` (``separable_conv2d`` ->
    ``"conv"``, the model rows -> ``"models"``); an unknown op (an older results file) is its own family."""
    fn = OPS.get(op)
    if fn is None:
        return op
    return fn.__module__.rsplit(".", 1)[-1].removeprefix("ops_")


def get_cases(op: str, batch: int = 1, quick: bool = False) -> list[Case]:
    """The cases of ``op`` (only the ``quick`` subset when asked)."""
    if op not in OPS:
        raise ValueError(f"no benchmark cases for op {op!r}; known: {sorted(OPS)}")
    cases = OPS[op](batch=batch, quick=quick)
    return [c for c in cases if c.quick] if quick else cases


def nbytes(*ts: Tensor | None) -> int:
    """Bytes of the tensors (None skipped)."""
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def grad_step(forward: Callable[..., Tensor], wrt: Sequence[str]) -> Callable[..., tuple[Tensor, ...]]:
    """Turn ``forward(inputs, *a)`` into forward + backward returning the grads of ``inputs[wrt]``
    against ``inputs['grad_out']`` (``torch.autograd.grad``: nothing accumulates between runs)."""
    def step(inputs: Inputs, *args: Any) -> tuple[Tensor, ...]:
        out = forward(inputs, *args)
        return torch.autograd.grad(out, [inputs[n] for n in wrt], inputs["grad_out"])
    return step
