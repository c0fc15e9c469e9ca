"""Pure-PyTorch reference of every fastseg op: the oracle of the tests and the ``reference``
backend. Written for clarity, not speed; every function runs on any device and dtype."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "channel_attention",
    "conv_out_size",
    "crf_features",
    "dense_crf",
    "dense_crf_exact",
    "dense_crf_pydensecrf",
    "dynamic_mask_head",
    "fixed_padding",
    "matrix_nms",
    "matrix_nms_boxes",
    "matrix_nms_boxes_decay",
    "matrix_nms_decay",
    "matrix_nms_finish",
    "matrix_nms_packed_decay",
    "pack_bits",
    "position_attention",
    "position_attention_sdpa",
    "roi_align",
    "roi_align_backward_torchvision",
    "roi_align_torchvision",
    "roi_upsample",
    "rois_to_tensor",
    "score_order",
    "separable_conv2d",
    "solov2_postprocess",
    "unpack_bits",
]


def fixed_padding(kernel_size: int, dilation: int, padding: str | int | tuple[int, int]) -> tuple[int, int]:
    """(pad_beg, pad_end) of each spatial side.

    ``"same"`` is DeepLab's fixed_padding: k_eff = k + (k-1)(d-1), pad_beg = (k_eff-1)//2,
    pad_end = k_eff-1-pad_beg (so stride 1 keeps the size); ``"valid"`` is no padding; an int
    pads both sides equally; a pair is (pad_beg, pad_end).
    """
    if isinstance(padding, str):
        if padding == "same":
            k_eff = kernel_size + (kernel_size - 1) * (dilation - 1)
            beg = (k_eff - 1) // 2
            return beg, k_eff - 1 - beg
        if padding == "valid":
            return 0, 0
        raise ValueError(f"padding must be 'same', 'valid', an int or a pair, got {padding!r}")
    if isinstance(padding, int) and not isinstance(padding, bool):
        beg = end = padding
    elif isinstance(padding, (tuple, list)) and len(padding) == 2 and all(isinstance(p, int) for p in padding):
        beg, end = padding
    else:
        raise ValueError(f"padding must be 'same', 'valid', an int or a pair, got {padding!r}")
    if beg < 0 or end < 0:
        raise ValueError(f"padding must be >= 0, got {padding!r}")
    return beg, end


def conv_out_size(n: int, pad_beg: int, pad_end: int, k: int, dilation: int, stride: int) -> int:
    """Output length of a k-tap, dilated, strided convolution over n inputs padded (beg, end)."""
    span = n + pad_beg + pad_end - ((k - 1) * dilation + 1)
    return 0 if span < 0 else span // stride + 1


def _affine_act(v: Tensor, scale: Tensor | None, shift: Tensor | None, relu: bool) -> Tensor:
    if scale is not None:
        v = v * scale.view(1, -1, 1, 1)
    if shift is not None:
        v = v + shift.view(1, -1, 1, 1)
    return F.relu(v) if relu else v


def separable_conv2d(
    x: Tensor,
    dw_weight: Tensor,
    pw_weight: Tensor,
    *,
    stride: int = 1,
    padding: str | int | tuple[int, int] = "same",
    dilation: int = 1,
    dw_scale: Tensor | None = None,
    dw_shift: Tensor | None = None,
    dw_relu: bool = False,
    pw_scale: Tensor | None = None,
    pw_shift: Tensor | None = None,
    relu: bool = False,
) -> Tensor:
    """Depthwise k×k (dilated) conv → affine (+ReLU) → pointwise 1×1 conv → affine (+ReLU)."""
    k = dw_weight.shape[-1]
    beg, end = fixed_padding(k, dilation, padding)
    x = F.pad(x, (beg, end, beg, end))
    if x.shape[-2] < (k - 1) * dilation + 1 or x.shape[-1] < (k - 1) * dilation + 1:
        # The kernel does not fit: an empty output, as the fused kernels return.
        ho = conv_out_size(x.shape[-2], 0, 0, k, dilation, stride)
        wo = conv_out_size(x.shape[-1], 0, 0, k, dilation, stride)
        return x.new_zeros(x.shape[0], pw_weight.shape[0], ho, wo) + 0 * pw_weight.sum() + 0 * x.sum()
    y = F.conv2d(x, dw_weight, stride=stride, dilation=dilation, groups=x.shape[1])
    y = _affine_act(y, dw_scale, dw_shift, dw_relu)
    z = F.conv2d(y, pw_weight)
    return _affine_act(z, pw_scale, pw_shift, relu)


def gamma_residual(out: Tensor, gamma: Tensor | None, residual: Tensor | None) -> Tensor:
    """DANet's attention epilogue: gamma·out + residual, each term optional."""
    if gamma is not None:
        out = gamma * out
    return out if residual is None else out + residual


def position_attention(q: Tensor, k: Tensor, v: Tensor, *, gamma: Tensor | None = None,
                       residual: Tensor | None = None) -> Tensor:
    """DANet position attention (PAM). q, k [B, Ck, H, W], v [B, C, H, W], N = H·W:
    energy = qᵀk [B, N, N] (no 1/√d scaling), A = softmax over keys, out = v·Aᵀ [B, C, H, W];
    returns gamma·out + residual (each optional). Materialises the N×N matrix."""
    b, c, h, w = v.shape
    energy = torch.bmm(q.flatten(2).transpose(1, 2), k.flatten(2))
    attn = torch.softmax(energy, dim=-1)
    out = torch.bmm(v.flatten(2), attn.transpose(1, 2)).view(b, c, h, w)
    return gamma_residual(out, gamma, residual)


def position_attention_sdpa(q: Tensor, k: Tensor, v: Tensor, *, gamma: Tensor | None = None,
                            residual: Tensor | None = None) -> Tensor:
    """position_attention through ``F.scaled_dot_product_attention(scale=1)``: PyTorch's own
    attention kernels (one head of width Ck for q/k and C for v), the second baseline of the
    benchmarks."""
    b, c, h, w = v.shape

    def heads(t: Tensor) -> Tensor:  # [B, D, H, W] -> [B, 1, N, D]
        return t.flatten(2).transpose(1, 2).unsqueeze(1)

    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), scale=1.0)
    return gamma_residual(out.squeeze(1).transpose(1, 2).reshape(b, c, h, w), gamma, residual)


def channel_attention(x: Tensor, *, gamma: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
    """DANet channel attention (CAM). x [B, C, H, W]: E = X·Xᵀ [B, C, C],
    A = softmax(rowmax(E) − E), out = A·X [B, C, H, W]; returns gamma·out + residual."""
    b, c, h, w = x.shape
    flat = x.flatten(2)
    energy = torch.bmm(flat, flat.transpose(1, 2))
    attn = torch.softmax(energy.amax(dim=-1, keepdim=True) - energy, dim=-1)
    out = torch.bmm(attn, flat).view(b, c, h, w)
    return gamma_residual(out, gamma, residual)


def rois_to_tensor(rois: Tensor | list[Tensor]) -> Tensor:
    """RoIs as one [K, 5] tensor (batch_idx, x1, y1, x2, y2); a list of per-image [Li, 4] boxes
    gets its batch indices from its position (torchvision's convention)."""
    if isinstance(rois, Tensor):
        return rois
    idx = [torch.full((len(b), 1), i, dtype=b.dtype, device=b.device) for i, b in enumerate(rois)]
    return torch.cat([torch.cat(idx), torch.cat(list(rois))], dim=1)


def _axis_interp(start: Tensor, size: Tensor, pooled: int, sampling_ratio: int, length: int,
                 aunet: bool) -> tuple[Tensor, Tensor]:
    """RoIAlign's sampling along one axis as a matrix: M[k, p, i] = sum over the bin's samples of the
    bilinear weight of input row i (torchvision's grid, clamping and out-of-range rule). Bilinear
    weights factor into a y part and an x part, and so do AUNet's 1/Σw² normaliser and the
    validity of a sample, so roi_align(F)[k] = M_y[k] F M_xᵀ[k] / count[k] exactly.
    Returns (M [K, pooled, length], grid [K])."""
    k = start.shape[0]
    bin_size = size / pooled
    grid = (torch.full_like(size, sampling_ratio) if sampling_ratio > 0 else torch.ceil(size / pooled)).long()
    g_max = max(int(grid.max()) if k else 1, 1)
    p = torch.arange(pooled, dtype=start.dtype, device=start.device).view(1, -1, 1)
    g = torch.arange(g_max, device=start.device).view(1, 1, -1)
    pos = (start.view(-1, 1, 1) + p * bin_size.view(-1, 1, 1)
           + (g + 0.5).to(start.dtype) * (bin_size / grid.clamp(min=1)).view(-1, 1, 1))
    used = (g < grid.view(-1, 1, 1)) & (pos >= -1.0) & (pos <= length)
    pos = pos.clamp(min=0)
    low = pos.floor().long()
    at_end = low >= length - 1
    low = torch.where(at_end, length - 1, low)
    high = torch.where(at_end, length - 1, low + 1)
    frac = torch.where(at_end, torch.zeros_like(pos), pos - low.to(pos.dtype))
    w_low, w_high = 1 - frac, frac
    if aunet:
        norm = w_low.square() + w_high.square()
        w_low, w_high = w_low / norm, w_high / norm
    mat = torch.zeros(k * pooled, length, dtype=start.dtype, device=start.device)
    for idx, w in ((low, w_low), (high, w_high)):
        mat.scatter_add_(1, idx.view(k * pooled, g_max), (w * used).view(k * pooled, g_max))
    return mat.view(k, pooled, length), grid


def _roi_interp(rois: Tensor, output_size: tuple[int, int], height: int, width: int, spatial_scale: float,
                sampling_ratio: int, aligned: bool, aunet: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(M_y [K, ph, H], M_x [K, pw, W], scale [K]): the per-RoI factor is 1/count, or 1 for AUNet."""
    offset = 0.5 if aligned else 0.0
    box = rois[:, 1:] * spatial_scale - offset
    size = box[:, 2:] - box[:, :2]
    if not aligned:
        size = size.clamp(min=1.0)
    my, gy = _axis_interp(box[:, 1], size[:, 1], output_size[0], sampling_ratio, height, aunet)
    mx, gx = _axis_interp(box[:, 0], size[:, 0], output_size[1], sampling_ratio, width, aunet)
    scale = torch.ones_like(size[:, 0]) if aunet else 1.0 / (gy * gx).clamp(min=1).to(rois.dtype)
    return my, mx, scale


def roi_align(features: Tensor, rois: Tensor | list[Tensor], output_size: int | tuple[int, int], *,
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """torchvision.ops.roi_align's function in plain PyTorch: [N, C, H, W] features, RoIs [K, 5]
    (or a list of [Li, 4]) → [K, C, ph, pw]."""
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    rois = rois_to_tensor(rois).to(features.dtype)
    my, mx, scale = _roi_interp(rois, (ph, pw), features.shape[2], features.shape[3], spatial_scale,
                                sampling_ratio, aligned, aunet=False)
    picked = features[rois[:, 0].long()]
    return torch.einsum("kph,kchw,kqw->kcpq", my, picked, mx) * scale.view(-1, 1, 1, 1)


_CHUNK_ELEMENTS = 1 << 25  # roi_upsample's per-RoI maps in flight at once (128 MiB in fp32)


def roi_upsample(roi_maps: Tensor, rois: Tensor | list[Tensor], output_size: tuple[int, int], *,
                 batch_size: int | None = None, spatial_scale: float = 1.0, sampling_ratio: int = -1,
                 aligned: bool = False, mode: str = "aunet") -> Tensor:
    """AUNet's RoIUpsample: [K, C, m, m'] per-RoI maps back onto [N, C, H, W] on RoIAlign's sample
    grid. ``mode="adjoint"``: the transpose of roi_align (value·w/count per sample); ``"aunet"``: each
    sample's bilinear weights renormalised by 1/Σw², no /count. Overlapping RoIs sum."""
    rois = rois_to_tensor(rois).to(roi_maps.dtype)
    height, width = output_size
    if batch_size is None:
        batch_size = int(rois[:, 0].max()) + 1 if len(rois) else 0
    my, mx, scale = _roi_interp(rois, roi_maps.shape[2:], height, width, spatial_scale, sampling_ratio, aligned,
                                aunet=mode == "aunet")
    out = roi_maps.new_zeros(batch_size, roi_maps.shape[1], height, width)
    idx = rois[:, 0].long()
    # The dense per-RoI maps [K, C, H, W] would not fit for detection loads: RoIs go in chunks.
    chunk = max(1, _CHUNK_ELEMENTS // max(1, out[0].numel()))
    for s in range(0, len(rois), chunk):
        e = s + chunk
        per_roi = torch.einsum("kph,kcpq,kqw->kchw", my[s:e], roi_maps[s:e], mx[s:e]) * scale[s:e].view(-1, 1, 1, 1)
        out = out.index_add(0, idx[s:e], per_roi)
    return out


def roi_align_torchvision(features: Tensor, rois: Tensor, output_size: tuple[int, int], *, spatial_scale: float = 1.0,
                          sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """torchvision.ops.roi_align itself: the baseline the benchmarks measure against."""
    import torchvision

    return torchvision.ops.roi_align(features, rois, output_size, spatial_scale=spatial_scale,
                                     sampling_ratio=sampling_ratio, aligned=aligned)


def roi_align_backward_torchvision(grad: Tensor, rois: Tensor, input_shape: tuple[int, int, int, int], *,
                                   spatial_scale: float = 1.0, sampling_ratio: int = -1,
                                   aligned: bool = False) -> Tensor:
    """torchvision's roi_align input gradient (its backward kernel, called directly): the baseline of
    ``roi_upsample(mode="adjoint")``, which computes the same function."""
    import torchvision  # noqa: F401  (registers torch.ops.torchvision)

    n, c, h, w = input_shape
    return torch.ops.torchvision._roi_align_backward(grad, rois, spatial_scale, grad.shape[2], grad.shape[3], n, c,
                                                     h, w, sampling_ratio, aligned)


# ---- Matrix NMS (SOLOv2; mmdet's mask_matrix_nms) ------------------------------------------------


def _decay_from_iou(iou: Tensor, labels: Tensor, kernel: str, sigma: float) -> Tensor:
    """mmdet's decay of the masks in score order from their float64 IoU matrix: only the upper
    triangle of same-label pairs decays; decay_j = min_i f(iou_ij) / f(comp_i) with comp_i the max IoU of
    mask i with a higher-scored mask. A mask with f(comp_i) = 0 (a duplicate, linear kernel) applies no
    decay instead of mmdet's 0/0."""
    same = labels.view(-1, 1) == labels.view(1, -1)
    decay_iou = (iou * same).triu(diagonal=1)
    comp = decay_iou.max(dim=0).values

    def f(x: Tensor) -> Tensor:
        return torch.exp(-sigma * x.square()) if kernel == "gaussian" else 1 - x

    den = f(comp).view(-1, 1)
    ratio = torch.where(den > 0, f(decay_iou) / den, torch.ones_like(decay_iou))
    return ratio.min(dim=0).values


def _iou(inter: Tensor, area: Tensor) -> Tensor:
    union = area.view(-1, 1) + area.view(1, -1) - inter
    return torch.where(union > 0, inter / union, torch.zeros_like(union))


def matrix_nms_decay(masks: Tensor, labels: Tensor, order: Tensor, mask_area: Tensor | None, kernel: str,
                     sigma: float) -> Tensor:
    """Decay factors (float64) of masks[order] the way mmdet computes them: a float copy of the masks
    [n, H*W] and a matmul for the intersections."""
    n = order.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.float64, device=masks.device)
    flat = masks[order].reshape(n, -1).float()
    inter = (flat @ flat.T).double()
    area = flat.sum(1).double() if mask_area is None else mask_area[order].double()
    return _decay_from_iou(_iou(inter, area), labels[order], kernel, sigma)


def _box_iou(a: Tensor, b: Tensor) -> Tensor:
    wh = (torch.minimum(a[:, None, 2:], b[None, :, 2:]) - torch.maximum(a[:, None, :2], b[None, :, :2])).clamp(min=0)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(1)
    inter = wh.prod(2)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union, torch.zeros_like(union))


def matrix_nms_boxes_decay(boxes: Tensor, labels: Tensor, order: Tensor, kernel: str, sigma: float) -> Tensor:
    """Decay factors (float64) of boxes[order], one class at a time (Paddle's matrix_nms loops)."""
    boxes, labels = boxes[order].double(), labels[order]
    decay = torch.ones(len(order), dtype=torch.float64, device=boxes.device)
    for label in labels.unique():
        idx = (labels == label).nonzero().squeeze(1)
        decay[idx] = _decay_from_iou(_box_iou(boxes[idx], boxes[idx]), labels[idx], kernel, sigma)
    return decay


def score_order(scores: Tensor, nms_pre: int) -> Tensor:
    """Indices by descending score, ties by input index, the first ``nms_pre`` when > 0."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:nms_pre] if nms_pre > 0 else order


def matrix_nms_finish(scores: Tensor, labels: Tensor, items: Tensor, order: Tensor, decay: Tensor,
                      filter_thr: float, max_num: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Decayed scores, the ``filter_thr`` filter (when > 0), descending order (ties by input index), the
    first ``max_num`` (when > 0): (scores, labels, items, keep_inds) with keep_inds into the input."""
    new = (scores[order].double() * decay).to(scores.dtype)
    if filter_thr > 0:
        keep = new >= filter_thr
        new, order = new[keep], order[keep]
    by_index = torch.argsort(order)
    new, order = new[by_index], order[by_index]
    final = torch.sort(new, descending=True, stable=True).indices
    if max_num > 0:
        final = final[:max_num]
    keep_inds = order[final]
    return new[final], labels[keep_inds], items[keep_inds], keep_inds


def matrix_nms(masks: Tensor, labels: Tensor, scores: Tensor, *, kernel: str = "gaussian", sigma: float = 2.0,
               filter_thr: float = -1, nms_pre: int = -1, max_num: int = -1,
               mask_area: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """mmdet's mask_matrix_nms in plain PyTorch (masks bool/uint8/float [n, H, W]; float masks count
    where > 0.5): (scores, labels, masks, keep_inds)."""
    binary = masks if masks.dtype in (torch.bool, torch.uint8) else masks > 0.5
    order = score_order(scores, nms_pre)
    decay = matrix_nms_decay(binary, labels, order, mask_area, kernel, sigma)
    return matrix_nms_finish(scores, labels, masks, order, decay, filter_thr, max_num)


def matrix_nms_boxes(boxes: Tensor, labels: Tensor, scores: Tensor, *, kernel: str = "gaussian",
                     sigma: float = 2.0, filter_thr: float = -1, nms_pre: int = -1,
                     max_num: int = -1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Matrix NMS of boxes (PP-YOLO / Paddle), per-class loops: (scores, labels, boxes, keep_inds)."""
    order = score_order(scores, nms_pre)
    decay = matrix_nms_boxes_decay(boxes, labels, order, kernel, sigma)
    return matrix_nms_finish(scores, labels, boxes, order, decay, filter_thr, max_num)


# ---- SOLOv2 dynamic mask head and bit-packed masks ------------------------------------------------


def pack_bits(binary: Tensor) -> Tensor:
    """bool [n, P] -> int64 [n, ceil(P/64)]: bit b of word w is pixel 64·w + b; the padding bits are 0."""
    n, p = binary.shape
    words = (p + 63) // 64
    padded = F.pad(binary.to(torch.int64), (0, words * 64 - p)).view(n, words, 64)
    # Distinct powers of two: the sum never carries, so bit 63 (the sign) needs no care.
    return (padded << torch.arange(64, device=binary.device)).sum(-1)


def unpack_bits(bits: Tensor, num_pixels: int) -> Tensor:
    """int64 [n, words] -> bool [n, num_pixels]: the inverse of :func:`pack_bits`."""
    shifts = torch.arange(64, device=bits.device)
    return ((bits.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :num_pixels]


def dynamic_mask_head(kernels: Tensor, features: Tensor, mask_thr: float) -> tuple[Tensor, Tensor, Tensor]:
    """SOLOv2's mask prediction the way mmdet writes it: the n float masks sigmoid(kernels [n, E] ·
    features [E, H, W]) in the input dtype, thresholded (strictly greater), their pixel counts and the
    mean probability inside each mask (0 for an empty one, accumulated in float32 or float64).
    Returns (bit-packed masks int64 [n, ceil(H·W/64)], areas float32 [n], maskness [n] in the input dtype)."""
    prob = torch.sigmoid(kernels @ features.reshape(features.shape[0], -1))
    binary = prob > mask_thr
    count = binary.sum(1)
    acc = torch.float64 if prob.dtype == torch.float64 else torch.float32
    inside = (prob.to(acc) * binary).sum(1)
    maskness = torch.where(count > 0, inside / count.clamp(min=1).to(acc), torch.zeros_like(inside))
    return pack_bits(binary), count.to(torch.float32), maskness.to(prob.dtype)


def matrix_nms_packed_decay(bits: Tensor, labels: Tensor, order: Tensor, mask_area: Tensor, kernel: str,
                            sigma: float) -> Tensor:
    """:func:`matrix_nms_decay` of bit-packed masks int64 [n0, words] with their areas [n0] (unpacked to a
    float copy, mmdet's way)."""
    masks = unpack_bits(bits, bits.shape[1] * 64).unsqueeze(1)  # [n0, 1, words·64]
    return matrix_nms_decay(masks, labels, order, mask_area, kernel, sigma)


def solov2_postprocess(kernels: Tensor, features: Tensor, labels: Tensor, scores: Tensor, strides: Tensor, *,
                       mask_thr: float = 0.5, **nms_kw) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SOLOv2's test-time mask post-processing of one image as mmdet writes it (``_get_results_single``):
    the n soft masks sigmoid(kernels [n, E] · features [E, H, W]), threshold, areas, the area > stride
    filter, maskness rescoring, Matrix NMS of the float masks (``nms_kw``: matrix_nms's keywords), the
    kept soft masks. Returns (scores, labels, keep_inds into the n candidates, soft masks [k, H, W])."""
    e, h, w = features.shape
    soft = torch.sigmoid(kernels @ features.reshape(e, h * w)).view(-1, h, w)
    binary = soft > mask_thr
    area = binary.sum((1, 2)).float()
    keep = (area > strides).nonzero().squeeze(1)
    soft, binary, area = soft[keep], binary[keep], area[keep]
    maskness = (soft * binary).sum((1, 2)) / area
    out_scores, out_labels, _, keep_inds = matrix_nms(binary, labels[keep], scores[keep] * maskness,
                                                      mask_area=area, **nms_kw)
    return out_scores, out_labels, keep[keep_inds], soft[keep_inds]


# ---- Dense CRF (Krähenbühl & Koltun; pydensecrf semantics) ----------------------------------------


def crf_features(image: Tensor, pos_sxy: float, bi_sxy: float, bi_srgb: float) -> tuple[Tensor, Tensor]:
    """Per-pixel features of one image [3, H, W] (0..255), pixels row-major: (x/pos_sxy, y/pos_sxy) for
    the smoothness kernel and (x/bi_sxy, y/bi_sxy, r/bi_srgb, g/bi_srgb, b/bi_srgb) for the appearance one."""
    _, h, w = image.shape
    y, x = torch.meshgrid(torch.arange(h, device=image.device, dtype=image.dtype),
                          torch.arange(w, device=image.device, dtype=image.dtype), indexing="ij")
    xy = torch.stack([x.reshape(-1), y.reshape(-1)], 1)
    rgb = image.reshape(3, -1).T
    return xy / pos_sxy, torch.cat([xy / bi_sxy, rgb / bi_srgb], 1)


class _Lattice:
    """The permutohedral lattice of Adams, Baek & Davis (2010) over features [P, d], built with tensor ops:
    each point is lifted onto the plane sum = 0 of Z^(d+1) (scaled so that the lattice blur approximates
    exp(-|f_i - f_j|² / 2)), splats onto the d+1 vertices of its enclosing simplex with barycentric weights;
    ``filter`` = splat, blur with [1/2, 1, 1/2] along each of the d+1 lattice directions, slice."""

    def __init__(self, feats: Tensor) -> None:
        p, d = feats.shape
        dev, dt = feats.device, feats.dtype
        i = torch.arange(d, device=dev, dtype=dt)
        cf = feats * (math.sqrt(2.0 / 3.0) * (d + 1) / torch.sqrt((i + 1) * (i + 2)))
        # elevated[0] = sum(cf); elevated[j] = sum(cf[j:]) - j * cf[j - 1] for j >= 1
        suffix = cf.flip(1).cumsum(1).flip(1)  # suffix[:, k] = sum(cf[:, k:])
        elev = torch.cat([suffix[:, :1], torch.cat([suffix[:, 1:], cf.new_zeros(p, 1)], 1) - i.add(1) * cf], 1)
        # the nearest remainder-0 lattice point (coordinates multiple of d + 1), ties down
        down = torch.floor(elev / (d + 1)) * (d + 1)
        up = torch.ceil(elev / (d + 1)) * (d + 1)
        rem0 = torch.where(up - elev < elev - down, up, down)
        total = torch.round(rem0.sum(1) / (d + 1)).long()
        diff = elev - rem0
        # rank of each coordinate by diff, decreasing; ties: the lower index ranks first
        j_idx = torch.arange(d + 1, device=dev)
        greater = diff.unsqueeze(1) > diff.unsqueeze(2)  # [p, i, j]: diff_j > diff_i
        equal_before = (diff.unsqueeze(1) == diff.unsqueeze(2)) & (j_idx.view(1, 1, -1) < j_idx.view(1, -1, 1))
        rank = (greater | equal_before).sum(2)
        # walk to the simplex whose remainder-0 vertex makes the coordinates sum to 0
        t = total.view(-1, 1)
        pos_fix = (t > 0) & (rank >= d + 1 - t)
        neg_fix = (t < 0) & (rank < -t)
        rank = torch.where(pos_fix, rank - (d + 1 - t), torch.where(neg_fix, rank + (d + 1 + t), rank + t))
        rem0 = torch.where(pos_fix, rem0 - (d + 1), torch.where(neg_fix, rem0 + (d + 1), rem0))
        # barycentric weights of the d + 1 vertices
        v = (elev - rem0) / (d + 1)
        bary = cf.new_zeros(p, d + 2)
        bary.scatter_add_(1, d - rank, v)
        bary.scatter_add_(1, d + 1 - rank, -v)
        bary[:, 0] += 1 + bary[:, d + 1]
        self.weights = bary[:, : d + 1]  # [p, d + 1]
        # vertex r of the simplex: rem0 + r where rank <= d - r, else rem0 + r - (d + 1) (first d coordinates)
        r = torch.arange(d + 1, device=dev).view(1, -1, 1)
        offset = torch.where(rank[:, :d].unsqueeze(1) <= d - r, r, r - (d + 1))
        keys = (rem0[:, :d].round().long().unsqueeze(1) + offset).reshape(-1, d)  # [p * (d + 1), d]
        # lattice vertices, and the neighbours of each along each direction
        step = torch.full((d + 1, d), -1, device=dev, dtype=torch.long)
        step[torch.arange(d), torch.arange(d)] = d  # direction j: +d on coordinate j, -1 on the others
        verts, self.index = torch.unique(keys, dim=0, return_inverse=True)
        m = len(verts)
        near = torch.cat([verts.unsqueeze(0) + step.unsqueeze(1), verts.unsqueeze(0) - step.unsqueeze(1)])
        all_keys, inverse = torch.unique(torch.cat([verts, near.reshape(-1, d)]), dim=0, return_inverse=True)
        vertex_of = torch.full((len(all_keys),), m, device=dev, dtype=torch.long)  # m: the zero row
        vertex_of[inverse[:m]] = torch.arange(m, device=dev)
        self.neighbours = vertex_of[inverse[m:]].view(2, d + 1, m)
        self.index = self.index.view(p, d + 1)
        self.size = m

    def filter(self, values: Tensor) -> Tensor:
        """values [P, C] → [P, C], ≈ sum_j exp(-|f_i - f_j|² / 2) values_j (up to a constant factor)."""
        c = values.shape[1]
        grid = values.new_zeros(self.size + 1, c)
        grid.index_add_(0, self.index.reshape(-1), (self.weights.unsqueeze(2) * values.unsqueeze(1)).reshape(-1, c))
        for j in range(self.neighbours.shape[1]):
            blurred = grid[:-1] + 0.5 * (grid[self.neighbours[0, j]] + grid[self.neighbours[1, j]])
            grid = torch.cat([blurred, grid[-1:]])
        return (grid[self.index] * self.weights.unsqueeze(2)).sum(1)


def _mean_field(unary: Tensor, filters: list[tuple[float, Callable[[Tensor], Tensor]]], iterations: int) -> Tensor:
    """pydensecrf's inference on one image: unary [C, P]; filters: (compat, normalised filter of [P, C])."""
    q = torch.softmax(-unary, 0)
    for _ in range(iterations):
        message = sum(compat * filt(q.T).T for compat, filt in filters)
        q = torch.softmax(-unary + message, 0)  # Potts: labels the neighbours hold gain
    return q


def _symmetric(filt: Callable[[Tensor], Tensor], p: int, like: Tensor) -> Callable[[Tensor], Tensor]:
    """D^-1/2 K D^-1/2 with D = K 1 (the filter's own row sums: its constant factors cancel)."""
    norm = (filt(like.new_ones(p, 1)) + 1e-20).rsqrt()
    return lambda v: norm * filt(norm * v)


def dense_crf(unary: Tensor, image: Tensor, *, iterations: int = 5, pos_sxy: float = 3.0, pos_compat: float = 3.0,
              bi_sxy: float = 80.0, bi_srgb: float = 13.0, bi_compat: float = 10.0) -> Tensor:
    """Mean-field inference of the fully connected CRF (pydensecrf's DenseCRF2D with a Gaussian and a
    bilateral Potts kernel, symmetric normalisation), kernels filtered with the permutohedral lattice.
    unary [N, C, H, W] energies, image [N, 3, H, W] in 0..255 (the unary's dtype) → Q [N, C, H, W]."""
    n, c, h, w = unary.shape
    out = []
    for b in range(n):
        pos, bil = crf_features(image[b].to(unary.dtype), pos_sxy, bi_sxy, bi_srgb)
        filters = []
        for compat, feats in ((pos_compat, pos), (bi_compat, bil)):
            lattice = _Lattice(feats)
            filters.append((compat, _symmetric(lattice.filter, h * w, unary)))
        out.append(_mean_field(unary[b].reshape(c, -1), filters, iterations).view(c, h, w))
    return torch.stack(out) if out else unary.new_zeros(unary.shape)


def dense_crf_exact(unary: Tensor, image: Tensor, *, iterations: int = 5, pos_sxy: float = 3.0,
                    pos_compat: float = 3.0, bi_sxy: float = 80.0, bi_srgb: float = 13.0,
                    bi_compat: float = 10.0) -> Tensor:
    """:func:`dense_crf` with the exact Gaussian kernels (an O((HW)²) matrix each: tiny images only)."""
    n, c, h, w = unary.shape
    out = []
    for b in range(n):
        pos, bil = crf_features(image[b].to(unary.dtype), pos_sxy, bi_sxy, bi_srgb)
        filters = []
        for compat, feats in ((pos_compat, pos), (bi_compat, bil)):
            k = torch.exp(-0.5 * torch.cdist(feats, feats).square())
            filters.append((compat, _symmetric(lambda v, k=k: k @ v, h * w, unary)))
        out.append(_mean_field(unary[b].reshape(c, -1), filters, iterations).view(c, h, w))
    return torch.stack(out) if out else unary.new_zeros(unary.shape)


def dense_crf_pydensecrf(unary: Tensor, image: Tensor, *, iterations: int = 5, pos_sxy: float = 3.0,
                         pos_compat: float = 3.0, bi_sxy: float = 80.0, bi_srgb: float = 13.0,
                         bi_compat: float = 10.0) -> Tensor:
    """pydensecrf itself (CPU, float32, one image at a time): the baseline the benchmarks measure against.
    unary [N, C, H, W], image [N, 3, H, W] in 0..255 → Q [N, C, H, W] (unary's dtype and device)."""
    import numpy as np
    import pydensecrf.densecrf as dcrf

    n, c, h, w = unary.shape
    out = []
    for b in range(n):
        crf = dcrf.DenseCRF2D(w, h, c)
        crf.setUnaryEnergy(np.ascontiguousarray(unary[b].reshape(c, -1).detach().cpu().numpy(), dtype=np.float32))
        crf.addPairwiseGaussian(sxy=pos_sxy, compat=pos_compat)
        rgb = image[b].detach().round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        crf.addPairwiseBilateral(sxy=bi_sxy, srgb=bi_srgb, rgbim=np.ascontiguousarray(rgb), compat=bi_compat)
        out.append(torch.from_numpy(np.array(crf.inference(iterations), dtype=np.float32)).view(c, h, w))
    return torch.stack(out).to(device=unary.device, dtype=unary.dtype) if out else torch.zeros_like(unary)
