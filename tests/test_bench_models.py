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


def test_espnet_rows_run_at_their_own_size(monkeypatch, tmp_path):
    """The ESPNet rows use ESPNet's Cityscapes setting (1024x512, 20 classes); here shrunk to 24x16."""
    cases = {c.name: c for c in get_cases("models")}
    for name in ("espnet_a", "espnet_b", "espnet_c", "espnet"):
        p = cases[name].params
        assert (p["H"], p["W"], p["classes"]) == (512, 1024, 20), p
    monkeypatch.setattr(models, "ESPNET_SIZE", (16, 24))
    rc, rows = _run(tmp_path, "--cases", "espnet_c")
    assert rc == 0
    (row,) = rows
    assert row["status"] == "ok" and row["check"]["ok"] and (row["params"]["H"], row["params"]["W"]) == (16, 24)


def test_instance_model_rows_run_on_calibrated_candidates(tiny, monkeypatch, tmp_path, one_thread):
    """SOLO / SOLOv2 rows (images in a list, per-image dicts out) on narrow ResNet-18 models at 64x96: the
    calibration gives candidates, so the whole inference path runs and the kept scores are checked."""
    narrow = {"backbone": "resnet18", "fpn_channels": 32, "head_channels": 32, "stacked_convs": 1}
    monkeypatch.setattr(models, "INSTANCE_SIZE", (64, 96))
    monkeypatch.setattr(models, "INSTANCE_CANDIDATES", 30)
    monkeypatch.setattr(models, "create_model", lambda name, num_classes, **kw: fastseg.models.create_model(
        name, num_classes=num_classes, **{**kw, **narrow, **({"mask_feat_channels": 32, "mask_channels": 32}
                                                            if name == "solov2" else {})}))
    rc, rows = _run(tmp_path, "--cases", "solo,solov2")
    assert rc == 0
    for r in rows:
        assert (r["status"], r["params"]["H"], r["params"]["W"], r["params"]["classes"]) == ("ok", 64, 96, 80), r
        assert r["check"]["ok"], r
    # the calibrated model keeps instances (the check compares their scores, not an empty tensor)
    model = models._model_inputs(models._ModelRow("solov2", "solov2", {}, 64, width=96, instance=True), 1)(
        torch.device("cpu"), torch.float32)
    assert model["model"](model["x"]).numel() > 0


def test_swapped_smp_row_times_fuse_modules_against_the_original(tiny, monkeypatch, tmp_path):
    """The peer after fastseg.nn.fuse_modules against the peer itself (a stub peer with an smp-style
    separable conv: Sequential(Sequential(depthwise, pointwise), BatchNorm, ReLU))."""
    def peer(_):
        return nn.Sequential(nn.Sequential(nn.Conv2d(3, 3, 3, padding=2, dilation=2, groups=3, bias=False),
                                           nn.Conv2d(3, 8, 1, bias=False)),
                             nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, models.NUM_CLASSES, 1))

    monkeypatch.setattr(models, "_peer_model", peer)
    rc, rows = _run(tmp_path, "--cases", "smp_deeplabv3plus_swapped")
    (row,) = rows
    assert rc == 0 and row["status"] == "ok" and row["check"]["ok"], row
    assert row["params"]["baseline"] == "smp.DeepLabV3Plus" and "fuse_modules" in row["params"]["layer"]


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
