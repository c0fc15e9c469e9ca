"""Autograd of the compiled ops: each backward is its own op, fastseg::_<op>_backward."""

from __future__ import annotations

import torch

_N_AFFINE = 4  # dw_scale, dw_shift, pw_scale, pw_shift


def _sep_setup(ctx, inputs, output):
    x, dw_weight, pw_weight, *affine = inputs[: 3 + _N_AFFINE]
    ctx.geometry = inputs[3 + _N_AFFINE:]
    ctx.has_affine = [t is not None for t in affine]
    ctx.save_for_backward(x, dw_weight, pw_weight, *[t for t in affine if t is not None])


def _sep_backward(ctx, grad):
    x, dw_weight, pw_weight, *present = ctx.saved_tensors
    it = iter(present)
    affine = [next(it) if has else None for has in ctx.has_affine]
    grads = torch.ops.fastseg._separable_conv2d_backward(
        grad.contiguous(), x, dw_weight, pw_weight, *affine, *ctx.geometry)
    g_affine = [g if has else None for g, has in zip(grads[3:], ctx.has_affine, strict=True)]
    return (*grads[:3], *g_affine) + (None,) * len(ctx.geometry)


torch.library.register_autograd("fastseg::separable_conv2d", _sep_backward, setup_context=_sep_setup)
