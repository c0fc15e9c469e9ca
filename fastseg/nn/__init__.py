"""nn.Modules on top of fastseg's fused ops."""

from fastseg.nn.attention import ChannelAttention, DANetHead, PositionAttention
from fastseg.nn.conv import SeparableConv2d
from fastseg.nn.crf import DenseCRF
from fastseg.nn.roi import RoIAlign, RoIUpsample

__all__ = [
    "ChannelAttention",
    "DANetHead",
    "DenseCRF",
    "PositionAttention",
    "RoIAlign",
    "RoIUpsample",
    "SeparableConv2d",
]
