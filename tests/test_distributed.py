"""torch.distributed on CPU (gloo over loopback, two spawned processes): one DistributedDataParallel
training step of a reduced-width DeepLab v3+ running the fused separable-conv kernels (forward and
backward) leaves identical parameters on both ranks, equal to the same step taken in one process on the
whole batch; SyncBatchNorm conversion of a fastseg model and a forward under the gloo group."""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

from fastseg.models import create_model

pytestmark = [pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with the gloo backend is not available in this build"),
              pytest.mark.usefixtures("one_thread")]

WORLD = 2
PER_RANK = 2  # images per rank
SIZE = 33
LR = 0.1


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("deeplabv3plus", num_classes=3, width_multiplier=0.125)
    model.backbone.middle = model.backbone.middle[:2]  # identical units; fewer of them
    return model


def _freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Train mode with BatchNorms on their running statistics (the usual fine-tuning setup for small
    per-GPU batches): SeparableConv2d then folds them and runs the fused kernel in training too. Dropout
    off as well, so that one process on the whole batch takes the very same step."""
    model.train()
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout)):
            m.eval()
    return model


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(WORLD * PER_RANK, 3, SIZE, SIZE, generator=g),
            torch.randint(0, 3, (WORLD * PER_RANK, SIZE, SIZE), generator=g))


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    F.cross_entropy(model(x)["out"], y).backward()
    opt.step()


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        import fastseg.nn.conv as conv

        calls = []
        real = conv.separable_conv2d
        conv.separable_conv2d = lambda *a, **k: calls.append(1) or real(*a, **k)

        x, y = _data()
        x, y = x[rank * PER_RANK:(rank + 1) * PER_RANK], y[rank * PER_RANK:(rank + 1) * PER_RANK]
        model = _freeze_batchnorm(_model())
        ddp = nn.parallel.DistributedDataParallel(model)
        _step(ddp, x, y)
        result = {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
                  "fused_calls": len(calls)}

        # SyncBatchNorm: the conversion reaches the BatchNorms inside fastseg's SeparableConv2d, and
        # eval mode (running statistics, folded into the fused kernel) runs under the group.
        sync = nn.SyncBatchNorm.convert_sync_batchnorm(_model()).eval()
        plain = _model().eval()
        with torch.no_grad():
            result["sync_out"] = sync(x)["out"]
            result["plain_out"] = plain(x)["out"]
        result["n_sync"] = sum(isinstance(m, nn.SyncBatchNorm) for m in sync.modules())
        result["n_bn"] = sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
        # training mode synchronises batch statistics, which torch implements for GPU tensors only
        sync.train()
        try:
            sync(x)
            result["sync_train_error"] = None
        except ValueError as e:
            result["sync_train_error"] = str(e)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_step_with_fused_ops_keeps_ranks_identical_and_syncbatchnorm(tmp_path):
    ctx = mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 400
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail("the two gloo workers did not finish within 400 s")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))

    # the fused kernel ran in the DDP step (every SeparableConv2d of the network, forward)
    assert r0["fused_calls"] > 0 and r0["fused_calls"] == r1["fused_calls"]
    # bitwise identical parameters on both ranks after the step
    for n, p in r0["params"].items():
        assert torch.equal(p, r1["params"][n]), n
    # ... and equal to one process taking the same step on the whole batch (DDP averages the gradients)
    model = _freeze_batchnorm(_model())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _step(model, *_data())
    moved = 0
    for n, p in model.named_parameters():
        torch.testing.assert_close(r0["params"][n], p.detach(), atol=1e-6, rtol=1e-5, msg=n)
        moved += not torch.equal(p.detach(), before[n])
    # (some BatchNorm weights of the random deep net get gradients below float32's resolution at 1.0)
    assert moved > len(before) / 2, f"only {moved} of {len(before)} parameters changed"

    assert r0["n_sync"] == r0["n_bn"] > 0
    for r in (r0, r1):
        torch.testing.assert_close(r["sync_out"], r["plain_out"], atol=1e-6, rtol=1e-5)
        assert r["sync_train_error"] is None or "GPU" in r["sync_train_error"]
