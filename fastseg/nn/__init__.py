"""nn.Modules on top of fastseg's fused ops."""

from fastseg.nn.attention import ChannelAttention, DANetHead, PositionAttention
from fastseg.nn.blocks import ConvGNReLU, add_coords, conv_gn_stack, coord_channels
from fastseg.nn.conv import SeparableConv2d
from fastseg.nn.crf import DenseCRF
from fastseg.nn.esp import ESPModule
from fastseg.nn.fuse import FuseReport, fuse_modules
from fastseg.nn.heads import ASPP, ASPPL, AuxHead, DeepLabV3PlusDecoder, PyramidPooling
from fastseg.nn.roi import MultiScaleRoIAlign, RoIAlign, RoIUpsample

__all__ = [
    "ASPP",
    "ASPPL",
    "AuxHead",
    "ChannelAttention",
    "ConvGNReLU",
    "DANetHead",
    "DeepLabV3PlusDecoder",
    "DenseCRF",
    "ESPModule",
    "FuseReport",
    "MultiScaleRoIAlign",
    "PositionAttention",
    "PyramidPooling",
    "RoIAlign",
    "RoIUpsample",
    "SeparableConv2d",
    "add_coords",
    "conv_gn_stack",
    "coord_channels",
    "fuse_modules",
]
