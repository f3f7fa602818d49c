"""Params are validated once, with errors that name the key and what it accepts."""

import io
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.config import IMAGE_FORMATS, PBC_CLASSES, IngestParams, Params, ParamsError, load_params, parse_params
from pipeline.imaging import decode_rgb
from pipeline.inspection import inspect_bytes

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_file_states_every_param_at_its_default():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    defaults = Params().model_dump(mode="json")
    assert sorted(raw) == sorted(defaults)
    missing = [f"{section}.{key}" for section, values in defaults.items() for key in values if key not in raw[section]]
    assert not missing, f"params.yaml does not state {', '.join(missing)}"
    stated = load_params(REPO / "params.yaml").model_dump(mode="json")
    differ = [f"{section}.{key}: {stated[section][key]!r} != {value!r}" for section, values in defaults.items()
              for key, value in values.items() if stated[section][key] != value]
    assert not differ, "params.yaml differs from the defaults in config.py: " + "; ".join(differ)
    assert stated["data"]["classes"] == list(PBC_CLASSES) and stated["normalize"]["size"] == 380


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
        parse_params({"train": {"epochs": 0}, "normalize": {"mode": "stretch"}})
    message = str(err.value)
    assert "train.epochs" in message and "greater than or equal to 1" in message
    assert "normalize.mode" in message and "'pad' or 'crop'" in message


def test_model_names_are_the_backbone_registry_checked_where_a_network_is_built():
    from pipeline.models import BACKBONES, build_classifier

    # params stay torch-free: any name parses, and the registry refuses an unknown one, listing its names
    assert parse_params({"train": {"model": "resnet19"}}).train.model == "resnet19"
    with pytest.raises(ValueError) as err:
        build_classifier("resnet19", 3, 32)
    message = str(err.value)
    assert "train.model" in message and "resnet19" in message and all(name in message for name in BACKBONES)
    with pytest.raises(ParamsError, match="train.model"):
        parse_params({"train": {"model": ""}})


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
    assert params.tracking.registered_model == "wbc-classifier"
    assert parse_params({"tracking": {"registered_model": ""}}).tracking.registered_model is None
    with pytest.raises(ParamsError, match=r"predict\.threshold"):
        parse_params({"predict": {"threshold": 1.5}})


@pytest.mark.parametrize(
    ("raw", "key", "needle"),
    [
        ({"train": {"epochs": "3"}}, "train.epochs", "without them"),
        ({"train": {"epochs": 3.0}}, "train.epochs", "integer"),
        ({"train": {"lr": "0.01"}}, "train.lr", "without them"),
        ({"runtime": {"compile": "yes"}}, "runtime.compile", "true or false"),
        ({"runtime": {"compile": 1}}, "runtime.compile", "true or false"),
        ({"normalize": {"pad_color": [255, 255, "255"]}}, "normalize.pad_color.2", "integer"),
        ({"data": {"root": 5}}, "data.root", "string"),
        ({"data": {"allow_outside_root": "no"}}, "data.allow_outside_root", "true or false"),
        ({"ingest": {"max_file_bytes": "200MB"}}, "ingest.max_file_bytes", "integer"),
    ],
)
def test_values_of_the_wrong_type_are_refused_not_coerced(raw, key, needle):
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    line = next(line for line in str(err.value).splitlines() if line.strip().startswith(key + ":"))
    assert needle in line


def test_integers_are_fine_for_floats_and_lists_for_fixed_length_values():
    params = parse_params({"train": {"lr": 1, "warmup_epochs": 0}, "normalize": {"pad_color": [0, 10, 20]}})
    assert params.train.lr == 1.0 and isinstance(params.train.lr, float)
    assert params.normalize.pad_color == (0, 10, 20)


def test_params_file_reads_exponent_numbers_and_refuses_quoted_ones(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 1e-3\n  weight_decay: 5.0E-5\ntracking:\n  experiment: 1e3-run\n")
    params = load_params(path)
    assert (params.train.lr, params.train.weight_decay, params.tracking.experiment) == (0.001, 5e-5, "1e3-run")
    path.write_text('train:\n  epochs: "3"\n')
    with pytest.raises(ParamsError, match=r"train\.epochs: .*'3'"):
        load_params(path)


@pytest.mark.parametrize(
    "name", ["a/b", "mono(cyte)", "a+b", "a,b", "<b>neutrophil</b>", "", "c/../../x", "..", "tab\there",
             "line\n", "back\\slash", " lead", "trail ", "$x$", "x" * 65, "é"],
)
def test_unsafe_class_names_are_refused_up_front(name):
    with pytest.raises(ParamsError) as err:
        parse_params({"data": {"classes": ["neutrophil", name]}})
    message = str(err.value)
    assert "data.classes[1]" in message and "letters, digits, spaces, '_', '-' or '.'" in message


def test_safe_class_names_are_valid_mlflow_metric_keys_and_file_names(tmp_path):
    from mlflow.utils.validation import _validate_metric_name

    names = ["Band neutrophil", "ig", "Type-2.a_b", "9", "x" * 64]
    assert parse_params({"data": {"classes": names}}).data.classes == names
    for name in names:
        _validate_metric_name(f"recall/{name}")
        (tmp_path / name).mkdir()
        assert (tmp_path / name).is_dir()


def test_class_names_differing_only_in_case_are_refused():
    with pytest.raises(ParamsError, match="ignoring case"):
        parse_params({"data": {"classes": ["Neutrophil", "neutrophil"]}})


def test_formats_are_limited_to_what_the_decoder_reads():
    assert parse_params({"ingest": {"formats": ["png", "Jpeg"]}}).ingest.formats == ["JPEG", "PNG"]
    with pytest.raises(ParamsError) as err:
        parse_params({"ingest": {"formats": ["JPG", "HEIC", "PNG"]}})
    message = str(err.value)
    assert "ingest.formats" in message and "HEIC, JPG not among" in message and "write JPEG for JPG" in message


@pytest.mark.parametrize("image_format", IMAGE_FORMATS)
def test_every_allowed_format_decodes_at_full_size(image_format):
    picture = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, image_format)
    found = inspect_bytes(buffer.getvalue(), IngestParams(formats=list(IMAGE_FORMATS)))
    assert (found.reason, found.format, found.width, found.height) == ("", image_format, 30, 40)
    assert decode_rgb(buffer.getvalue()).shape == (40, 30, 3)
