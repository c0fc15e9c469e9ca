"""fastseg.nn attention modules: PositionAttention, ChannelAttention, DANetHead."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastseg import ops
from fastseg.nn import ChannelAttention, DANetHead, PositionAttention


@pytest.mark.parametrize("module", [PositionAttention(16), ChannelAttention()], ids=["pam", "cam"])
def test_gamma_starts_at_zero_so_the_block_is_the_identity(module):
    x = torch.randn(2, 16, 7, 9)
    assert module.gamma.item() == 0
    torch.testing.assert_close(module(x), x)


@pytest.mark.parametrize("module", [PositionAttention(24, reduction=8), ChannelAttention()], ids=["pam", "cam"])
def test_fused_equals_reference_and_gamma_gets_gradients(module):
    torch.manual_seed(0)
    with torch.no_grad():
        module.gamma.fill_(0.7)
    x = torch.randn(2, 24, 11, 6, requires_grad=True)
    out = module(x)
    with ops.use_backend("reference"):
        ref = module(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    (g_fused,) = torch.autograd.grad(out.square().sum(), module.gamma)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), module.gamma)
    torch.testing.assert_close(g_fused, g_ref, atol=1e-3, rtol=1e-4)


def test_position_attention_layer_shapes():
    pam = PositionAttention(64, reduction=8)
    assert pam.query_conv.out_channels == 8 and pam.value_conv.out_channels == 64


def test_danet_head_outputs_and_matches_reference():
    torch.manual_seed(1)
    head = DANetHead(64, 5).eval()
    with torch.no_grad():
        head.sa.gamma.fill_(0.5)
        head.sc.gamma.fill_(0.3)
    x = torch.randn(2, 64, 13, 17)
    with torch.no_grad():
        outs = head(x)
        with ops.use_backend("reference"):
            refs = head(x)
    assert [tuple(o.shape) for o in outs] == [(2, 5, 13, 17)] * 3
    for o, r in zip(outs, refs, strict=True):
        torch.testing.assert_close(o, r, atol=1e-4, rtol=1e-4)
    assert head.conv5a[0].out_channels == 16 and isinstance(head.conv8[0], nn.Dropout2d)
