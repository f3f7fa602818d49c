"""Adapting a trained model to a new site.

Test-time BatchNorm adaptation (AdaBN, Li et al. 2016): a network's BatchNorm layers hold the
feature statistics of the lab it was trained in; a new stain or camera shifts those statistics,
and the layers then normalise with the wrong numbers. Recomputing the running means and variances
on the new site's unlabelled images (the weights stay as trained) removes much of that shift
without a single label.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str = "cpu") -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are recomputed over ``batches``
    (uint8 NCHW images of the target site, labels not needed), as AdaBN does: one pass in training
    mode, each layer's statistics the plain average over the batches (not a momentum-weighted
    trace, so every batch counts the same and the order does not matter). Weights are untouched;
    the copy is returned in eval mode. Raises ``ValueError`` when ``model`` has no BatchNorm layer
    or ``batches`` holds no batch of two or more images."""
    adapted = copy.deepcopy(model).to(device)
    layers = batchnorm_layers(adapted)
    if not layers:
        raise ValueError("the model has no BatchNorm layer with running statistics: nothing to adapt")
    adapted.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative moving average: every image counts the same
        layer.train()
    seen = 0
    for images in batches:
        if len(images) < 2:  # a batch of one has no variance over a 1x1 map; its image is left out
            continue
        adapted(images.to(device).contiguous(memory_format=torch.channels_last))
        seen += len(images)
    if seen == 0:
        raise ValueError("no target images (in batches of 2 or more) to adapt the BatchNorm statistics on")
    for layer, original in zip(layers, batchnorm_layers(model), strict=True):
        layer.momentum = original.momentum
    return adapted.eval()
