"""fastseg's functional API: fused ops with a ``backend=`` argument on each.

``available_backends()`` lists the backends usable now, fastest first; ``backend_status()`` says why
a missing one is missing; ``use_backend(name)`` switches every op inside a ``with`` block.
"""

from fastseg import _extension
from fastseg.ops._backend import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    backend_status,
    use_backend,
)
from fastseg.ops.attention import channel_attention, position_attention
from fastseg.ops.crf import dense_crf
from fastseg.ops.nms import matrix_nms, matrix_nms_batched, matrix_nms_boxes, matrix_nms_packed
from fastseg.ops.roi import roi_align, roi_upsample
from fastseg.ops.separable_conv import separable_conv2d
from fastseg.ops.solo import DynamicMasks, dynamic_mask_head, unpack_masks

if _extension.has_ops():
    # Registered only when fastseg._C loaded: their ops do not exist otherwise.
    from fastseg.ops import _autograd, _meta  # noqa: F401

    _autograd.register_compiled()

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "DynamicMasks",
    "available_backends",
    "backend_status",
    "channel_attention",
    "dense_crf",
    "dynamic_mask_head",
    "matrix_nms",
    "matrix_nms_batched",
    "matrix_nms_boxes",
    "matrix_nms_packed",
    "position_attention",
    "roi_align",
    "roi_upsample",
    "separable_conv2d",
    "unpack_masks",
    "use_backend",
]
