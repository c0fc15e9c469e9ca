"""Fake (meta) kernels of the compiled ops, for torch.compile and FakeTensor tracing."""

from __future__ import annotations

import torch

from fastseg.ops._reference import conv_out_size


@torch.library.register_fake("fastseg::separable_conv2d")
def _separable_conv2d_fake(x, dw_weight, pw_weight, dw_scale, dw_shift, pw_scale, pw_shift,
                           stride, pad_beg, pad_end, dilation, dw_relu, relu):
    k = dw_weight.shape[-1]
    ho = conv_out_size(x.shape[2], pad_beg, pad_end, k, dilation, stride)
    wo = conv_out_size(x.shape[3], pad_beg, pad_end, k, dilation, stride)
    return x.new_empty((x.shape[0], pw_weight.shape[0], ho, wo))


@torch.library.register_fake("fastseg::_separable_conv2d_backward")
def _separable_conv2d_backward_fake(grad_out, x, dw_weight, pw_weight, dw_scale, dw_shift,
                                    pw_scale, pw_shift, stride, pad_beg, pad_end, dilation,
                                    dw_relu, relu):
    def like(p):
        return x.new_empty((0,)) if p is None else torch.empty_like(p, memory_format=torch.contiguous_format)

    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(dw_weight, memory_format=torch.contiguous_format),
            torch.empty_like(pw_weight, memory_format=torch.contiguous_format),
            like(dw_scale), like(dw_shift), like(pw_scale), like(pw_shift))


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("fastseg::position_attention")
def _position_attention_fake(q, k, v):
    b, _, h, w = v.shape
    return (torch.empty_like(v, memory_format=torch.contiguous_format),
            q.new_empty((b, h * w), dtype=_opmath(q.dtype)))


@torch.library.register_fake("fastseg::_position_attention_backward")
def _position_attention_backward_fake(grad_out, q, k, v, out, lse):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


@torch.library.register_fake("fastseg::channel_attention")
def _channel_attention_fake(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("fastseg::_channel_attention_backward")
def _channel_attention_backward_fake(grad_out, x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("fastseg::roi_align")
def _roi_align_fake(features, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned):
    return features.new_empty((rois.shape[0], features.shape[1], pooled_h, pooled_w))


@torch.library.register_fake("fastseg::_roi_align_backward")
def _roi_align_backward_fake(grad, rois, batch_size, height, width, spatial_scale, sampling_ratio, aligned):
    return grad.new_empty((batch_size, grad.shape[1], height, width))


@torch.library.register_fake("fastseg::roi_upsample")
def _roi_upsample_fake(roi_maps, rois, batch_size, height, width, spatial_scale, sampling_ratio, aligned, mode):
    return roi_maps.new_empty((batch_size, roi_maps.shape[1], height, width))


@torch.library.register_fake("fastseg::_roi_upsample_backward")
def _roi_upsample_backward_fake(grad, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, mode):
    return grad.new_empty((rois.shape[0], grad.shape[1], pooled_h, pooled_w))


@torch.library.register_fake("fastseg::matrix_nms_decay")
def _matrix_nms_decay_fake(masks, labels, order, mask_area, kernel, sigma):
    return order.new_empty(order.shape, dtype=torch.float64)


@torch.library.register_fake("fastseg::matrix_nms_boxes_decay")
def _matrix_nms_boxes_decay_fake(boxes, labels, order, kernel, sigma):
    return order.new_empty(order.shape, dtype=torch.float64)


@torch.library.register_fake("fastseg::dense_crf")
def _dense_crf_fake(unary, image, iterations, pos_sxy, pos_compat, bi_sxy, bi_srgb, bi_compat):
    return torch.empty_like(unary)


@torch.library.register_fake("fastseg::_dense_crf_backward")
def _dense_crf_backward_fake(grad, unary, image, iterations, pos_sxy, pos_compat, bi_sxy, bi_srgb, bi_compat):
    return torch.empty_like(unary)


@torch.library.register_fake("fastseg::dynamic_mask_head")
def _dynamic_mask_head_fake(kernels, features, mask_thr):
    n, words = kernels.shape[0], (features.shape[1] * features.shape[2] + 63) // 64
    return (kernels.new_empty((n, words), dtype=torch.int64), kernels.new_empty((n,), dtype=torch.float32),
            kernels.new_empty((n,)))


@torch.library.register_fake("fastseg::matrix_nms_packed_decay")
def _matrix_nms_packed_decay_fake(masks, labels, order, mask_area, kernel, sigma):
    return order.new_empty(order.shape, dtype=torch.float64)
