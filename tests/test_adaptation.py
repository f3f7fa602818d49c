"""Test-time BatchNorm adaptation: statistics recomputed on the target images, weights untouched."""

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.adaptation import adapt_batchnorm, batchnorm_layers
from pipeline.models import build_classifier


def _batches(images: torch.Tensor, size: int) -> list[torch.Tensor]:
    return list(images.split(size))


def test_statistics_are_the_average_over_the_target_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    target = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8).float()
    adapted = adapt_batchnorm(model, _batches(target, 4))
    features = [model[0](batch) for batch in _batches(target, 4)]
    layer = batchnorm_layers(adapted)[0]
    torch.testing.assert_close(layer.running_mean, torch.cat(features).mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-3)
    expected_var = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in features]).mean(dim=0)
    torch.testing.assert_close(layer.running_var, expected_var, rtol=1e-3, atol=1e-3)
    assert not adapted.training and layer.momentum == batchnorm_layers(model)[0].momentum
    shuffled = adapt_batchnorm(model, _batches(target, 4)[::-1])
    torch.testing.assert_close(batchnorm_layers(shuffled)[0].running_mean, layer.running_mean)


def test_weights_stay_and_the_original_model_is_untouched():
    model = build_classifier("resnet18", 3, 32).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    adapted = adapt_batchnorm(model, _batches(target, 3))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} of the original model changed"
    changed = {k for k, v in adapted.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)


def test_adaptation_undoes_a_colour_shift_for_the_first_layer():
    """Images of a 'new site' are the old ones with an offset: after adaptation the first BN
    layer's output on the new site matches its output on the old one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    source = torch.rand(32, 3, 8, 8) * 100
    model.train()
    for _ in range(50):
        model(source)
    model.eval()
    shifted = source + torch.tensor([40.0, -20.0, 10.0]).view(1, 3, 1, 1)
    gap_before = (model(shifted) - model(source)).abs().mean().item()
    adapted = adapt_batchnorm(model, _batches(shifted, 8))
    gap_after = (adapted(shifted) - model(source)).abs().mean().item()
    assert gap_after < 0.05 * gap_before


def test_bad_inputs_are_refused_clearly():
    with pytest.raises(ValueError, match="no BatchNorm"):
        adapt_batchnorm(nn.Sequential(nn.Conv2d(3, 3, 1)), [torch.zeros(2, 3, 4, 4)])
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match="no target images"):
        adapt_batchnorm(model, [])
    with pytest.raises(ValueError, match="no target images"):
        adapt_batchnorm(model, [torch.zeros(1, 3, 4, 4)])


def test_same_images_give_the_same_statistics():
    model = build_classifier("resnet18", 4, 32).eval()
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (8, 3, 32, 32), dtype=np.uint8))
    a = adapt_batchnorm(model, _batches(images, 4)).state_dict()
    b = adapt_batchnorm(model, _batches(images, 4)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
