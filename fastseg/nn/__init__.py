"""nn.Modules on top of fastseg's fused ops."""

from fastseg.nn.attention import ChannelAttention, DANetHead, PositionAttention
from fastseg.nn.conv import SeparableConv2d

__all__ = ["ChannelAttention", "DANetHead", "PositionAttention", "SeparableConv2d"]
