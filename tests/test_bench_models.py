"""The benchmark's end-to-end model rows (``fastseg.bench.models``), on a small stub model at tiny sizes:
the real architectures run in ``make bench``."""

import json
import sys

import pytest
import torch
from torch import nn

import fastseg.models
from fastseg import nn as fnn
from fastseg.bench import OPS, get_cases, models
from fastseg.bench import __main__ as cli


class _Stub(nn.Module):
    """conv + BatchNorm + ReLU, a fused separable conv, a 1x1 classifier: the fused and the reference
    backends take different paths through it."""

    def __init__(self, num_classes: int = 21, **kwargs: object) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.sep = fnn.SeparableConv2d(8, 16, dilation=2)
        self.classifier = nn.Conv2d(16, num_classes, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.classifier(self.sep(self.stem(x)))}


@pytest.fixture
def tiny(monkeypatch):
    """Every model row at a tiny size, the real create_model kept (tests stub it where they need)."""
    for name, size in (("SIZE", 19), ("PEER_SIZE", 16), ("QUICK_SIZE", 13), ("UNET_VALID_SIZE", 17)):
        monkeypatch.setattr(models, name, size)


def _run(tmp_path, *argv: str) -> tuple[int, list[dict]]:
    rc = cli.main(["--device", "cpu", "--ops", "models", "--budget", "0.01", "--no-plot", "--out", str(tmp_path),
                   *argv])
    (path,) = tmp_path.glob("cpu-models*.json")
    return rc, json.loads(path.read_text())["results"]


def test_model_rows_run_fused_against_reference_and_peers(tiny, monkeypatch, tmp_path):
    monkeypatch.setattr(models, "create_model", lambda name, num_classes, **kw: _Stub(num_classes, **kw))
    monkeypatch.setattr(models, "list_models", lambda: ["stub"])
    monkeypatch.setattr(models, "_peer_model", lambda peer: _Stub(models.NUM_CLASSES))
    rc, rows = _run(tmp_path, "--cases", "stub,pspnet_vs_smp")
    assert rc == 0
    by_case = {r["case"]: r for r in rows}
    assert set(by_case) == {"stub", "pspnet_vs_smp"}
    for r in rows:
        assert (r["op"], r["backend"], r["status"]) == ("models", "fused", "ok"), r
        assert r["speedup"] > 0 and r["peak_MB"] is not None and r["ref_peak_MB"] is not None
        assert r["check"]["ok"] and r["check"]["err_vs_fp64"] <= r["check"]["limit"]
    assert by_case["stub"]["params"]["baseline"].startswith("_reference backend")
    assert by_case["stub"]["params"]["H"] == 19
    peer = by_case["pspnet_vs_smp"]["params"]
    assert peer["baseline"] == "smp.PSPNet" and "encoder_weights=None" in peer["peer"] and peer["H"] == 16


def test_missing_model_module_or_peer_library_is_skipped(tiny, monkeypatch, tmp_path):
    monkeypatch.setitem(fastseg.models._MODELS, "ghost", "ghost:ghost")  # fastseg/models/ghost.py does not exist
    monkeypatch.setitem(sys.modules, "segmentation_models_pytorch", None)  # not installed
    monkeypatch.setattr(models, "create_model",
                        lambda name, **kw: _Stub() if name == "pspnet" else fastseg.models.create_model(name, **kw))
    rc, rows = _run(tmp_path, "--cases", "ghost,pspnet_vs_smp")
    assert rc == 0
    by_case = {r["case"]: r for r in rows}
    assert by_case["ghost"]["status"] == "skipped" and "fastseg.models.ghost" in by_case["ghost"]["message"]
    assert by_case["pspnet_vs_smp"]["status"] == "skipped"
    assert "segmentation_models_pytorch" in by_case["pspnet_vs_smp"]["message"]


def test_model_cases_are_lazy_and_quick_is_one_small_row(monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("models must be built when a case runs, not when the cases are listed")

    monkeypatch.setattr(models, "create_model", no_build)
    assert "models" in OPS
    cases = get_cases("models")
    assert len(cases) >= len(fastseg.models.list_models()) + 4
    assert all(c.op == "models" and c.mode == "fwd" for c in cases)
    (quick,) = get_cases("models", quick=True)
    assert quick.params["H"] == quick.params["W"] == models.QUICK_SIZE < models.SIZE
    (unet,) = [c for c in cases if c.name == "unet"]
    assert unet.params["kwargs"]["padding"] == "valid" and unet.params["H"] == models.UNET_VALID_SIZE


def test_budgeted_run_takes_the_model_rows_on_a_smaller_input(monkeypatch):
    """The default (budgeted) run keeps every model row, on a smaller input; --full keeps 513x513."""
    monkeypatch.setattr(models, "create_model", lambda *a, **kw: pytest.fail("built while listing"))
    cases = {c.name: c for c in get_cases("models")}
    small = cases["deeplabv3plus"].budget_variant()
    assert (small.name, small.params["H"]) == ("deeplabv3plus", models.BUDGET_SIZE)
    assert "budgeted run" in small.params["input"] and small.budget_variant is None
    assert cases["unet"].budget_variant().params["H"] == models.BUDGET_UNET_VALID_SIZE
    assert cases["pspnet_vs_smp"].budget_variant().params["H"] == models.BUDGET_PEER_SIZE
    assert (models.BUDGET_UNET_VALID_SIZE - 124) % 16 == 0  # a valid U-Net input
    assert all(c.budget_variant is None for c in get_cases("models", quick=True))


@pytest.mark.parametrize("full", [False, True])
def test_the_run_picks_the_budget_variant_unless_full(monkeypatch, tmp_path, full):
    sizes = []

    def record(case, *args):
        sizes.append(case.params["H"])
        return []

    monkeypatch.setattr(cli, "_bench_case", record)
    monkeypatch.setattr(cli, "memory_probe", lambda device: {"ok": True})
    argv = ["--device", "cpu", "--ops", "models", "--cases", "deeplabv3plus", "--no-plot", "--out", str(tmp_path)]
    assert cli.main(argv + (["--full"] if full else [])) == 0
    expected = {models.SIZE, models.PEER_SIZE, models.QUICK_SIZE} if full else {
        models.BUDGET_SIZE, models.BUDGET_PEER_SIZE, models.QUICK_SIZE}
    assert set(sizes) == expected


def test_budget_size_of_any_other_row_keeps_its_remainder_modulo_32():
    """A row another module adds at its own size gets a smaller input too, of the same form."""
    for size in (800, 769, 1024, 321):
        small = models.budget_size(size)
        assert small < size and small % 32 == size % 32 and abs(small - size * models.BUDGET_SIZE / models.SIZE) <= 16
    assert models.budget_size(models.QUICK_SIZE) == models.QUICK_SIZE
    assert models.budget_size(models.SIZE) == models.BUDGET_SIZE
