import socket

import cv2
import numpy as np
import pytest
import timm
import torch
from huggingface_hub import constants as hf_constants

from pipeline.core.config import ModelConfig, Unfreeze
from pipeline.core.errors import PipelineError
from pipeline.models.backbones import check_weights, convert_lite_keys, create_model, lite_weights_file
from pipeline.models.stages import backbone_groups, set_trainable


def _imagenet_top5(model, rgb):
    x = cv2.resize(rgb, (224, 224), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    x = torch.from_numpy((x - 0.5) / 0.5).permute(2, 0, 1)[None]
    with torch.no_grad():
        return model.eval()(x).topk(5).indices[0].tolist()


def test_lite_keys_convert_and_classify_a_natural_image():
    from skimage import data

    model = timm.create_model("tf_efficientnet_lite0")
    src = torch.load(lite_weights_file("tf_efficientnet_lite0"), map_location="cpu")
    converted = convert_lite_keys(src, model)
    assert set(converted) == set(model.state_dict())
    model.load_state_dict(converted, strict=True)
    cat = _imagenet_top5(model, data.chelsea())
    assert cat[0] in range(281, 286)  # tabby / tiger cat / Egyptian cat ...
    assert _imagenet_top5(model, data.coffee())[0] in (967, 968)  # espresso, cup


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to resolve a host or open a connection is recorded and fails at once."""
    attempts = []

    def refuse(what):
        def call(*args, **kwargs):
            attempts.append((what, args[1:] if what.startswith("socket.") else args))
            raise OSError(f"test: no network ({what})")

        return call

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse(f"socket.{name}"))
    for name in ("create_connection", "getaddrinfo", "gethostbyname"):
        monkeypatch.setattr(socket, name, refuse(name))
    return attempts


def test_lite_backbone_gets_the_package_weights(no_network):
    m = create_model(ModelConfig(name="tf_efficientnet_lite1"))
    src = torch.load(lite_weights_file("tf_efficientnet_lite1"), map_location="cpu")
    assert torch.equal(m.backbone.conv_stem.weight, src["_conv_stem.weight"])
    assert no_network == []


def test_local_weights_file_is_loaded(tmp_path, no_network):
    donor = timm.create_model("resnet18", num_classes=1000)
    torch.save(donor.state_dict(), tmp_path / "resnet18.pth")
    m = create_model(ModelConfig(name="resnet18", weights=str(tmp_path)))  # a folder works too
    assert torch.equal(m.backbone.conv1.weight, donor.conv1.weight)
    assert no_network == []


def test_uncached_hub_weights_offline_are_refused_without_touching_the_network(no_network, tmp_path, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(PipelineError, match=r"hub timm/resnet18.a1_in1k.*not in the Hugging Face cache .*empty"):
        check_weights(ModelConfig(name="resnet18"))
    with pytest.raises(PipelineError, match="not a timm model"):
        check_weights(ModelConfig(name="resnet_nonexistent"))
    with pytest.raises(PipelineError, match=r"resnet18 has no pretrained tag 'bogus' \(tags: a1_in1k, "):
        check_weights(ModelConfig(name="resnet18.bogus", pretrained=False))
    with pytest.raises(PipelineError, match="no such file"):
        check_weights(ModelConfig(name="resnet18", weights="/nowhere/w.pth"))
    check_weights(ModelConfig(name="resnet18", pretrained=False))
    check_weights(ModelConfig(name="convnextv2_tiny.fcmae_ft_in22k_in1k", pretrained=False))  # a tagged name
    assert no_network == []  # refused up front, not after a failed download


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "scratch_cnn"])
def test_phases_freeze_the_right_parameters(name):
    head, last1, last2, everything = map(Unfreeze.parse, ("head", "last:1", "last:2", "all"))
    m = create_model(ModelConfig(name=name), load_weights=False)
    groups = backbone_groups(m)

    def trainable():
        return {n for n, p in m.named_parameters() if p.requires_grad}

    heads = {n for n, _ in m.named_parameters() if not n.startswith("backbone.")}
    set_trainable(m, head)
    assert trainable() == heads
    assert all(not mod.training for mod in m.backbone.modules() if isinstance(mod, torch.nn.BatchNorm2d))
    set_trainable(m, last2)
    assert trainable() == heads | {f"backbone.{n}" for g in groups[-2:] for n in g}
    stem = m.backbone.get_submodule(groups[0][0].rsplit(".", 1)[0])
    assert not stem.training
    set_trainable(m, everything)
    assert trainable() == {n for n, _ in m.named_parameters()} and m.training

    set_trainable(m, last1)
    x = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    age, logit = m(x)
    (age.sum() + logit.sum()).backward()
    for n, p in m.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "scratch_cnn"])
def test_trunk_stages_chain_to_the_backbone_and_the_cache_matches(name, tmp_path):
    import numpy as np

    from pipeline.core.config import TrainConfig
    from pipeline.models.stages import frozen_prefix_length, trunk_stages
    from pipeline.training.trunk import TrunkCache, TrunkStore

    torch.manual_seed(0)
    m = create_model(ModelConfig(name=name), load_weights=False).eval()
    stages = trunk_stages(m)
    assert len(stages) == len(backbone_groups(m)) + 1  # the stages, then the neck
    images = np.random.default_rng(0).integers(0, 255, (6, 48, 48, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    h = (x.float() - m.mean) / m.std
    with torch.no_grad():
        for s in stages:
            h = s(h)
        assert torch.allclose(h, m.backbone((x.float() - m.mean) / m.std), atol=1e-5)
        head, last2 = Unfreeze.parse("head"), Unfreeze.parse("last:2")
        set_trainable(m, head)
        t = TrainConfig(trunk_views=1)
        store = TrunkStore(tmp_path, images, t)
        cache = TrunkCache(m, store, rows=(np.arange(4), np.arange(4, 6)), device=torch.device("cpu"))
        k_head, k_last2 = frozen_prefix_length(m, head), frozen_prefix_length(m, last2)
        head = cache.for_phase(k_head, k_last2)  # computed at the deeper cut, derived for the head phase
        assert cache.base.k == k_last2 and head.k == k_head
        assert torch.allclose(head.views[0].float(), h[:4], atol=2e-2, rtol=2e-2)
        assert torch.allclose(head.val.float(), h[4:], atol=2e-2, rtol=2e-2)
        assert cache.for_phase(k_last2, k_last2) is cache.base  # reused: nothing below the cut was trained
        assert cache.for_phase(0, 0) is None  # full fine-tuning: no cache


# One backbone of each family the cache knows; the stage that `last:1` trains and the neck that trains with the heads.
FAMILIES = {
    "tf_efficientnet_lite0": (("blocks.6.", "conv_head.", "bn2."), ()),
    "mobilenetv2_050": (("blocks.6.", "conv_head.", "bn2."), ()),
    "mobilenetv3_small_050": (("blocks.5.", "conv_head."), ()),
    "resnet18": (("layer4.",), ()),
    "seresnext26d_32x4d": (("layer4.",), ()),
    "convnextv2_atto": (("stages.3.",), ("head.norm.",)),
    "regnetx_002": (("s4.",), ()),
    "deit_tiny_patch16_224": (("blocks.11.",), ("norm.",)),
    "scratch_cnn": (("stages.3.",), ()),
}
SIDE = 48


def _family_model(name: str):
    torch.manual_seed(0)
    return create_model(ModelConfig(name=name, img_size=SIDE, drop_rate=0.0), load_weights=False)


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_is_a_chain_of_its_stages_then_its_neck(name):
    from pipeline.models.stages import trunk_stages

    m = _family_model(name).eval()
    b, x = m.backbone, torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        h = x
        for stage in trunk_stages(m):
            h = stage(h)
        own = b(x) if name == "scratch_cnn" else b.forward_head(b.forward_features(x), pre_logits=True)
    torch.testing.assert_close(h, own)
    staged = [n for g in backbone_groups(m) for n in g]
    _, neck = FAMILIES[name]
    in_neck = {n for n, _ in b.named_parameters() if n.startswith(neck or ("-",))}
    assert len(staged) == len(set(staged)) and set(staged) | in_neck == {n for n, _ in b.named_parameters()}


@pytest.mark.parametrize("name", FAMILIES)
def test_last_n_trains_the_last_n_stages_and_the_neck_trains_with_the_heads(name):
    m = _family_model(name)
    last, neck = FAMILIES[name]
    names = [n.removeprefix("backbone.") for n, _ in m.named_parameters() if n.startswith("backbone.")]

    def trained(unfreeze: str) -> set[str]:
        set_trainable(m, Unfreeze.parse(unfreeze))
        return {n.removeprefix("backbone.") for n, p in m.named_parameters() if p.requires_grad and "backbone." in n}

    assert trained("head") == {n for n in names if n.startswith(neck or ("-",))}
    assert trained("last:1") == {n for n in names if n.startswith(last + neck)}
    groups = backbone_groups(m)
    assert trained("last:2") == trained("last:1") | set(groups[-2])
    assert trained("all") == set(names)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("unfreeze", ["head", "last:1"])
def test_cached_phases_validate_and_step_as_uncached_ones(name, unfreeze, tmp_path):
    """The frozen-trunk cache (outputs stored in fp16) against the whole network on the images: the validation
    predictions, and the gradients of one training step on the same batch."""
    import numpy as np

    from pipeline.core.config import TrainConfig
    from pipeline.models.stages import frozen_prefix_length
    from pipeline.training.evaluation import predict_arrays, predict_cached
    from pipeline.training.job import Inference
    from pipeline.training.trunk import TrunkCache, TrunkStore

    m = _family_model(name)
    set_trainable(m, Unfreeze.parse(unfreeze))
    images = np.random.default_rng(0).integers(0, 255, (10, SIDE, SIDE, 3), dtype=np.uint8)
    tr, va = np.arange(6), np.arange(6, 10)
    k = frozen_prefix_length(m, Unfreeze.parse(unfreeze))
    store = TrunkStore(tmp_path, images, TrainConfig(trunk_views=1))
    trunk = TrunkCache(m, store, rows=(tr, va), device=torch.device("cpu")).for_phase(k, k)
    assert trunk is not None and trunk.k == k > 0
    how = Inference(torch.device("cpu"), 4, None, 0)
    cached, uncached = predict_cached(m, trunk, how), predict_arrays(m, images, va, how)
    np.testing.assert_allclose(cached[0], uncached[0], rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(cached[1], uncached[1], atol=5e-3)

    def gradients(forward) -> dict:
        m.zero_grad()
        age, logit = forward()
        (age.square().mean() + logit.square().mean()).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    via_cache = gradients(lambda: trunk.forward(m, trunk.views[0][tr]))
    whole = gradients(lambda: m(torch.from_numpy(images[tr]).permute(0, 3, 1, 2)))
    assert via_cache.keys() == whole.keys()
    flat = lambda grads: torch.cat([g.flatten() for g in grads.values()])  # noqa: E731
    assert (flat(via_cache) - flat(whole)).norm() <= 2e-2 * flat(whole).norm()  # the stored inputs are fp16
