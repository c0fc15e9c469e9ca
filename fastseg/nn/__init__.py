"""nn.Modules on top of fastseg's fused ops."""

from fastseg.nn.attention import ChannelAttention, DANetHead, PositionAttention
from fastseg.nn.conv import SeparableConv2d
from fastseg.nn.crf import DenseCRF
from fastseg.nn.fuse import FuseReport, fuse_modules
from fastseg.nn.heads import ASPP, ASPPL, AuxHead, DeepLabV3PlusDecoder, PyramidPooling
from fastseg.nn.roi import RoIAlign, RoIUpsample

__all__ = [
    "ASPP",
    "ASPPL",
    "AuxHead",
    "ChannelAttention",
    "DANetHead",
    "DeepLabV3PlusDecoder",
    "DenseCRF",
    "FuseReport",
    "PositionAttention",
    "PyramidPooling",
    "RoIAlign",
    "RoIUpsample",
    "SeparableConv2d",
    "fuse_modules",
]
