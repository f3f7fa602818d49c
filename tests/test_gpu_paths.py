"""The GPU code paths rehearsed on the CPU: bf16 autocast, channels-last and torch.compile (inductor,
compiling C++ on the CPU) through the train stage's own step and the prediction batch, so that a
typo in a branch only a GPU takes cannot hide until a GPU run. Page-locked memory and NCCL cannot
be rehearsed without a GPU."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import tiny_params
from torch import nn

from pipeline.inference import autocast, autocast_dtype, batch_logits
from pipeline.training import Distributed, build_loss, build_model, build_optimizer, train_step, wrap_model

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # only named, never used: the choices for it are checked, not run
CLASSES = 8


def _cfg(model: str):
    return tiny_params(train={"model": model, "pretrained": "none", "image_size": 32, "batch_size": 4}).train


def _batch(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return images, torch.arange(n) % CLASSES


def _first_conv(model: nn.Module) -> nn.Conv2d:
    return next(module for module in model.modules() if isinstance(module, nn.Conv2d))


def _record_first_conv(model: nn.Module) -> dict:
    """What the first convolution sees and returns, filled in by a forward hook."""
    seen: dict = {}

    def hook(module, inputs, output):
        seen.update(input_channels_last=inputs[0].is_contiguous(memory_format=torch.channels_last),
                    output_dtype=output.dtype)

    _first_conv(model).register_forward_hook(hook)
    return seen


def test_cuda_runs_in_bf16_by_default_and_the_cpu_in_fp32_unless_forced():
    assert autocast_dtype(CUDA) is torch.bfloat16
    assert autocast_dtype(CPU) is None
    assert autocast_dtype(CPU, "bf16") is torch.bfloat16
    assert autocast_dtype(CUDA, "fp32") is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available ... Disabling autocast": built, not entered
        context = autocast(CUDA)
    assert (context.device, context.fast_dtype) == ("cuda", torch.bfloat16)
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp32, got 'fp16'"):
        autocast_dtype(CPU, "fp16")


def test_a_train_step_in_bf16_and_channels_last_learns():
    cfg = _cfg("efficientnet-lite0")
    torch.manual_seed(0)
    model = build_model(cfg, CLASSES, CPU)
    assert _first_conv(model).weight.is_contiguous(memory_format=torch.channels_last)
    images, targets = _batch()
    net = wrap_model(model, cfg, Distributed(), CPU)
    optimizer, loss_fn = build_optimizer(model, cfg), build_loss(cfg, targets.numpy(), CLASSES, CPU)
    seen = _record_first_conv(model)
    before = [p.detach().clone() for p in model.parameters()]
    losses = [float(train_step(net, images, targets, loss_fn, optimizer, CPU, cfg.grad_clip, "bf16"))
              for _ in range(8)]
    assert seen == {"input_channels_last": True, "output_dtype": torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast keeps fp32 master weights
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_an_inference_batch_in_bf16_is_fp32_logits_close_to_full_precision():
    torch.manual_seed(0)
    model = build_model(_cfg("efficientnet-lite0"), CLASSES, CPU).eval()
    with torch.no_grad():
        nn.init.normal_(model.net._fc.weight, std=0.5)  # logits of a real spread, not all ~0
    images, _ = _batch(6, seed=1)
    seen = _record_first_conv(model)
    half = batch_logits(model, images, CPU, "bf16")
    assert seen["output_dtype"] == torch.bfloat16
    full = batch_logits(model, images, CPU)
    assert seen["output_dtype"] == torch.float32
    assert half.dtype == torch.float32 and half.shape == (6, CLASSES)
    assert (half - full).abs().max() <= 0.05 * full.abs().max()


@pytest.fixture(scope="module")
def inductor():
    """Skip when inductor cannot build a kernel here (no C++ compiler, or a broken one)."""
    try:
        torch.compile(lambda x: torch.relu(x) * 2 + 1)(torch.linspace(-1, 1, 8))
    except Exception as exc:  # the compile stack raises many types; each one means "not on this machine"
        pytest.skip(f"torch.compile (inductor) cannot compile on this machine: {type(exc).__name__}: {exc}")


@pytest.mark.slow
def test_a_compiled_train_step_and_inference_batch_match_eager(inductor):
    cfg = _cfg("baseline-cnn")
    images, targets = _batch()
    losses = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg, CLASSES, CPU)
        net = wrap_model(model, cfg, Distributed(), CPU, compiled=compiled)
        optimizer, loss_fn = build_optimizer(model, cfg), build_loss(cfg, targets.numpy(), CLASSES, CPU)
        losses[compiled] = [float(train_step(net, images, targets, loss_fn, optimizer, CPU, cfg.grad_clip, "bf16"))
                            for _ in range(2)]
    assert isinstance(net, torch._dynamo.eval_frame.OptimizedModule)
    assert losses[True] == pytest.approx(losses[False], rel=0.02)
    net.eval()  # the compiled network and the module it wraps share their weights
    compiled_logits, eager_logits = batch_logits(net, images, CPU, "bf16"), batch_logits(model, images, CPU, "bf16")
    assert (compiled_logits - eager_logits).abs().max() <= 0.05 * eager_logits.abs().max() + 1e-3
