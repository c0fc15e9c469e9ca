"""nn.Modules on top of fastseg's fused ops."""

from fastseg.nn.conv import SeparableConv2d

__all__ = ["SeparableConv2d"]
