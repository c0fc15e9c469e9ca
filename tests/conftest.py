"""Shared test configuration: markers, the tolerance table, and comparison helpers."""

from __future__ import annotations

import pytest
import torch

# One tolerance table per dtype: (atol, rtol) of a kernel against the float64 reference.
TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1e-2, 1e-2),
}
LOW_PRECISION = (torch.float16, torch.bfloat16)

HAS_GPU = torch.cuda.is_available()
NO_GPU_REASON = "needs a CUDA GPU; none is visible on this machine"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped with a reason when none is present)")
    config.addinivalue_line("markers", "interpret: Triton kernels on CPU tensors under TRITON_INTERPRET=1")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason=NO_GPU_REASON)
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)


def assert_matches_reference(out: torch.Tensor, ref64: torch.Tensor, ref_same_dtype: torch.Tensor | None = None,
                             name: str = "output") -> None:
    """``out`` against the float64 reference with the dtype's tolerance.

    Low precision follows the ratio rule: error(out) <= 2 * error(PyTorch reference in out's dtype)
    + atol. float32 must meet the table, or, for ill-conditioned cases (softmax of energies in the
    hundreds), the same ratio rule against the float32 PyTorch reference when one is given."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    atol, rtol = TOL[out.dtype]
    if out.numel() == 0:
        return
    within_table = torch.allclose(out.double(), ref64, atol=atol, rtol=rtol)
    if out.dtype in LOW_PRECISION or (not within_table and ref_same_dtype is not None):
        assert ref_same_dtype is not None, "the ratio rule needs the same-dtype reference"
        err = (out.double() - ref64).abs().max().item()
        ref_err = (ref_same_dtype.double() - ref64).abs().max().item()
        assert err <= 2 * ref_err + atol, f"{name}: error {err:.3g} > 2 x reference error {ref_err:.3g} + {atol}"
    else:
        torch.testing.assert_close(out.double(), ref64, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def check_forward_backward(run, reference, leaves: list[torch.Tensor], names: list[str]) -> None:
    """``run(*leaves)`` against ``reference`` on float64 copies of the leaves (the oracle) and, for the
    ratio rule, on the leaves themselves: the output, then the gradient of every leaf."""
    dtype = leaves[0].dtype
    leaves = [t.detach().requires_grad_(True) for t in leaves]  # callers need not set requires_grad
    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    out = run(*leaves)
    ref64 = reference(*leaves64)
    ref_lp = reference(*leaves) if dtype != torch.float64 else None
    assert out.dtype == dtype
    assert_matches_reference(out, ref64, ref_lp)
    if out.numel() == 0:
        return
    grad = torch.randn_like(ref64)
    got = torch.autograd.grad(out, leaves, grad.to(dtype))
    want = torch.autograd.grad(ref64, leaves64, grad)
    want_lp = torch.autograd.grad(ref_lp, leaves, grad.to(dtype)) if ref_lp is not None else [None] * len(got)
    for name, g, w, wl in zip(names, got, want, want_lp, strict=True):
        assert_matches_reference(g, w, wl, name=f"grad {name}")


def relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as channels_last (H and W still collapse: hw_offsets' FLAT path) or as the first
    W columns of a wider map (they do not: the general path)."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    wide = t.new_empty(*t.shape[:3], t.shape[3] + 3)
    wide[..., :t.shape[3]] = t
    return wide[..., :t.shape[3]]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small-model tests: on a shared 2-core machine two threads
    spin-wait under contention and make small ops ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
