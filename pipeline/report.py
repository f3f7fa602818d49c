"""The evaluation report: one self-contained HTML page and a Markdown summary.

The HTML embeds its figures as base64 ``data:`` URIs and carries its CSS inline, so it opens
offline, can be attached to an MLflow run or mailed as one file. Every string that comes
from data, params or the environment is HTML-escaped before it reaches the page.

``metrics`` is the dict from :func:`pipeline.metrics.classification_metrics`, optionally with
a ``calibration`` section from :func:`pipeline.calibration.calibration_summary`. Which metrics
appear, their headings and their glossary entries come from :data:`pipeline.metrics.METRICS`.
``provenance`` needs ``dataset`` and ``split`` (where the numbers come from) and may carry the
fields of ``ingest.json`` (root, counts, n_files, n_kept, n_rejected, rejected_by_reason,
data_hash, classes) plus git_commit, git_dirty, mlflow_run_id, mlflow_experiment_id,
tracking_uri and created; other keys are listed as they are.
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

from pipeline.calibration import CALIBRATION_LABELS
from pipeline.metrics import CI_LEVEL, metric, most_confused_pairs, overall_metrics, per_class_metrics

# The overall metrics shown as cards at the top, in this order.
CARDS = ("macro_f1", "balanced_accuracy", "accuracy", "cohen_kappa")
FIGURE_CAPTIONS = {
    "sites": (
        f"Macro F1 per site with its {CI_LEVEL:.0%} bootstrap interval: blue, sites the model was trained on (their "
        "test split); red, sites it never saw (all their images). Each site is scored on the classes it has."
    ),
    "confusion": "Confusion matrix (counts). Rows are the true class, columns the predicted class.",
    "confusion_normalized": (
        "Confusion matrix normalised by true class: each row sums to 1 and the diagonal is the "
        "recall (sensitivity) of that class."
    ),
    "confused_pairs": (
        "Most frequent misclassifications (true → predicted), with the share of the true class."
    ),
    "roc": "One-vs-rest ROC curve of each class, with its area under the curve.",
    "pr": (
        "One-vs-rest precision-recall curve of each class, with its average precision; "
        "more telling than ROC for rare classes."
    ),
    "reliability": (
        "Reliability diagram: accuracy within each confidence bin. Bars on the diagonal mean the "
        "predicted probabilities can be read as frequencies; the lower panel counts images per bin."
    ),
    "training_curves": (
        "Training history: loss, validation accuracy and macro F1, and learning rate per epoch."
    ),
    "worst_errors": (
        "Worst errors: the misclassified images with the highest predicted probability for the wrong "
        "class (softmax before temperature scaling), most confident first, with true and predicted class."
    ),
    "gradcam": (
        "Grad-CAM: for a few images per true class, the image the network saw beside a heat map of the "
        "regions that raise the score of the predicted class (red = most influence); the title gives the "
        "predicted class and its probability, green if correct, red if wrong."
    ),
    "unknown_classes": (
        "Images whose label is no class of the model: what the model predicted for them. They are left out "
        "of every metric."
    ),
}
# Figures that do not come from the evaluated split.
FIGURE_SOURCES = {"training_curves": "train and validation splits", "sites": "every site"}
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
_MISSING = "—"


@dataclass(frozen=True)
class Section:
    """An extra report section after the per-class metrics: heading, a sentence or two, a table.

    ``rows`` hold plain values (escaped when rendered); with no rows only the text is shown.
    """

    title: str
    text: str
    header: Sequence[str] = ()
    rows: Sequence[Sequence[object]] = ()


@dataclass(frozen=True)
class _Page:
    """Everything one report shows (the arguments of :func:`write_report`)."""

    title: str
    synthetic: bool
    provenance: Mapping
    model: Mapping
    params: Mapping
    metrics: Mapping
    figures: Mapping[str, Path]
    note: str
    sections: tuple[Section, ...]
    temperature_fitted: bool


CSS = """
:root { --ink:#1d2330; --muted:#5b6475; --line:#d9dee7; --soft:#f4f6fa; --accent:#1f5fae; --warn:#a4161a; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color:var(--ink); background:#fff; }
main { max-width:1120px; margin:0 auto; padding:28px 32px 60px; }
h1 { font-size:26px; margin:0 0 6px; }
h2 { font-size:19px; margin:36px 0 10px; padding-bottom:6px; border-bottom:2px solid var(--line); }
h3 { font-size:15px; margin:20px 0 8px; }
p.source, .note { color:var(--muted); font-size:13px; margin:4px 0 12px; }
.banner { background:#fdecea; border:1px solid #f5c2c0; border-left:6px solid var(--warn); color:var(--warn);
          padding:12px 16px; border-radius:4px; margin:16px 0; font-weight:600; }
.cards { display:flex; flex-wrap:wrap; gap:12px; margin:14px 0 6px; }
.card { flex:1 1 180px; border:1px solid var(--line); border-radius:6px; padding:12px 14px;
        background:var(--soft); }
.card .label { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
.card .value { font-size:26px; font-weight:650; color:var(--accent); }
.card .ci { color:var(--muted); font-size:12px; }
table { border-collapse:collapse; margin:8px 0 14px; font-size:13.5px; }
th, td { padding:6px 10px; border-bottom:1px solid var(--line); text-align:left; vertical-align:top; }
th { background:var(--soft); font-weight:600; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
td .ci { color:var(--muted); font-size:12px; }
tbody tr:hover { background:#fafbfd; }
td.undefined { color:var(--muted); font-style:italic; }
.wide { overflow-x:auto; }
figure { margin:18px 0 26px; }
figure img { max-width:100%; height:auto; border:1px solid var(--line); border-radius:4px; }
figcaption { color:var(--muted); font-size:13px; margin-top:6px; max-width:820px; }
pre { background:var(--soft); border:1px solid var(--line); border-radius:4px; padding:12px; font-size:12.5px;
      overflow-x:auto; }
code { font-family:ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size:12.5px; }
dl.glossary dt { font-weight:600; margin-top:6px; }
dl.glossary dd { margin:0 0 4px 16px; color:var(--muted); font-size:13px; }
.dirty { color:var(--warn); font-weight:600; }
footer { margin-top:40px; color:var(--muted); font-size:12px; }
@media print { .banner { -webkit-print-color-adjust:exact; print-color-adjust:exact; }
               figure { break-inside:avoid; } }
"""

# Glossary entries besides the metrics' own (see _glossary); "{ci}" becomes e.g. "95% CI".
GLOSSARY_EXTRA = (
    (
        "{ci}",
        "Percentile bootstrap interval: the evaluated images are resampled with replacement and "
        "each metric recomputed; resamples in which a metric is undefined are left out.",
    ),
    (
        "n/a",
        "Undefined on this split, e.g. recall or AUC of a class with no images in it, or the "
        "precision of a class that is never predicted.",
    ),
)


# ---------------------------------------------------------------------------
# Formatting helpers
# ---------------------------------------------------------------------------


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _number(value: float | int | None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def _ci_text(entry: Mapping) -> str:
    if entry.get("ci_low") is None or entry.get("ci_high") is None:
        return ""
    return f"{_number(entry['ci_low'])}–{_number(entry['ci_high'])}"


def _ci_label(metrics: Mapping) -> str:
    """``95% CI`` for the interval level the metrics were computed at."""
    return f"{round(100 * metrics.get('ci_level', CI_LEVEL))}% CI"


def _glossary(metrics: Mapping) -> list[tuple[str, str]]:
    """(term, meaning): every declared metric, then the interval and n/a."""
    ci = _ci_label(metrics)
    declared = [(m.label, m.explanation) for m in (*overall_metrics(), *per_class_metrics())]
    return declared + [(term.format(ci=ci), text) for term, text in GLOSSARY_EXTRA]


def _display_title(title: str, synthetic: bool) -> str:
    if synthetic and "SYNTHETIC DATA" not in title:
        return f"{title} — SYNTHETIC DATA"
    return title


def split_phrase(split: object) -> str:
    """``test`` → "test split"; ``all`` → "all images (train, val and test splits)"."""
    if split == "all":
        return "all images (train, val and test splits)"
    return f"{split} split"


def _source_line(provenance: Mapping, metrics: Mapping) -> str:
    """Plain-text statement of where the numbers come from (escaped by the caller)."""
    return f"{_where(provenance)}, n = {metrics['n']:,} images"


def _where(provenance: Mapping) -> str:
    """"test split of PBC" (with the site when there is one): where the numbers come from."""
    split = split_phrase(provenance.get("split", "unnamed"))
    site = f" (site {provenance['site']})" if provenance.get("site") else ""
    return f"{split} of {provenance.get('dataset', 'unnamed dataset')}{site}"


def _ci_note(metrics: Mapping) -> str:
    if not metrics.get("n_bootstrap"):
        return "No bootstrap intervals were computed."
    return (
        f"{_ci_label(metrics).removesuffix(' CI')} percentile bootstrap intervals over {metrics['n_bootstrap']:,} "
        f"resamples (seed {metrics.get('seed', 0)})."
    )


def _plain(value: object) -> str:
    """A provenance / model value as readable text (containers as compact JSON)."""
    if value is None:
        return _MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def _md_cell(value: object) -> str:
    return _esc(value).replace("|", "\\|").replace("\n", " ")


# ---------------------------------------------------------------------------
# Provenance rows shared by HTML and Markdown
# ---------------------------------------------------------------------------


_REPRO_KEYS = {
    "git_commit": "Git commit",
    "git_dirty": "Uncommitted changes",
    "mlflow_run_id": "MLflow run id",
    "mlflow_experiment_id": "MLflow experiment id",
    "tracking_uri": "MLflow tracking URI",
}


def _split_sizes(counts: Mapping) -> str:
    return ", ".join(f"{split} {sum(per_class.values()):,}" for split, per_class in counts.items())


def _provenance_rows(provenance: Mapping, synthetic: bool) -> list[tuple[str, str]]:
    known = {
        "dataset": "Dataset",
        "split": "Evaluated split",
        "site": "Site",
        "root": "Dataset root",
        "data_hash": "Data hash (sha256 of kept path, label, file hash)",
        "n_files": "Files found",
        "n_kept": "Images kept",
        "n_rejected": "Files rejected",
        "created": "Report created",
    }
    rows = [("Data", "SYNTHETIC (generated images, not patient data)" if synthetic else "real images")]
    for key, label in known.items():
        if key in provenance:
            rows.append((label, _plain(provenance[key])))
    if isinstance(provenance.get("counts"), Mapping):
        rows.append(("Split sizes", _split_sizes(provenance["counts"])))
    if isinstance(provenance.get("rejected_by_reason"), Mapping):
        reasons = provenance["rejected_by_reason"]
        rows.append(("Rejected by reason", ", ".join(f"{r}: {n}" for r, n in reasons.items()) or "none"))
    handled = set(known) | {"counts", "rejected_by_reason", "synthetic", "classes"} | set(_REPRO_KEYS)
    rows += [(str(key), _plain(value)) for key, value in provenance.items() if key not in handled]
    return rows


def _repro_rows(provenance: Mapping) -> list[tuple[str, str]]:
    return [(label, _plain(provenance.get(key))) for key, label in _REPRO_KEYS.items()]


# ---------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------


def _html_kv_table(rows: Iterable[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _html_metric_cell(entry: Mapping) -> str:
    if entry.get("value") is None:
        return '<td class="num undefined" title="undefined on this split">n/a</td>'
    ci = _ci_text(entry)
    ci_html = f'<br><span class="ci">{_esc(ci)}</span>' if ci else ""
    return f'<td class="num">{_number(entry["value"])}{ci_html}</td>'


def _html_cards(metrics: Mapping) -> str:
    cards = []
    for key in CARDS:
        entry = metrics["overall"].get(key)
        if not isinstance(entry, Mapping):
            continue
        ci = _ci_text(entry)
        cards.append(
            f'<div class="card"><div class="label">{_esc(metric(key).label)}</div>'
            f'<div class="value">{_number(entry.get("value"))}</div>'
            f'<div class="ci">{_esc(_ci_label(metrics) + " " + ci) if ci else "&nbsp;"}</div></div>'
        )
    return f'<div class="cards">{"".join(cards)}</div>'


def _html_headline(metrics: Mapping, source: str) -> str:
    overall = metrics["overall"]
    rows = []
    for m in overall_metrics():
        if isinstance(overall.get(m.key), Mapping):
            rows.append(f"<tr><th>{_esc(m.heading)}</th>{_html_metric_cell(overall[m.key])}</tr>")
    return (
        "<h2>Headline metrics</h2>"
        f'<p class="source">Source: {_esc(source)}. {_esc(_ci_note(metrics))}</p>'
        f"{_html_cards(metrics)}"
        f'<table><thead><tr><th>Metric</th><th class="num">Value<br><span class="ci">{_ci_label(metrics)}</span></th>'
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _html_per_class(metrics: Mapping, source: str) -> str:
    head = "".join(f'<th class="num">{_esc(m.heading)}</th>' for m in per_class_metrics())
    rows = []
    for name, entry in metrics["per_class"].items():
        cells = "".join(_html_metric_cell(entry[m.key]) for m in per_class_metrics())
        rows.append(f'<tr><th>{_esc(name)}</th><td class="num">{entry["support"]:,}</td>{cells}</tr>')
    return (
        "<h2>Per-class metrics</h2>"
        f'<p class="source">Source: {_esc(source)}. One-vs-rest; value with {_ci_label(metrics)} below it. '
        "Support is the number of images of the class in the split.</p>"
        f'<div class="wide"><table><thead><tr><th>Class</th><th class="num">Support</th>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _html_confusion(metrics: Mapping, source: str) -> str:
    classes = metrics["classes"]
    cm = metrics["confusion_matrix"]
    head = "".join(f'<th class="num">{_esc(c)}</th>' for c in classes)
    rows = "".join(
        f"<tr><th>{_esc(c)}</th>" + "".join(f'<td class="num">{n:,}</td>' for n in row) + "</tr>"
        for c, row in zip(classes, cm, strict=True)
    )
    pairs = most_confused_pairs(cm, classes, top=10)
    support = {c: sum(row) for c, row in zip(classes, cm, strict=True)}
    pair_rows = "".join(
        f'<tr><td>{_esc(t)}</td><td>{_esc(p)}</td><td class="num">{n:,}</td>'
        f'<td class="num">{n / support[t]:.1%}</td></tr>'
        for t, p, n in pairs
    )
    pair_table = (
        '<table><thead><tr><th>True class</th><th>Predicted as</th><th class="num">Images</th>'
        f'<th class="num">Share of true class</th></tr></thead><tbody>{pair_rows}</tbody></table>'
        if pairs
        else '<p class="note">No misclassifications.</p>'
    )
    return (
        "<h2>Errors</h2>"
        f'<p class="source">Source: {_esc(source)}.</p>'
        f"<h3>Most confused pairs</h3>{pair_table}"
        "<details><summary>Confusion matrix as a table (rows: true class, columns: predicted)</summary>"
        f'<div class="wide"><table><thead><tr><th>true \\ predicted</th>{head}</tr></thead>'
        f"<tbody>{rows}</tbody></table></div></details>"
    )


def _html_section(section: Section) -> str:
    table = ""
    if section.rows:
        head = "".join(f"<th>{_esc(h)}</th>" for h in section.header)
        body = "".join(
            "<tr>" + "".join(f"<td>{_esc(_plain(v))}</td>" for v in row) + "</tr>" for row in section.rows
        )
        table = f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
    return f'<h2>{_esc(section.title)}</h2><p class="source">{_esc(section.text)}</p>{table}'


def _temperature_text(temperature_fitted: bool) -> str:
    if temperature_fitted:
        return ("The temperature is fitted on the validation split of the training data (and saved with the "
                "model) and applied to these images; it rescales confidence without changing any prediction.")
    return ("The model was saved without a fitted temperature, so T = 1.0 is applied: the temperature-scaled "
            "numbers equal the raw ones.")


def _html_calibration(metrics: Mapping, source: str, temperature_fitted: bool) -> str:
    calibration = metrics.get("calibration")
    if not isinstance(calibration, Mapping):
        return ""
    rows = [(CALIBRATION_LABELS.get(k, k), _number(v, 4)) for k, v in calibration.items()]
    return (
        "<h2>Calibration</h2>"
        f'<p class="source">Source: {_esc(source)}. {_esc(_temperature_text(temperature_fitted))}</p>'
        f"{_html_kv_table(rows)}"
    )


def _data_uri(path: Path) -> str:
    mime = _MIME.get(path.suffix.lower())
    if mime is None:
        raise ValueError(f"{path}: only PNG or JPEG figures can be embedded")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _ordered_figures(figures: Mapping[str, Path]) -> list[tuple[str, Path]]:
    known = [key for key in FIGURE_CAPTIONS if key in figures]
    return [(key, Path(figures[key])) for key in known + [k for k in figures if k not in FIGURE_CAPTIONS]]


def _figure_caption(key: str, provenance: Mapping) -> str:
    caption = FIGURE_CAPTIONS.get(key, key.replace("_", " ").capitalize() + ".")
    if key in FIGURE_SOURCES:
        return f"{caption} Source: {FIGURE_SOURCES[key]} of {provenance.get('dataset', 'unnamed dataset')}."
    return f"{caption} Source: {_where(provenance)}."


def _html_figures(figures: Mapping[str, Path], provenance: Mapping) -> str:
    if not figures:
        return ""
    parts = []
    for key, path in _ordered_figures(figures):
        caption = _figure_caption(key, provenance)
        parts.append(
            f'<figure id="fig-{_esc(key)}"><img src="{_data_uri(path)}" alt="{_esc(caption)}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>"
        )
    return "<h2>Figures</h2>" + "".join(parts)


def _html_model(model: Mapping, params: Mapping) -> str:
    params_yaml = yaml.safe_dump(_jsonable(params), sort_keys=False, allow_unicode=True).strip()
    return (
        "<h2>Model and parameters</h2>"
        f"{_html_kv_table((str(k), _plain(v)) for k, v in model.items())}"
        "<h3>Pipeline parameters (params.yaml as validated)</h3>"
        f"<pre><code>{_esc(params_yaml)}</code></pre>"
    )


def _html_repro(provenance: Mapping) -> str:
    rows = []
    for label, value in _repro_rows(provenance):
        dirty = label == _REPRO_KEYS["git_dirty"] and provenance.get("git_dirty") is True
        cls = ' class="dirty"' if dirty else ""
        rows.append(f"<tr><th>{_esc(label)}</th><td{cls}>{_esc(value)}</td></tr>")
    return "<h2>Reproducibility</h2>" + f"<table>{''.join(rows)}</table>"


def _html_glossary(metrics: Mapping) -> str:
    items = "".join(f"<dt>{_esc(term)}</dt><dd>{_esc(text)}</dd>" for term, text in _glossary(metrics))
    return f'<h2>How to read the numbers</h2><dl class="glossary">{items}</dl>'


def _jsonable(value: object) -> object:
    """Params as plain data for YAML (tuples to lists, unknown objects to strings)."""
    return json.loads(json.dumps(value, default=str))


def _render_html(page: _Page) -> str:
    source = _source_line(page.provenance, page.metrics)
    banner = (
        '<div class="banner">SYNTHETIC DATA: these images were generated by the pipeline, not taken from '
        "patients. The numbers test the software only and say nothing about diagnostic performance.</div>"
        if page.synthetic
        else ""
    )
    created = page.provenance.get("created") or datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    note_html = f'<p class="note">{_esc(page.note)}</p>' if page.note else ""
    sections = [
        _html_headline(page.metrics, source),
        _html_per_class(page.metrics, source),
        *(_html_section(section) for section in page.sections),
        _html_confusion(page.metrics, source),
        _html_calibration(page.metrics, source, page.temperature_fitted),
        _html_figures(page.figures, page.provenance),
        "<h2>Data provenance</h2>" + _html_kv_table(_provenance_rows(page.provenance, page.synthetic)),
        _html_model(page.model, page.params),
        _html_repro(page.provenance),
        _html_glossary(page.metrics),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(page.title)}</title><style>{CSS}</style></head>"
        f"<body><main><h1>{_esc(page.title)}</h1>"
        f'<p class="source">All metrics: {_esc(source)} · report created {_esc(created)}</p>'
        f"{banner}{note_html}{''.join(sections)}"
        "<footer>Generated by the wbc pipeline evaluate stage.</footer></main></body></html>\n"
    )


# ---------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------


def _longest_backtick_run(text: str) -> int:
    run = longest = 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    return longest


def _md_table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _md_metric(entry: Mapping) -> str:
    if entry.get("value") is None:
        return "n/a"
    ci = _ci_text(entry)
    return f"{_number(entry['value'])} ({ci})" if ci else _number(entry["value"])


def _md_metrics(metrics: Mapping) -> list[str]:
    overall = metrics["overall"]
    lines = ["## Headline metrics", ""]
    lines += _md_table(
        ["Metric", f"Value ({_ci_label(metrics)})"],
        ([m.heading, _md_metric(overall[m.key])] for m in overall_metrics() if m.key in overall),
    )
    lines += ["", "## Per-class metrics", ""]
    lines += _md_table(
        ["Class", "Support"] + [m.heading for m in per_class_metrics()],
        (
            [_md_cell(name), f"{entry['support']:,}"] + [_md_metric(entry[m.key]) for m in per_class_metrics()]
            for name, entry in metrics["per_class"].items()
        ),
    )
    return lines


def _md_sections(sections: Sequence[Section]) -> list[str]:
    lines = []
    for section in sections:
        lines += ["", f"## {_md_cell(section.title)}", "", _md_cell(section.text)]
        if section.rows:
            lines += [""] + _md_table(
                [_md_cell(h) for h in section.header],
                ([_md_cell(_plain(v)) for v in row] for row in section.rows),
            )
    return lines


def _md_calibration(metrics: Mapping, temperature_fitted: bool) -> list[str]:
    calibration = metrics.get("calibration")
    if not isinstance(calibration, Mapping):
        return []
    lines = ["", "## Calibration", "", _temperature_text(temperature_fitted), ""]
    return lines + _md_table(
        ["Quantity", "Value"],
        ([CALIBRATION_LABELS.get(k, _md_cell(k)), _number(v, 4)] for k, v in calibration.items()),
    )


def _md_figures(figures: Mapping[str, Path], provenance: Mapping, out_md: Path) -> list[str]:
    if not figures:
        return []
    lines = ["", "## Figures", ""]
    for key, path in _ordered_figures(figures):
        link = Path(os.path.relpath(Path(path).resolve(), out_md.resolve().parent)).as_posix()
        lines.append(f"- [{_md_cell(_figure_caption(key, provenance))}]({link})")
    return lines


def _md_about(page: _Page) -> list[str]:
    """Provenance, model, parameters and reproducibility."""
    lines = ["", "## Data provenance", ""]
    lines += _md_table(
        ["Item", "Value"], ([_md_cell(k), _md_cell(v)] for k, v in _provenance_rows(page.provenance, page.synthetic))
    )
    lines += ["", "## Model", ""]
    lines += _md_table(["Item", "Value"], ([_md_cell(k), _md_cell(_plain(v))] for k, v in page.model.items()))
    params_yaml = yaml.safe_dump(_jsonable(page.params), sort_keys=False, allow_unicode=True).strip()
    # A fence longer than any backtick run inside keeps the block closed whatever the values hold.
    fence = "`" * max(3, _longest_backtick_run(params_yaml) + 1)
    lines += ["", "## Parameters", "", f"{fence}yaml", params_yaml, fence]
    lines += ["", "## Reproducibility", ""]
    lines += _md_table(["Item", "Value"], ([_md_cell(k), _md_cell(v)] for k, v in _repro_rows(page.provenance)))
    return lines


def _render_md(page: _Page, out_md: Path) -> str:
    source = _source_line(page.provenance, page.metrics)
    lines = [f"# {_md_cell(page.title)}", ""]
    if page.synthetic:
        lines += [
            "> **SYNTHETIC DATA**: generated images, not patient data; these numbers test the software only.",
            "",
        ]
    lines += [f"All metrics: {_md_cell(source)}. {_ci_note(page.metrics)}", ""]
    if page.note:
        lines += [_md_cell(page.note), ""]
    lines += _md_metrics(page.metrics)
    lines += _md_sections(page.sections)
    lines += _md_calibration(page.metrics, page.temperature_fitted)
    lines += _md_figures(page.figures, page.provenance, out_md)
    lines += _md_about(page)
    return "\n".join(lines) + "\n"


def write_report(
    out_html: Path,
    out_md: Path,
    *,
    title: str,
    synthetic: bool,
    provenance: dict,
    model: dict,
    params: dict,
    metrics: dict,
    figures: dict[str, Path],
    note: str = "",
    sections: Sequence[Section] = (),
    temperature_fitted: bool = True,
) -> None:
    """Write the self-contained HTML report and its Markdown summary.

    ``figures`` maps a figure key (see :data:`FIGURE_CAPTIONS`; other keys get a generic
    caption) to a PNG or JPEG file, embedded in the HTML and linked from the Markdown.
    When ``synthetic`` is true, the title says so and a banner warns the reader.
    ``note`` is a paragraph under the title; ``sections`` follow the per-class metrics.
    ``temperature_fitted`` false says that the model carries no temperature (1.0 applied).
    """
    out_html, out_md = Path(out_html), Path(out_md)
    page = _Page(_display_title(title, synthetic), synthetic, provenance, model, params, metrics, figures, note,
                 tuple(sections), temperature_fitted)
    for path, text in ((out_html, _render_html(page)), (out_md, _render_md(page, out_md))):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
