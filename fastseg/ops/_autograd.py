"""Autograd of fastseg's ops: each backward is its own op (``fastseg::_<op>_backward``).

The same registration serves the compiled op and its Triton twin; ``register_compiled()`` is
called by ``fastseg.ops`` once ``fastseg._C`` has loaded (its ops do not exist otherwise).
"""

from __future__ import annotations

import torch

_N_AFFINE = 4  # dw_scale, dw_shift, pw_scale, pw_shift


def _sep_setup(ctx, inputs, output):
    x, dw_weight, pw_weight, *affine = inputs[: 3 + _N_AFFINE]
    ctx.geometry = inputs[3 + _N_AFFINE:]  # stride, pad_beg, pad_end, dilation, dw_relu, relu
    ctx.has_affine = [t is not None for t in affine]
    # With a final ReLU the output is kept: its sign is the ReLU's mask, so the backward need not
    # recompute the pointwise GEMM (eager's ReLU keeps its output alive just the same).
    ctx.save_for_backward(x, dw_weight, pw_weight, *[t for t in affine if t is not None],
                          output if ctx.geometry[-1] else None)


def register_separable_conv2d_autograd(op: str, backward_op) -> None:
    """Autograd for ``op`` (separable_conv2d's schema) through ``backward_op``, which returns the
    grads of (x, dw_weight, pw_weight, dw_scale, dw_shift, pw_scale, pw_shift); absent affines
    come back as empty tensors and get None. The final ReLU's backward runs here, on the saved
    output, and ``backward_op`` gets relu=False."""

    def backward(ctx, grad):
        x, dw_weight, pw_weight, *present, out = ctx.saved_tensors
        it = iter(present)
        affine = [next(it) if has else None for has in ctx.has_affine]
        *geometry, relu = ctx.geometry
        grad = (torch.ops.aten.threshold_backward(grad, out, 0) if relu else grad).contiguous()
        grads = backward_op(grad, x, dw_weight, pw_weight, *affine, *geometry, False)
        g_affine = [g if has else None for g, has in zip(grads[3:], ctx.has_affine, strict=True)]
        return (*grads[:3], *g_affine) + (None,) * len(ctx.geometry)

    torch.library.register_autograd(op, backward, setup_context=_sep_setup)


def _pam_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _pam_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    return tuple(torch.ops.fastseg._position_attention_backward(grad_out.contiguous(), q, k, v, out, lse))


def _cam_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _cam_backward(ctx, grad_out):
    (x,) = ctx.saved_tensors
    return torch.ops.fastseg._channel_attention_backward(grad_out.contiguous(), x)


def _roi_align_setup(ctx, inputs, output):
    features, rois, _, _, *ctx.geometry = inputs
    ctx.input_shape = (features.shape[0], features.shape[2], features.shape[3])
    ctx.save_for_backward(rois)


def _roi_align_backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    g = torch.ops.fastseg._roi_align_backward(grad.contiguous(), rois, *ctx.input_shape, *ctx.geometry)
    return (g,) + (None,) * 6


def _roi_upsample_setup(ctx, inputs, output):
    roi_maps, rois, _, _, _, *ctx.geometry = inputs  # geometry: scale, sampling_ratio, aligned, mode
    ctx.pooled = (roi_maps.shape[2], roi_maps.shape[3])
    ctx.save_for_backward(rois)


def _roi_upsample_backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    g = torch.ops.fastseg._roi_upsample_backward(grad.contiguous(), rois, *ctx.pooled, *ctx.geometry)
    return (g,) + (None,) * 8


def _dense_crf_setup(ctx, inputs, output):
    unary, image, *ctx.params = inputs  # iterations, pos_sxy, pos_compat, bi_sxy, bi_srgb, bi_compat
    ctx.save_for_backward(unary, image)


def _dense_crf_backward(ctx, grad):
    """The backward re-runs the forward to recover the trajectory (storing it would keep
    iterations × the output alive between forward and backward)."""
    unary, image = ctx.saved_tensors
    g = torch.ops.fastseg._dense_crf_backward(grad.contiguous(), unary, image, *ctx.params)
    return (g,) + (None,) * 7


def register_esp_pyramid_autograd(op: str, backward_op) -> None:
    """Autograd for ``op`` (esp_pyramid's schema: x, weight, first_channels, dilations) through
    ``backward_op``, which returns the grads of (x, weight)."""

    def setup(ctx, inputs, output):
        x, weight, ctx.first, ctx.dilations = inputs
        ctx.save_for_backward(x, weight)

    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        gx, gw = backward_op(grad.contiguous(), x, weight, ctx.first, ctx.dilations)
        return gx, gw, None, None

    torch.library.register_autograd(op, backward, setup_context=setup)


def register_compiled() -> None:
    register_separable_conv2d_autograd("fastseg::separable_conv2d",
                                       torch.ops.fastseg._separable_conv2d_backward)
    torch.library.register_autograd("fastseg::position_attention", _pam_backward, setup_context=_pam_setup)
    torch.library.register_autograd("fastseg::channel_attention", _cam_backward, setup_context=_cam_setup)
    torch.library.register_autograd("fastseg::roi_align", _roi_align_backward, setup_context=_roi_align_setup)
    torch.library.register_autograd("fastseg::roi_upsample", _roi_upsample_backward,
                                    setup_context=_roi_upsample_setup)
    torch.library.register_autograd("fastseg::dense_crf", _dense_crf_backward, setup_context=_dense_crf_setup)
    register_esp_pyramid_autograd("fastseg::esp_pyramid", torch.ops.fastseg._esp_pyramid_backward)
