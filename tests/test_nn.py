"""fastseg.nn.SeparableConv2d against the same layers run unfused by PyTorch."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fastseg import ops
from fastseg.nn import SeparableConv2d
from fastseg.ops._reference import fixed_padding


def _randomise_bn(module):
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.normal_(1, 0.2)
            m.bias.data.normal_(0, 0.1)


def _eager(block: SeparableConv2d, x):
    """The block written out with plain PyTorch layers (same parameters, same buffers)."""
    k, d = block.depthwise.kernel_size[0], block.dilation
    beg, end = fixed_padding(k, d, "same")
    y = block.depthwise(F.pad(x, (beg, end, beg, end)))
    y = block.bn_depth(y) if block.bn_depth is not None else y
    y = F.relu(y) if block.relu_after_depthwise else y
    z = block.pointwise(y)
    z = block.bn_point(z) if block.bn_point is not None else z
    return F.relu(z) if block.relu else z


@pytest.mark.parametrize("bn", [True, False])
@pytest.mark.parametrize("stride,dilation", [(1, 1), (1, 6), (2, 2), (1, 18)])
def test_eval_is_fused_and_matches_eager(bn, stride, dilation):
    torch.manual_seed(0)
    block = SeparableConv2d(13, 11, stride=stride, dilation=dilation, bn=bn).eval()
    _randomise_bn(block)
    x = torch.randn(2, 13, 17, 15)
    with torch.no_grad():
        want = _eager(block, x)
        got = block(x)
        with ops.use_backend("reference"):
            ref = block(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ref, want, atol=1e-5, rtol=1e-4)


def test_eval_gradients_reach_batchnorm_parameters():
    torch.manual_seed(1)
    block = SeparableConv2d(7, 5, dilation=2).eval()
    _randomise_bn(block)
    twin = copy.deepcopy(block)
    x = torch.randn(2, 7, 9, 9)
    block(x).square().sum().backward()
    _eager(twin, x).square().sum().backward()
    for (name, p), q in zip(block.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_train_mode_matches_eager_including_running_stats():
    torch.manual_seed(2)
    block = SeparableConv2d(6, 9, dilation=3).train()
    twin = copy.deepcopy(block)
    x = torch.randn(3, 6, 11, 10)
    torch.testing.assert_close(block(x), _eager(twin, x))
    for a, b in zip(block.buffers(), twin.buffers(), strict=True):
        torch.testing.assert_close(a, b)


def test_repr_and_state_dict_layout():
    block = SeparableConv2d(8, 16, dilation=12)
    assert "dilation=12" in repr(block)
    keys = {"depthwise.weight", "pointwise.weight", "bn_depth.running_var", "bn_point.weight"}
    assert keys <= set(block.state_dict())


def test_swap_into_a_model():
    """The README's example: replace a model's depthwise+pointwise pair with the fused block."""
    torch.manual_seed(3)
    head = nn.Sequential(SeparableConv2d(32, 16, dilation=6), nn.Conv2d(16, 3, 1)).eval()
    out = head(torch.randn(1, 32, 21, 21))
    assert out.shape == (1, 3, 21, 21)
