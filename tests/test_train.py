"""Training: schedule and parameter groups, MLflow logging, determinism, kill-and-resume, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO, tiny_params

from pipeline import train as train_module
from pipeline import training as training_module
from pipeline.layout import IMAGES_FILE, NORMALIZE_SUMMARY_FILE
from pipeline.models import _monai_efficientnet_key, build_classifier, head_parameters
from pipeline.normalize import run_normalize
from pipeline.processed import images_sample_sha256
from pipeline.train import run_train
from pipeline.training import TrainState, class_weights, parameter_groups, read_checkpoint, warmup_cosine


def test_warmup_then_cosine():
    factors = [warmup_cosine(step, 4, 20) for step in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(factors[3:], factors[4:], strict=False))
    assert factors[-1] < 0.05


def test_parameter_groups_split_head_backbone_and_decay():
    model = build_classifier("resnet18", 3, 32)
    groups = parameter_groups(model, "resnet18", lr=1e-3, backbone_factor=0.1, weight_decay=0.05)
    head_ids = {id(p) for p in head_parameters(model, "resnet18")}
    for group in groups:
        assert group["lr"] == (1e-3 if group["is_head"] else 1e-4)
        for param in group["params"]:
            assert (id(param) in head_ids) == group["is_head"]
            # norm weights and every bias are 1-D: never decayed
            assert group["weight_decay"] == (0.05 if param.ndim > 1 else 0.0)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_run_name_leads_with_the_dvc_experiment(monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert train_module.run_name("resnet18", True) == "resnet18-pt"
    monkeypatch.setenv("DVC_EXP_NAME", "lr-sweep-1")
    assert train_module.run_name("baseline-cnn", False) == "lr-sweep-1: baseline-cnn-scratch"


def test_class_weights_are_inverse_frequency():
    weights = class_weights(torch.tensor([0, 0, 0, 1]).numpy(), 3)
    assert weights.tolist() == pytest.approx([4 / 9, 4 / 3, 0.0])


def _fresh_state(fingerprint: dict[str, str]) -> TrainState:
    torch.manual_seed(0)
    model = build_classifier("baseline-cnn", 3, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    return TrainState(model, optimizer, scheduler, torch.Generator().manual_seed(1), fingerprint)


def test_train_state_is_saved_and_restored_as_one(tmp_path):
    state = _fresh_state({"train params": "a", "processed images": "b"})
    state.model(torch.zeros(2, 3, 32, 32)).sum().backward()
    state.optimizer.step()
    state.scheduler.step()
    torch.randperm(5, generator=state.sampler_rng)
    assert state.update({"epoch": 1, "val_macro_f1": 0.5}) is True
    assert state.update({"epoch": 2, "val_macro_f1": 0.4}) is False
    state.run_id = "abc"
    state.save(tmp_path / "last.pt")
    saved_rng = torch.get_rng_state()

    restored = _fresh_state({"train params": "a", "processed images": "b"})  # reseeds the global RNG
    restored.load_state_dict(read_checkpoint(tmp_path / "last.pt"))
    assert (restored.epoch, restored.best_epoch, restored.best_score, restored.stale) == (2, 1, 0.5, 1)
    assert restored.run_id == "abc" and restored.history == state.history
    for name, value in state.model.state_dict().items():
        assert torch.equal(restored.model.state_dict()[name], value), name
    moments = [s["exp_avg"] for s in state.optimizer.state_dict()["state"].values()]
    assert all(torch.equal(a, b) for a, b in
               zip(moments, [s["exp_avg"] for s in restored.optimizer.state_dict()["state"].values()], strict=True))
    assert restored.scheduler.get_last_lr() == state.scheduler.get_last_lr() == [0.005]
    assert torch.equal(restored.sampler_rng.get_state(), state.sampler_rng.get_state())
    assert torch.equal(torch.get_rng_state(), saved_rng)
    assert restored.changes_from({"train params": "a", "processed images": "b"}) == []
    assert restored.changes_from({"train params": "a", "processed images": "c"}) == ["processed images"]
    assert restored.changes_from("a single digest of an older checkpoint") == ["checkpoint format"]


def _train(tmp_path, processed, policy, tracking: dict | None = None, runtime: dict | None = None,
           **train_overrides):
    params = tiny_params(train=train_overrides, tracking=tracking or {}, runtime=runtime or {})
    out = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
    result = run_train(params, processed, policy, out / "models", out / "reports", progress=False)
    history = pd.read_csv(out / "reports" / "train_history.csv")
    return result, history, out


@pytest.mark.slow
def test_training_writes_model_history_and_one_mlflow_run(tiny_processed, tmp_path):
    _, processed, policy = tiny_processed
    result, history, out = _train(tmp_path, processed, policy, tracking={"log_model": True, "registered_model": ""})
    assert (out / "models" / "model.pt").is_file()
    assert not (out / "models" / "checkpoints").exists()  # removed once the run completed
    assert history["epoch"].tolist() == [1, 2, 3]
    run_info = json.loads((out / "models" / "run.json").read_text())
    assert run_info["run_id"] == result["run_id"]
    run = mlflow.get_run(result["run_id"])
    assert run.data.params["train.model"] == "baseline-cnn"
    assert run.data.params["augment.hflip"] == "0.5"
    assert {"git.commit", "git.dirty", "data.hash"} <= set(run.data.tags)
    curve = mlflow.MlflowClient().get_metric_history(result["run_id"], "val_macro_f1")
    assert [m.step for m in curve] == [1, 2, 3]
    assert run.data.metrics["best_val_macro_f1"] == pytest.approx(history["val_macro_f1"].max())
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result["run_id"])}
    assert "train_history.csv" in artifacts
    # the temperature saved with the model is the one fitted on the val split with the best weights
    from pipeline.calibration import fit_temperature
    from pipeline.data import ProcessedImages, load_index, select_split
    from pipeline.inference import load_model, predict_logits

    model, meta = load_model(out / "models" / "model.pt")
    val = select_split(load_index(processed), "val", list(meta.classes))
    logits, labels = predict_logits(model, torch.utils.data.DataLoader(ProcessedImages(processed, val, 32)),
                                    torch.device("cpu"))
    assert meta.temperature == pytest.approx(fit_temperature(logits, labels), rel=1e-3)
    assert run.data.metrics["temperature"] == pytest.approx(meta.temperature)
    # the logged pyfunc model (not registered: registered_model is empty) predicts from image bytes
    # and, by default, refuses to open a path on the server
    assert "registered_model" not in run_info
    logged = mlflow.pyfunc.load_model(run_info["model_uri"])
    example = logged.input_example
    assert list(example.columns) == ["image"]
    answer = logged.predict(pd.concat([example, pd.DataFrame({"path": [str(tmp_path / "missing.png")]})]))
    assert answer["status"].tolist() == ["ok", "path-not-allowed"]
    probs = answer.loc[0, [f"p_{name}" for name in meta.classes]].to_numpy(dtype=float)
    assert probs.sum() == pytest.approx(1.0) and answer.loc[0, "predicted"] == meta.classes[probs.argmax()]
    assert answer.loc[1, "p_basophil"] is None


@pytest.mark.slow
def test_same_seed_same_history_on_cpu(tiny_trained, tmp_path):
    first = pd.read_csv(tiny_trained.reports / "train_history.csv")  # the session's run of the same params
    _, second, _ = _train(tmp_path, tiny_trained.processed, tiny_trained.policy)
    columns = ["train_loss", "val_loss", "val_accuracy", "val_macro_f1"]
    pd.testing.assert_frame_equal(first[columns], second[columns])


@pytest.mark.slow
def test_frozen_backbone_epochs_leave_the_backbone_untouched(tiny_processed, tmp_path, monkeypatch):
    _, processed, policy = tiny_processed
    snapshots = []
    real_evaluate = training_module.evaluate_split

    def spy(model, *args, **kwargs):
        snapshots.append({k: v.clone() for k, v in model.net.state_dict().items()})
        return real_evaluate(model, *args, **kwargs)

    monkeypatch.setattr(training_module, "evaluate_split", spy)
    weights = tmp_path / "lite0-like.pth"
    state = build_classifier("efficientnet-lite0", 1000, 32).net.state_dict()
    torch.save({_monai_efficientnet_key(k): v for k, v in state.items()}, weights)
    _train(tmp_path, processed, policy, model="efficientnet-lite0", pretrained="imagenet", weights_path=str(weights),
           epochs=2, freeze_epochs=1)
    initial = torch.load(weights, weights_only=True)
    after_frozen, after_unfrozen = snapshots
    for key in ("_conv_stem.weight", "_bn0.running_mean", "_blocks.3.5._expand_conv.weight"):
        assert torch.equal(after_frozen[key], initial[_monai_efficientnet_key(key)]), key
    assert not torch.equal(after_frozen["_fc.weight"], after_unfrozen["_fc.weight"])
    assert not torch.equal(after_unfrozen["_conv_stem.weight"], initial["_conv_stem.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_killed_run_resumes_to_the_same_metrics(tiny_processed, tmp_path, monkeypatch, workers):
    _, processed, policy = tiny_processed
    _, uninterrupted, _ = _train(tmp_path, processed, policy, epochs=4, runtime={"train_workers": workers})

    params = tiny_params(train={"epochs": 4}, runtime={"train_workers": workers})
    out = tmp_path / "killed"
    interrupted_run = _interrupted_in_epoch(3, monkeypatch, params, processed, policy, out)
    # an interrupted run is ended as KILLED, not left RUNNING, until the next run continues it
    assert mlflow.get_run(interrupted_run).info.status == "KILLED"
    result = run_train(params, processed, policy, out / "models", out / "reports", progress=False)
    assert result["run_id"] == interrupted_run
    assert mlflow.get_run(result["run_id"]).info.status == "FINISHED"
    resumed = pd.read_csv(out / "reports" / "train_history.csv")
    columns = ["epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1"]
    pd.testing.assert_frame_equal(uninterrupted[columns], resumed[columns])
    # The resumed run continues the same MLflow run: one value per epoch, no duplicates.
    curve = mlflow.MlflowClient().get_metric_history(result["run_id"], "train_loss")
    assert sorted(m.step for m in curve) == [1, 2, 3, 4]


def _interrupted_in_epoch(epoch, monkeypatch, params, processed, policy, out) -> str:
    """Run training into ``out`` and interrupt it in ``epoch`` after that epoch has trained but
    before it is checkpointed (a kill mid-epoch); return the MLflow run id of its checkpoint."""
    real_evaluate = training_module.evaluate_split
    calls = {"n": 0}

    def die_in_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == epoch:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(training_module, "evaluate_split", die_in_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_train(params, processed, policy, out / "models", out / "reports", progress=False)
    monkeypatch.setattr(training_module, "evaluate_split", real_evaluate)
    checkpoint = read_checkpoint(out / "models" / "checkpoints" / "last.pt")
    assert checkpoint["epoch"] == epoch - 1
    return checkpoint["run_id"]


@pytest.mark.slow
def test_checkpoint_of_other_params_is_not_resumed(tiny_processed, tmp_path, monkeypatch, capsys):
    _, processed, policy = tiny_processed
    out = tmp_path / "x"
    _interrupted_in_epoch(2, monkeypatch, tiny_params(train={"epochs": 3}), processed, policy, out)
    run_train(tiny_params(train={"epochs": 2, "lr": 0.001}), processed, policy, out / "models", out / "reports",
              progress=False)
    assert "was saved for other train params; starting afresh" in capsys.readouterr().out
    assert pd.read_csv(out / "reports" / "train_history.csv")["epoch"].tolist() == [1, 2]


def _overwrite_pixels_keeping_file_times(processed) -> None:
    """Invert every image of ``images.npy`` in place, then put its modification time back; normalize.json
    records the new pixels, as after a normalize run (else the processed-data check refuses them)."""
    images_path = processed / IMAGES_FILE
    times = images_path.stat()
    images = np.load(images_path, mmap_mode="r+")
    images[:] = 255 - images
    images.flush()
    summary = json.loads((processed / NORMALIZE_SUMMARY_FILE).read_text())
    (processed / NORMALIZE_SUMMARY_FILE).write_text(json.dumps({**summary, "images_sample_sha256":
                                                                images_sample_sha256(images)}))
    del images
    os.utime(images_path, ns=(times.st_atime_ns, times.st_mtime_ns))


@pytest.mark.slow
@pytest.mark.parametrize("change", ["renormalized", "pixels"])
def test_checkpoint_of_other_normalized_data_is_not_resumed(tiny_processed, tmp_path, monkeypatch, capsys, change):
    raw, processed, policy = tiny_processed
    out = tmp_path / "x"
    old_run = _interrupted_in_epoch(2, monkeypatch, tiny_params(), processed, policy, out)
    if change == "renormalized":  # killed at pad/40 px, the data then normalized again to crop/48 px
        params = tiny_params(normalize={"mode": "crop", "size": 48})
        run_normalize(tmp_path / "manifest.csv", raw, processed, params.normalize, progress=False)
        changed = "normalize params, processed images"
    else:  # same params and file size and time, other pixels
        params = tiny_params()
        _overwrite_pixels_keeping_file_times(processed)
        changed = "processed images"
    capsys.readouterr()
    result = run_train(params, processed, policy, out / "models", out / "reports", progress=False)
    printed = capsys.readouterr().out
    assert "resuming" not in printed
    assert f"last.pt was saved for other {changed}; starting afresh in a new MLflow run" in printed
    assert result["run_id"] != old_run
    assert pd.read_csv(out / "reports" / "train_history.csv")["epoch"].tolist() == [1, 2, 3]


_KILLED_IN_SECOND_EPOCH = textwrap.dedent("""
    import os, signal, sys
    from pipeline import cli, training

    evaluate, calls = training.evaluate_split, []

    def evaluate_or_die(*args, **kwargs):
        calls.append(None)
        if len(calls) == 2:  # epoch 1 checkpointed, epoch 2 trained: kill -9, nothing runs after it
            os.kill(os.getpid(), signal.SIGKILL)
        return evaluate(*args, **kwargs)

    training.evaluate_split = evaluate_or_die
    sys.exit(cli.main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_killed_run_that_cannot_be_resumed_is_closed_not_left_running(tiny_processed, tmp_path, isolated_mlflow,
                                                                       capsys):
    raw, processed, policy = tiny_processed
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(tiny_params().model_dump(mode="json")))
    models, reports = tmp_path / "models", tmp_path / "reports"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": isolated_mlflow}
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_IN_SECOND_EPOCH, "--quiet", "--params", str(params_file), "train",
         "--processed", str(processed), "--policy", str(policy), "--models", str(models), "--reports", str(reports),
         "--interim", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    stale_run = read_checkpoint(models / "checkpoints" / "last.pt")["run_id"]
    mlflow.set_tracking_uri(isolated_mlflow)
    assert mlflow.get_run(stale_run).info.status == "RUNNING"  # what a kill -9 leaves behind

    params = tiny_params(normalize={"mode": "crop"})
    run_normalize(tmp_path / "manifest.csv", raw, processed, params.normalize, progress=False)
    result = run_train(params, processed, policy, models, reports, progress=False)
    assert f"the checkpoint's run {stale_run} is closed" in capsys.readouterr().out
    assert mlflow.get_run(stale_run).info.status == "KILLED"
    assert mlflow.get_run(result["run_id"]).info.status == "FINISHED"


@pytest.mark.slow
def test_ddp_with_two_gloo_processes_logs_one_run(tiny_processed, tmp_path, isolated_mlflow):
    raw, processed, policy = tiny_processed
    params = tiny_params(train={"epochs": 2}, tracking={"experiment": "ddp"}, data={"root": str(raw)})
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": isolated_mlflow}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               "-m", "pipeline.cli", "--params", str(params_file), "train", "--processed",
               str(processed), "--policy", str(policy), "--models", str(tmp_path / "models"), "--reports",
               str(tmp_path / "reports"), "--interim", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("train: best val macro-F1") == 1  # only rank 0 reports
    mlflow.set_tracking_uri(isolated_mlflow)
    runs = mlflow.search_runs(experiment_names=["ddp"])
    assert len(runs) == 1
    assert runs.iloc[0]["params.world_size"] == "2"
    assert (tmp_path / "models" / "model.pt").is_file()
