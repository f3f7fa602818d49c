"""The `wbc` command line: sub-commands per stage, help, version, quiet mode, clean errors and exit codes."""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import __version__
from pipeline.cli import build_parser, main, metrics_summary
from pipeline.fetch import DATASETS

REPO = Path(__file__).resolve().parents[1]
RST_MARKUP = re.compile(r"``|:(func|mod|data|class|meth|attr|ref):`")
TINY_SAMPLE = "data:\n  classes: [basophil, eosinophil]\nsample:\n  per_class: 4\n  size: 32\n"


def _sub_commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _params(tmp_path: Path, text: str) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return str(path)


def _one_paragraph_error(err: str, command: str) -> str:
    assert err.startswith(f"wbc {command}: error: "), err
    assert "Traceback" not in err and "\n\n" not in err.strip(), err
    return err


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


def test_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"wbc {__version__}"


def test_help_shows_no_markup_and_every_option_its_help_and_default():
    parser = build_parser()
    for name, sub in {"wbc": parser, **_sub_commands(parser)}.items():
        text = sub.format_help()
        assert not RST_MARKUP.search(text), (name, RST_MARKUP.search(text).group())
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            assert action.help, (name, action.dest)
            takes_value = action.option_strings and not isinstance(action, argparse._StoreTrueAction)
            wanted = "(required)" if action.required else "default: "
            assert not takes_value or wanted in action.help, (name, action.dest)
    shown = " ".join(_sub_commands(parser)["ingest"].format_help().split())
    assert "(default: data/interim)" in shown and "(default: params.yaml)" in shown


def test_readme_command_list_names_every_sub_command():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Command line", 1)[1].split("\n## ", 1)[0]
    missing = [name for name in _sub_commands(build_parser()) if f"`{name}`" not in section]
    assert not missing, f"README's Command line section does not list {missing}"


@pytest.mark.parametrize(
    "argv",
    [["-q", "--params", "x.yaml", "ingest"], ["ingest", "-q", "--params", "x.yaml"],
     ["--quiet", "ingest", "--params", "x.yaml"], ["--params", "x.yaml", "ingest", "--quiet"]],
)
def test_quiet_and_params_go_before_or_after_the_sub_command(argv):
    args = build_parser().parse_args(argv)
    assert args.quiet is True and args.params == Path("x.yaml") and args.command == "ingest"


def test_options_left_out_keep_their_defaults():
    args = build_parser().parse_args(["ingest"])
    assert args.quiet is False and args.params == Path("params.yaml")


def test_quiet_means_nothing_on_stdout_or_stderr(tmp_path, capsys):
    params = _params(tmp_path, TINY_SAMPLE)
    assert main(["--params", params, "sample", "--out", str(tmp_path / "a")]) == 0
    assert "synthetic sample: 8 images" in capsys.readouterr().out
    assert main(["sample", "--params", params, "--out", str(tmp_path / "b"), "-q"]) == 0
    assert capsys.readouterr() == ("", "")
    assert len(list((tmp_path / "b").rglob("*.png"))) + len(list((tmp_path / "b").rglob("*.jpg"))) == 8


METRICS = {"accuracy": 0.55, "balanced_accuracy": 0.51, "macro_f1": 0.49, "n": 182,
           **{f"recall/{name}": value for name, value in (("basophil", 0.35), ("monocyte", 0.05), ("ig", 0.26))},
           **{f"precision/{name}": 0.5 for name in ("basophil", "monocyte", "ig")}}


def test_evaluate_prints_a_short_summary_and_nothing_when_quiet(tmp_path, capsys, monkeypatch):
    import pipeline.evaluate

    monkeypatch.setattr(pipeline.evaluate, "run_evaluate", lambda *args: dict(METRICS))
    params = _params(tmp_path, "{}\n")
    assert main(["--params", params, "evaluate", "--reports", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 2 and "{" not in out, out
    assert "macro F1 0.4900" in out and "182 images" in out and "monocyte 0.0500" in out
    assert str(tmp_path / "r" / "metrics.json") in out
    assert main(["--params", params, "evaluate", "-q"]) == 0
    assert capsys.readouterr() == ("", "")


def test_metrics_summary_names_the_weakest_class_and_skips_classes_without_images():
    line = metrics_summary({**METRICS, "recall/platelet": float("nan")})
    assert line.startswith("macro F1 0.4900, balanced accuracy 0.5100, accuracy 0.5500 on 182 images")
    assert line.endswith("lowest recall: monocyte 0.0500")


def test_missing_params_file_is_a_clean_error(tmp_path, capsys):
    assert main(["--params", str(tmp_path / "none.yaml"), "ingest"]) == 1
    err = _one_paragraph_error(capsys.readouterr().err, "ingest")
    assert "none.yaml: params file not found" in err


def test_bad_params_fail_before_any_work_naming_each_key(tmp_path, capsys):
    params = _params(tmp_path, 'data:\n  classes: [mono(cyte), "a/b"]\ntrain:\n  epochs: "3"\n')
    assert main(["--params", params, "sample", "--out", str(tmp_path / "s")]) == 1
    err = _one_paragraph_error(capsys.readouterr().err, "sample")
    assert "data.classes" in err and "'('" in err and "train.epochs" in err and "'3'" in err
    assert not (tmp_path / "s").exists()


def test_missing_data_root_names_the_param(tmp_path, capsys):
    params = _params(tmp_path, f"data:\n  root: {tmp_path / 'nowhere'}\n")
    assert main(["--quiet", "--params", params, "ingest", "--out", str(tmp_path / "i")]) == 1
    err = _one_paragraph_error(capsys.readouterr().err, "ingest")
    assert "nowhere" in err and "data.root" in err


def test_training_before_normalize_says_what_to_run(tmp_path, capsys):
    params = _params(tmp_path, "{}\n")
    assert main(["--params", params, "train", "--processed", str(tmp_path / "p")]) == 1
    assert "run `wbc normalize`" in _one_paragraph_error(capsys.readouterr().err, "train")


def test_usage_errors_keep_exit_status_2(tmp_path, capsys):
    for argv in (["ingest", "--no-such-option"], []):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2, argv
    capsys.readouterr()
    assert main(["evaluate", "--params", _params(tmp_path, "{}\n"), "--name", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: wbc evaluate") and "wbc evaluate: error: --name only apply with --dataset" in err


def test_memory_error_is_one_paragraph_with_exit_1(tmp_path, capsys, monkeypatch):
    import pipeline.ingest

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(pipeline.ingest, "run_ingest", out_of_memory)
    assert main(["--params", _params(tmp_path, "{}\n"), "ingest"]) == 1
    assert "out of memory" in _one_paragraph_error(capsys.readouterr().err, "ingest")


def test_an_interrupt_ends_quietly_with_status_130(tmp_path, capsys, monkeypatch):
    import pipeline.ingest

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.ingest, "run_ingest", interrupted)
    assert main(["--params", _params(tmp_path, "{}\n"), "ingest"]) == 130
    assert capsys.readouterr().err == "wbc ingest: interrupted\n"


def test_os_error_names_the_file(tmp_path, capsys, monkeypatch):
    import pipeline.ingest

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "locked"))

    monkeypatch.setattr(pipeline.ingest, "run_ingest", denied)
    assert main(["--params", _params(tmp_path, "{}\n"), "ingest"]) == 1
    err = _one_paragraph_error(capsys.readouterr().err, "ingest")
    assert f"Permission denied: {tmp_path / 'locked'}" in err


def test_mlflow_error_names_the_store_without_its_password(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://lab:s3cret@127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    assert main(["--params", _params(tmp_path, "{}\n"), "compare", "--reports", str(tmp_path / "r")]) == 1
    err = _one_paragraph_error(capsys.readouterr().err, "compare")
    assert "MLflow (tracking store http://lab:***@127.0.0.1:9)" in err and "s3cret" not in err


def test_debug_env_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("WBC_DEBUG", "1")
    with pytest.raises(Exception, match="params file not found"):
        main(["--params", str(tmp_path / "none.yaml"), "ingest"])


def _limit_memory(limit: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


@pytest.mark.skipif(sys.platform != "linux", reason="sparse files and RLIMIT_AS as on Linux")
def test_a_4_gb_file_is_rejected_unread_under_a_2_gb_memory_limit(tmp_path):
    root = tmp_path / "raw"
    for index, name in enumerate(("basophil", "eosinophil")):
        (root / name).mkdir(parents=True)
        for k in range(8):
            (root / name / f"{k}.ppm").write_bytes(b"P6 20 20 255\n" + bytes([index * 100 + k]) * 1200)
    huge = root / "basophil" / "huge.png"
    with huge.open("wb") as handle:
        handle.truncate(4 * 1024**3)  # sparse: no disk space, no write of 4 GB
    params = _params(tmp_path, f"data:\n  root: {root}\n  classes: [basophil, eosinophil]\n"
                               "ingest:\n  formats: [PPM]\n  near_dup_threshold: 0\nruntime:\n  ingest_workers: 1\n")
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "-q", "--params", params, "ingest", "--out", str(tmp_path / "i"),
         "--reports", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=300, preexec_fn=lambda: _limit_memory(2 * 1024**3),
        env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and "Traceback" not in done.stderr
    with (tmp_path / "i" / "rejected.csv").open(newline="") as handle:
        rejected = {row["path"]: row for row in csv.DictReader(handle)}
    assert rejected["basophil/huge.png"]["reason"] == "too-large"
    assert "ingest.max_file_bytes" in rejected["basophil/huge.png"]["detail"]
