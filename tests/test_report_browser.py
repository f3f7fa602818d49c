"""The evaluation report as a browser shows it: headless Chromium renders reports/report.html.

A tiny pipeline (sample → ingest → normalize → train → evaluate) writes the report; Chromium then
dumps the DOM after the load event (with a probe that records whether each embedded image
decoded) and takes a full-width screenshot. Skipped when no Chromium or Chrome binary is found.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import tiny_params
from PIL import Image

from pipeline.augment import build_policy, save_policy
from pipeline.config import PBC_CLASSES
from pipeline.evaluate import run_evaluate
from pipeline.ingest import run_ingest
from pipeline.normalize import run_normalize
from pipeline.sample import generate_sample
from pipeline.train import run_train

pytestmark = pytest.mark.slow  # its report comes from a model the module trains

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
WINDOW = (1280, 4000)
FIGURES = {"confusion", "confusion_normalized", "confused_pairs", "roc", "pr", "reliability", "training_curves",
           "worst_errors", "gradcam"}
# After the load event, list every image with its figure id and decoded size.
PROBE = """<script>window.addEventListener("load", () => {
  const out = document.createElement("pre");
  out.id = "image-probe";
  out.textContent = JSON.stringify([...document.images].map(
    (img) => [img.parentElement.id, img.complete, img.naturalWidth, img.naturalHeight]));
  document.body.appendChild(out);
});</script>"""


def _browser() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


@pytest.fixture(scope="module")
def report(tmp_path_factory, mlflow_store) -> Path:
    if _browser() is None:
        pytest.skip(f"no headless browser: none of {', '.join(BROWSERS)} is on PATH")
    root = tmp_path_factory.mktemp("browser")
    params = tiny_params(
        ingest={"split_method": "quota", "near_dup_threshold": 0}, runtime={"ingest_workers": 1},
        evaluate={"n_bootstrap": 20, "worst_errors": 4, "gradcam_per_class": 1},
    )
    raw = root / "raw"
    generate_sample(raw, params.sample, PBC_CLASSES)  # marks itself synthetic (SAMPLE.json)
    params = params.model_copy(update={"data": params.data.model_copy(update={"root": str(raw)})})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_store)  # module fixtures run before the per-test isolation
        run_ingest(params, out_dir=root / "interim", reports_dir=root / "reports", progress=False)
        run_normalize(root / "interim" / "manifest.csv", raw, root / "processed", params.normalize, progress=False)
        save_policy(build_policy(params.augment), root / "policy.json")
        run_train(params, root / "processed", root / "policy.json", root / "models", root / "reports", progress=False)
        run_evaluate(params, root / "models", root / "processed", root / "interim", root / "reports")
    return root / "reports" / "report.html"


def _chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={cwd / 'profile'}", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_report_renders_with_every_figure_decoded(report, tmp_path):
    page = report.read_text(encoding="utf-8")
    probed = tmp_path / "report_probe.html"  # the report itself carries no script; a copy gets the probe
    probed.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = _chromium("--dump-dom", probed.as_uri(), cwd=tmp_path).stdout

    title = re.search(r"<title>(.*?)</title>", dom).group(1)
    assert title.startswith("WBC classifier evaluation: baseline-cnn") and "SYNTHETIC DATA" in title
    assert re.search(r"<h1>[^<]*SYNTHETIC DATA</h1>", dom)
    assert 'class="banner">SYNTHETIC DATA' in dom
    for name in PBC_CLASSES:
        assert re.search(rf'<tr><th>{name}</th><td class="num">\d+</td>', dom), name

    probe = json.loads(re.search(r'<pre id="image-probe">(.*?)</pre>', dom, flags=re.DOTALL).group(1))
    shown = {figure_id.removeprefix("fig-"): (complete, width, height) for figure_id, complete, width, height in probe}
    assert set(shown) == FIGURES
    for key, (complete, width, height) in shown.items():
        assert complete and width > 100 and height > 100, (key, complete, width, height)
    with Image.open(report.parent / "figures" / "gradcam.png") as gradcam:
        assert shown["gradcam"][1:] == gradcam.size  # decoded at the PNG's own size


def test_report_screenshot_is_a_full_page(report, tmp_path):
    shot = tmp_path / "report.png"
    _chromium(f"--screenshot={shot}", f"--window-size={WINDOW[0]},{WINDOW[1]}", report.as_uri(), cwd=tmp_path)
    with Image.open(shot) as image:
        assert image.format == "PNG" and image.size == WINDOW
        rgb = image.convert("RGB")
    top = rgb.crop((0, 0, WINDOW[0], 500))
    colors = rgb.getcolors(maxcolors=10_000_000)
    assert len(colors) > 500  # text, tables and figures, not a blank page
    # the synthetic-data banner (#fdecea) sits near the top
    assert any(abs(r - 0xFD) <= 3 and abs(g - 0xEC) <= 3 and abs(b - 0xEA) <= 3
               for _, (r, g, b) in top.getcolors(maxcolors=10_000_000))
