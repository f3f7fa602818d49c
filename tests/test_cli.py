"""The `wbc` command line: sub-commands per stage, clean errors."""

import pytest

from pipeline.cli import build_parser, main
from pipeline.fetch import DATASETS


def test_every_stage_has_a_sub_command():
    parser = build_parser()
    for command in ("sample", "ingest", "normalize", "augment", "train", "evaluate"):
        assert parser.parse_args([command]).command == command


def test_fetch_offers_exactly_the_datasets_of_the_registry(capsys):
    parser = build_parser()
    for name in DATASETS:
        assert parser.parse_args(["fetch", name]).dataset == name
    with pytest.raises(SystemExit):
        parser.parse_args(["fetch", "imagenet"])
    with pytest.raises(SystemExit):
        parser.parse_args(["fetch", "--help"])
    assert "{" + ",".join(DATASETS) + "}" in capsys.readouterr().out


def test_missing_params_file_is_a_clean_error(tmp_path, capsys):
    assert main(["--params", str(tmp_path / "none.yaml"), "ingest"]) == 2
    err = capsys.readouterr().err
    assert "none.yaml: params file not found" in err and "Traceback" not in err


def test_missing_data_root_names_the_param(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  root: {tmp_path / 'nowhere'}\n")
    assert main(["--quiet", "--params", str(params), "ingest", "--out", str(tmp_path / "i")]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "data.root" in err


def test_training_before_normalize_says_what_to_run(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("{}\n")
    assert main(["--params", str(params), "train", "--processed", str(tmp_path / "p")]) == 2
    assert "run `wbc normalize`" in capsys.readouterr().err


def test_debug_env_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("WBC_DEBUG", "1")
    with pytest.raises(Exception, match="params file not found"):
        main(["--params", str(tmp_path / "none.yaml"), "ingest"])
