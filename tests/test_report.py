"""The HTML report is self-contained, states its source, escapes its inputs; the Markdown summary agrees."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import calibration, metrics
from pipeline.report import write_report

CLASSES = ["basophil", "eosinophil", "lymphocyte"]
EVIL_CLASS = '<script>alert("x")</script>'
EVIL_DATASET = "<img src=x onerror=alert(1)>"


def _metrics(classes: list[str]) -> dict:
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, len(classes) - 1, 40)  # the last class is absent: its recall is n/a
    logits = rng.normal(size=(40, len(classes)))
    logits[np.arange(40), y_true] += 2
    result = metrics.classification_metrics(y_true, calibration.softmax(logits), classes, n_bootstrap=50)
    result["calibration"] = calibration.calibration_summary(y_true, logits, 1.3)
    return result


@pytest.fixture(scope="module")
def figure(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fig") / "confusion.png"
    Image.new("RGB", (8, 6), (30, 90, 160)).save(path)
    return path


def _write(tmp_path: Path, figure: Path, *, synthetic: bool, classes=CLASSES, dataset="data/raw/synthetic"):
    out_html, out_md = tmp_path / "reports" / "report.html", tmp_path / "reports" / "report.md"
    provenance = {
        "dataset": dataset,
        "split": "test",
        "root": dataset,
        "counts": {
            "train": {c: 10 for c in classes},
            "val": {c: 2 for c in classes},
            "test": {c: 4 for c in classes},
        },
        "n_rejected": 3,
        "rejected_by_reason": {"truncated": 2, "empty-file": 1},
        "data_hash": "f" * 64,
        "git_commit": "1234567abcdef",
        "git_dirty": True,
        "mlflow_run_id": "run-42",
    }
    model = {"name": "resnet18", "pretrained": "imagenet", "image_size": 128, "epochs": 3}
    params = {"train": {"model": "resnet18", "lr": 0.001, "tags": ("a", "b")}, "data": {"classes": classes}}
    write_report(
        out_html,
        out_md,
        title="WBC evaluation",
        synthetic=synthetic,
        provenance=provenance,
        model=model,
        params=params,
        metrics=_metrics(classes),
        figures={"confusion": figure, "extra_view": figure},
    )
    return out_html.read_text(encoding="utf-8"), out_md.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def synthetic_report(tmp_path_factory, figure) -> tuple[str, str]:
    return _write(tmp_path_factory.mktemp("synthetic"), figure, synthetic=True)


def test_synthetic_title_everywhere(synthetic_report):
    page, summary = synthetic_report
    title = re.search(r"<title>(.*?)</title>", page).group(1)
    heading = re.search(r"<h1>(.*?)</h1>", page).group(1)
    assert "SYNTHETIC DATA" in title
    assert "SYNTHETIC DATA" in heading
    assert summary.splitlines()[0].startswith("# ") and "SYNTHETIC DATA" in summary.splitlines()[0]


def test_real_data_title_has_no_synthetic_mark(tmp_path, figure):
    page, summary = _write(tmp_path, figure, synthetic=False)
    assert "SYNTHETIC" not in page
    assert "SYNTHETIC" not in summary
    assert "<title>WBC evaluation</title>" in page


def test_html_is_self_contained(synthetic_report):
    page, _ = synthetic_report
    assert "http://" not in page and "https://" not in page
    references = re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]+)""", page, flags=re.IGNORECASE)
    assert references, "the figures should be embedded as images"
    assert all(ref.startswith("data:image/png;base64,") for ref in references)
    assert "<link" not in page and "<script" not in page and "@import" not in page and "url(" not in page


class _TagBalance(HTMLParser):
    VOID = {"meta", "br", "img", "hr", "input", "link"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def test_html_tags_are_balanced(synthetic_report):
    parser = _TagBalance()
    parser.feed(synthetic_report[0])
    assert parser.errors == [] and parser.stack == []


def test_per_class_rows_and_sections(synthetic_report):
    page, summary = synthetic_report
    for name in CLASSES:
        assert re.search(rf"<tr><th>{name}</th><td class=\"num\">\d+</td>", page), name
        assert f"| {name} |" in summary
    assert "n/a" in page and "n/a" in summary  # recall of the absent class
    for needed in ("Specificity", "ROC AUC", "Average precision", "95% CI", "Macro F1", "Cohen&#x27;s kappa"):
        assert needed in page, needed
    for needed in ("1234567abcdef", "run-42", "f" * 64, "train 30, val 6, test 12", "truncated: 2"):
        assert needed in page, needed
        assert needed in summary, needed
    assert 'class="dirty"' in page
    assert "Fitted temperature" in page
    assert "lr: 0.001" in page and "lr: 0.001" in summary


def test_every_number_names_its_source(synthetic_report):
    page, summary = synthetic_report
    assert page.count("test split of data/raw/synthetic") >= 4
    assert "All metrics: test split of data/raw/synthetic, n = 40 images" in summary
    assert "Source: test split of data/raw/synthetic." in page  # figure captions


def test_figures_are_linked_from_markdown(synthetic_report):
    _, summary = synthetic_report
    assert re.search(r"\]\(\.\./[^)]*confusion\.png\)", summary)


def test_malicious_names_are_escaped(tmp_path, figure):
    classes = ["basophil", EVIL_CLASS, "lymphocyte"]
    page, summary = _write(tmp_path, figure, synthetic=True, classes=classes, dataset=EVIL_DATASET)
    assert EVIL_CLASS not in page and EVIL_DATASET not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    # Only fenced code (the params YAML) may hold the raw text: Markdown renders it literally.
    prose = re.sub(r"```.*?```", "", summary, flags=re.DOTALL)
    assert "<script" not in prose and "<img" not in prose
    parser = _TagBalance()
    parser.feed(page)
    assert parser.errors == [] and parser.stack == []


def test_non_image_figure_is_refused(tmp_path):
    bogus = tmp_path / "plot.svg"
    bogus.write_text("<svg/>")
    with pytest.raises(ValueError, match="PNG or JPEG"):
        write_report(
            tmp_path / "r.html",
            tmp_path / "r.md",
            title="t",
            synthetic=False,
            provenance={"dataset": "d", "split": "test"},
            model={},
            params={},
            metrics=_metrics(CLASSES),
            figures={"confusion": bogus},
        )


def test_note_sections_and_all_splits_are_rendered_and_escaped(tmp_path, figure):
    from pipeline.report import Section

    section = Section(
        "Images of classes the model does not know",
        "Left out of every metric.",
        ["External label", "Images", "Predicted as (images)"],
        [[EVIL_CLASS, 7, "basophil 5, lymphocyte 2"]],
    )
    write_report(
        tmp_path / "r.html",
        tmp_path / "r.md",
        title="External validation",
        synthetic=False,
        provenance={"dataset": "external dataset lab-b", "split": "all"},
        model={},
        params={},
        metrics=_metrics(CLASSES),
        figures={"worst_errors": figure, "gradcam": figure},
        note="Every number comes from lab-b.",
        sections=[section, Section("Empty", "Nothing here.")],
    )
    page, summary = (tmp_path / "r.html").read_text(), (tmp_path / "r.md").read_text()
    source = "all images (train, val and test splits) of external dataset lab-b"
    assert f"All metrics: {source}, n = 40 images" in page and f"All metrics: {source}, n = 40 images" in summary
    assert f"Source: {source}." in page  # figure captions
    assert '<p class="note">Every number comes from lab-b.</p>' in page
    assert "Every number comes from lab-b." in summary
    assert "<h2>Images of classes the model does not know</h2>" in page and "basophil 5, lymphocyte 2" in page
    assert "&lt;script&gt;" in page and EVIL_CLASS not in page
    assert "## Images of classes the model does not know" in summary and "| 7 | basophil 5, lymphocyte 2 |" in summary
    assert "<h2>Empty</h2>" in page and "## Empty" in summary
    assert page.index("Per-class metrics") < page.index("Images of classes the model") < page.index("<h2>Errors")
    for key in ("worst_errors", "gradcam"):
        assert f'<figure id="fig-{key}">' in page
    assert "Worst errors: the misclassified images" in page and "Grad-CAM: for a few images" in page
    parser = _TagBalance()
    parser.feed(page)
    assert parser.errors == [] and parser.stack == []


def test_interval_level_and_missing_temperature_are_stated(tmp_path):
    result = _metrics(CLASSES)
    result["ci_level"] = 0.9
    write_report(tmp_path / "r.html", tmp_path / "r.md", title="t", synthetic=False,
                 provenance={"dataset": "d", "split": "test", "site": "lab-b"}, model={}, params={}, metrics=result,
                 figures={}, temperature_fitted=False)
    page, summary = (tmp_path / "r.html").read_text(), (tmp_path / "r.md").read_text()
    assert "95%" not in page and "95%" not in summary
    assert page.count("90% CI") >= 3 and "Value (90% CI)" in summary and "<dt>90% CI</dt>" in page
    assert "test split of d (site lab-b), n = 40 images" in page
    for text in (page, summary):
        assert "saved without a fitted temperature, so T = 1.0" in text
