"""Triton backend of esp_pyramid under TRITON_INTERPRET=1 (CPU tensors, fp32), against the float64
reference: forward and every gradient, determinism.

Run in its own process: ``TRITON_INTERPRET=1 pytest tests/test_esp_pyramid_triton.py``
(the interpreter must be on before triton is first imported, so setting it here is too late).
"""

from __future__ import annotations

import os

import pytest
import test_esp_pyramid as base
import torch

from fastseg import ops

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="Triton interpreter tests need TRITON_INTERPRET=1 set before triton is imported "
                              "(run this file in its own pytest process)"),
]

# The op's shared cases; the interpreter runs every program in Python, so the largest is left out.
CASES = [c for c in base.CASES if c.c * c.h * c.w <= 1200]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_matches_reference(case):
    base.check_forward_backward(case, "triton", "cpu", torch.float32)


def test_first_branch_wider_and_several_blocks():
    """ESPNet's split (first branch wider) with more channels than one BLOCK_O / BLOCK_C."""
    base.check_forward_backward(base.Case(1, 33, 35, 33, 3, 4, dilations=(1, 2)), "triton", "cpu", torch.float32)


def test_backward_is_deterministic():
    case = base.Case(2, 3, 4, 3, 5, 7)
    x, weights = base.sample_inputs(case, "cpu", torch.float32, requires_grad=True)
    grads = []
    for _ in range(2):
        out = ops.esp_pyramid(x, weights, dilations=case.dilations, backend="triton")
        grads.append(torch.autograd.grad(out, base.leaves_of(x, weights), torch.ones_like(out)))
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)
