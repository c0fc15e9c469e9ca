"""Segmentation architectures on fastseg's fused layers: ``create_model(name, ...)``, ``list_models()``.

Each name maps to a builder function ``fastseg.models.<module>.<function>(num_classes=..., **kw)``
whose keyword arguments carry the paper's defaults. Modules are imported on first use, so a model
family's import cost (torchvision's ResNet, say) is paid only by those who build it.

Example::

    >>> from fastseg.models import create_model, list_models
    >>> model = create_model("deeplabv3plus", num_classes=21).eval()
    >>> model(torch.randn(1, 3, 513, 513))["out"].shape
    torch.Size([1, 21, 513, 513])
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

__all__ = ["TASKS", "create_model", "list_models"]

# name -> "module:builder" inside fastseg.models
_MODELS: dict[str, str] = {
    "unet": "unet:unet",
    "fcn32s": "fcn:fcn32s",
    "fcn16s": "fcn:fcn16s",
    "fcn8s": "fcn:fcn8s",
    "deeplabv2": "deeplab:deeplabv2",
    "deeplabv3": "deeplab:deeplabv3",
    "deeplabv3plus": "deeplab:deeplabv3plus",
    "pspnet": "pspnet:pspnet",
    "aunet": "aunet:aunet",
    "espnet_a": "espnet:espnet_a",
    "espnet_b": "espnet:espnet_b",
    "espnet_c": "espnet:espnet_c",
    "espnet": "espnet:espnet",
    "danet": "danet:danet",
    "solo": "solo:solo",
    "decoupled_solo": "solo:decoupled_solo",
    "solov2": "solo:solov2",
}
# The models that are not semantic (``forward(x) -> {"out": logits}``): torchvision's detection interface.
_TASKS: dict[str, str] = {"solo": "instance", "decoupled_solo": "instance", "solov2": "instance",
                          "aunet": "panoptic"}
TASKS = ("semantic", "instance", "panoptic")


def list_models(task: str | None = None) -> list[str]:
    """The names ``create_model`` accepts, sorted; ``task`` (``"semantic"``, ``"instance"`` or
    ``"panoptic"``) keeps those of one task."""
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS} or None, got {task!r}")
    return sorted(n for n in _MODELS if task is None or _TASKS.get(n, "semantic") == task)


def create_model(name: str, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """Build architecture ``name`` with ``num_classes`` outputs (None: the paper's, e.g. 21 for the
    PASCAL VOC models, 2 for U-Net); ``kwargs`` override the paper's defaults (``backbone``,
    ``output_stride``, ``atrous_rates``, ``aux_loss``, ``in_channels``, ...; see each builder's
    docstring). No weights are downloaded: ``backbone_weights=PATH`` loads a local checkpoint where a
    builder takes one, and ``model.load_state_dict`` works as usual."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    if num_classes is not None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        kwargs["num_classes"] = num_classes
    module, builder = _MODELS[name].split(":")
    return getattr(importlib.import_module(f"fastseg.models.{module}"), builder)(**kwargs)
