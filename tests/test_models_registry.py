"""fastseg.models.create_model / list_models: names, paper defaults through the registry, bad input."""

import pytest

from fastseg.models import create_model, list_models

SEMANTIC = ["deeplabv2", "deeplabv3", "deeplabv3plus", "fcn16s", "fcn32s", "fcn8s", "pspnet", "unet"]


def test_list_models_has_the_semantic_architectures():
    assert set(SEMANTIC) <= set(list_models())
    assert list_models() == sorted(list_models())


def test_list_models_by_task():
    semantic, instance, panoptic = (list_models(t) for t in ("semantic", "instance", "panoptic"))
    assert set(SEMANTIC) | {"danet", "espnet"} <= set(semantic)
    assert instance == ["decoupled_solo", "solo", "solov2"] and panoptic == ["aunet"]
    assert sorted(semantic + instance + panoptic) == list_models()
    with pytest.raises(ValueError, match="task must be one of"):
        list_models("detection")


def test_registry_keeps_the_papers_defaults():
    unet = create_model("unet")  # the paper's 1 input channel, 2 classes
    assert sum(p.numel() for p in unet.parameters()) == 31_030_658
    fcn = create_model("fcn8s", num_classes=5)
    assert fcn.score_fr.out_channels == 5


@pytest.mark.parametrize("name,kw,match", [
    ("segnet", {}, "unknown model 'segnet'"),
    ("unet", {"num_classes": 0}, "num_classes"),
    ("unet", {"num_classes": 2.0}, "num_classes"),
    ("unet", {"num_classes": True}, "num_classes"),
])
def test_bad_input(name, kw, match):
    with pytest.raises(ValueError, match=match):
        create_model(name, **kw)
