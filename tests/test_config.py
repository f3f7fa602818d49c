"""Params are validated once, with errors that name the key and what it accepts."""

from pathlib import Path

import pytest
import yaml

from pipeline.config import PBC_CLASSES, Params, ParamsError, load_params, parse_params

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_file_is_valid_and_matches_defaults():
    params = load_params(REPO / "params.yaml")
    assert params.data.classes == list(PBC_CLASSES)
    assert params.normalize.size == 380
    assert params == parse_params(yaml.safe_load((REPO / "params.yaml").read_text()))


def test_missing_sections_take_defaults():
    assert parse_params({}) == Params()


def test_unknown_key_is_named_with_the_allowed_keys():
    with pytest.raises(ParamsError) as err:
        parse_params({"train": {"learning_rate": 0.1}})
    message = str(err.value)
    assert "train.learning_rate" in message
    assert "unknown key" in message and "lr" in message and "batch_size" in message


def test_unknown_section_is_named():
    with pytest.raises(ParamsError, match="trainning: unknown key; allowed keys here: data, sample"):
        parse_params({"trainning": {}})


def test_wrong_value_names_key_allowed_values_and_input():
    with pytest.raises(ParamsError) as err:
        parse_params({"train": {"model": "resnet19"}, "normalize": {"mode": "stretch"}})
    message = str(err.value)
    assert "train.model" in message and "resnet19" in message and "efficientnet-b0" in message
    assert "normalize.mode" in message and "'pad' or 'crop'" in message


def test_wrong_type_is_reported():
    with pytest.raises(ParamsError, match=r"train\.epochs: .*integer.*'ten'"):
        parse_params({"train": {"epochs": "ten"}})


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"ingest": {"val_fraction": 0.5, "test_fraction": 0.45}}, "must stay below 0.9"),
        ({"train": {"epochs": 2, "freeze_epochs": 3}}, "cannot exceed epochs"),
        ({"normalize": {"pad_color": [0, 300, 0]}}, "normalize.pad_color"),
        ({"data": {"classes": ["a", "a"]}}, "unique"),
        ({"augment": {"hflip": 1.5}}, "augment.hflip"),
    ],
)
def test_cross_field_and_range_checks(raw, needle):
    with pytest.raises(ParamsError, match=needle):
        parse_params(raw)


def test_load_params_reports_missing_and_broken_files(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    broken = tmp_path / "params.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(broken)


def test_predict_section_and_registry_name():
    params = load_params(REPO / "params.yaml")
    assert params.predict == Params().predict and params.predict.threshold == 0.5
    assert params.train.registered_model == "wbc-classifier"
    assert parse_params({"train": {"registered_model": ""}}).train.registered_model is None
    with pytest.raises(ParamsError, match=r"predict\.threshold"):
        parse_params({"predict": {"threshold": 1.5}})
