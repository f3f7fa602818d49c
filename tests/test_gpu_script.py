"""benchmarks/gpu.sh, the GPU figures in one command, runs every code path on the CPU with --dry-run:
data preparation through ingest and normalize, training throughput eager and compiled with the
largest-batch search, the 2-epoch training and wbc predict. What a GPU measures is not asserted here
(benchmarks never pass or fail on speed); that the script reaches its table is."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_gpu_script_dry_run_fills_every_row_of_its_table(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    command = ["bash", str(REPO / "benchmarks" / "gpu.sh"), "--dry-run", "--out", str(tmp_path / "gpu.json")]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    throughput = [r for r in rows if r["kind"] == "train throughput"]
    assert {(r["model"], r["compile"]) for r in throughput} == {
        (m, c) for m in ("resnet50", "efficientnet-b0") for c in (False, True)}
    assert all(r["real_images_per_s"] > 0 and r["ceiling_images_per_s"] > 0 and r["largest_batch"] >= 4
               for r in throughput)
    training = next(r for r in rows if r["kind"] == "2-epoch training")
    assert 0.0 <= training["val_macro_f1"] <= 1.0
    assert any(r["kind"] == "wbc predict" and r["real_images_per_s"] > 0 for r in rows)
    assert "| what | model | compile |" in done.stdout
