"""Training: schedule and parameter groups, MLflow logging, determinism, kill-and-resume, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO, tiny_params

from pipeline import train as train_module
from pipeline.models import _monai_efficientnet_key, build_classifier, head_parameters
from pipeline.train import class_weights, parameter_groups, run_train, warmup_cosine


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


def _train(tmp_path, processed, policy, **train_overrides):
    params = tiny_params(train=train_overrides)
    out = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
    result = run_train(params, processed, policy, out / "models", out / "reports", progress=False)
    history = pd.read_csv(out / "reports" / "train_history.csv")
    return result, history, out


def test_training_writes_model_history_and_one_mlflow_run(tiny_processed, tmp_path):
    _, processed, policy = tiny_processed
    result, history, out = _train(tmp_path, processed, policy, log_model=True, registered_model="")
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
    assert "registered_model" not in run_info
    logged = mlflow.pyfunc.load_model(run_info["model_uri"])
    example = logged.input_example
    assert list(example.columns) == ["image"]
    answer = logged.predict(pd.concat([example, pd.DataFrame({"path": [str(tmp_path / "missing.png")]})]))
    assert answer["status"].tolist() == ["ok", "missing-file"]
    probs = answer.loc[0, [f"p_{name}" for name in meta.classes]].to_numpy(dtype=float)
    assert probs.sum() == pytest.approx(1.0) and answer.loc[0, "predicted"] == meta.classes[probs.argmax()]
    assert answer.loc[1, "p_basophil"] is None


def test_same_seed_same_history_on_cpu(tiny_processed, tmp_path):
    _, processed, policy = tiny_processed
    _, first, _ = _train(tmp_path, processed, policy)
    _, second, _ = _train(tmp_path, processed, policy)
    columns = ["train_loss", "val_loss", "val_accuracy", "val_macro_f1"]
    pd.testing.assert_frame_equal(first[columns], second[columns])


def test_frozen_backbone_epochs_leave_the_backbone_untouched(tiny_processed, tmp_path, monkeypatch):
    _, processed, policy = tiny_processed
    snapshots = []
    real_evaluate = train_module.evaluate_split

    def spy(model, *args, **kwargs):
        snapshots.append({k: v.clone() for k, v in model.net.state_dict().items()})
        return real_evaluate(model, *args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate_split", spy)
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


@pytest.mark.parametrize("workers", [0, 2])
def test_killed_run_resumes_to_the_same_metrics(tiny_processed, tmp_path, monkeypatch, workers):
    _, processed, policy = tiny_processed
    _, uninterrupted, _ = _train(tmp_path, processed, policy, epochs=4, num_workers=workers)

    params = tiny_params(train={"epochs": 4, "num_workers": workers})
    out = tmp_path / "killed"
    real_evaluate = train_module.evaluate_split
    calls = {"n": 0}

    def die_in_third_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # epoch 3 trained but not yet checkpointed: a kill mid-epoch
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate_split", die_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_train(params, processed, policy, out / "models", out / "reports", progress=False)
    mlflow.end_run()
    assert (out / "models" / "checkpoints" / "last.pt").is_file()
    monkeypatch.setattr(train_module, "evaluate_split", real_evaluate)
    result = run_train(params, processed, policy, out / "models", out / "reports", progress=False)
    resumed = pd.read_csv(out / "reports" / "train_history.csv")
    columns = ["epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1"]
    pd.testing.assert_frame_equal(uninterrupted[columns], resumed[columns])
    # The resumed run continues the same MLflow run: one value per epoch, no duplicates.
    curve = mlflow.MlflowClient().get_metric_history(result["run_id"], "train_loss")
    assert sorted(m.step for m in curve) == [1, 2, 3, 4]


def test_checkpoint_of_other_params_is_not_resumed(tiny_processed, tmp_path, monkeypatch, capsys):
    _, processed, policy = tiny_processed
    out = tmp_path / "x"
    real_evaluate = train_module.evaluate_split
    calls = {"n": 0}

    def die_in_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate_split", die_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_train(tiny_params(train={"epochs": 3}), processed, policy, out / "models", out / "reports",
                  progress=False)
    mlflow.end_run()
    assert (out / "models" / "checkpoints" / "last.pt").is_file()
    monkeypatch.setattr(train_module, "evaluate_split", real_evaluate)
    run_train(tiny_params(train={"epochs": 2, "lr": 0.001}), processed, policy, out / "models", out / "reports",
              progress=False)
    assert "starting afresh" in capsys.readouterr().out
    assert pd.read_csv(out / "reports" / "train_history.csv")["epoch"].tolist() == [1, 2]


@pytest.mark.slow
def test_ddp_with_two_gloo_processes_logs_one_run(tiny_processed, tmp_path, isolated_mlflow):
    raw, processed, policy = tiny_processed
    params = tiny_params(train={"epochs": 2, "experiment": "ddp"}, data={"root": str(raw)})
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": isolated_mlflow}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               "-m", "pipeline.cli", "--quiet", "--params", str(params_file), "train", "--processed",
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
