"""What the served model imports: prediction and serving never import plotting."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

# Imports pipeline.serving and pipeline.predict with matplotlib made unimportable, and records the
# module that asked for it each time. MONAI asks (monai.utils.jupyter_utils tries pyplot and carries
# on without it), so "not loaded" alone would test MONAI; no pipeline module may ask at all.
PROBE = r"""
import importlib.abc, json, sys

asked_by = []

class NoMatplotlib(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] != "matplotlib":
            return None
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.startswith("<frozen"):
            frame = frame.f_back
        asked_by.append(frame.f_globals.get("__name__", "?") if frame is not None else "?")
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoMatplotlib())
import pipeline.serving, pipeline.predict
print(json.dumps({"asked_by": sorted(set(asked_by)),
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] == "matplotlib"),
                  "pipeline": sorted(m for m in sys.modules if m.startswith("pipeline."))}))
"""


def _probe(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_serving_and_predict_do_not_import_matplotlib():
    result = _probe(PROBE)
    assert result["loaded"] == []
    assert not [name for name in result["asked_by"] if name.split(".")[0] == "pipeline"], result["asked_by"]
    assert {"pipeline.serving", "pipeline.predict", "pipeline.calibration"} <= set(result["pipeline"])
    assert not {"pipeline.figures", "pipeline.report", "pipeline.explain"} & set(result["pipeline"])


def test_the_probe_catches_a_pipeline_module_that_imports_matplotlib():
    result = _probe(PROBE.replace("import pipeline.serving, pipeline.predict",
                                  "import pipeline.serving, pipeline.predict\n"
                                  "try:\n    import pipeline.figures\nexcept ImportError:\n    pass"))
    assert "pipeline.figures" in result["asked_by"]
