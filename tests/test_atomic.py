"""Atomic files and folders: a failure or a kill leaves the old complete output or the new one."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline import atomic


def test_write_text_replaces_only_when_complete(tmp_path):
    target = tmp_path / "out" / "metrics.json"
    atomic.write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    with pytest.raises(RuntimeError), atomic.atomic_path(target) as tmp:
        tmp.write_text('{"a": 2')  # half-written
        raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]  # no temporary left


def _fill(folder: Path, version: int) -> None:
    (folder / "a.txt").write_text(f"a{version}")
    (folder / "b.txt").write_text(f"b{version}")


def _read(folder: Path) -> tuple[str, str]:
    return (folder / "a.txt").read_text(), (folder / "b.txt").read_text()


@pytest.mark.parametrize("can_exchange", [True, False])
def test_atomic_dir_swaps_the_whole_folder(tmp_path, monkeypatch, can_exchange):
    if not can_exchange:
        monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    out = tmp_path / "processed"
    with atomic.atomic_dir(out) as tmp:
        _fill(tmp, 1)
    assert _read(out) == ("a1", "b1")
    with pytest.raises(ValueError), atomic.atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("a2")
        raise ValueError("stage failed half-way")
    assert _read(out) == ("a1", "b1")
    with atomic.atomic_dir(out) as tmp:
        _fill(tmp, 3)
    assert _read(out) == ("a3", "b3")
    assert [p.name for p in tmp_path.iterdir()] == ["processed"]


def test_exchange_swaps_two_folders_on_this_file_system(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("from a")
    if not atomic.exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here; the two-rename fallback is used")
    assert (b / "x").read_text() == "from a" and not (a / "x").exists()


def test_a_kill_between_the_fallback_renames_is_repaired(tmp_path):
    out = tmp_path / "processed"
    out.mkdir()
    _fill(out, 1)
    # the state a kill leaves between `folder -> .old` and `tmp -> folder`
    os.replace(out, tmp_path / ".processed.old-abc")
    (tmp_path / ".processed.tmp-def").mkdir()
    atomic.clean_leftovers(out)
    assert _read(out) == ("a1", "b1")
    assert [p.name for p in tmp_path.iterdir()] == ["processed"]


_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pipeline import atomic
    out = Path(sys.argv[1])
    version = 0
    while True:
        version += 1
        with atomic.atomic_dir(out) as tmp:
            for name in "abcdefgh":
                (tmp / name).write_text(str(version) * 2000)
                time.sleep(0.002)
""")


def test_kill_9_at_random_moments_leaves_a_complete_folder(tmp_path):
    out = tmp_path / "processed"
    with atomic.atomic_dir(out) as tmp:  # a complete earlier output
        for name in "abcdefgh":
            (tmp / name).write_text("0" * 2000)
    rng = random.Random(0)
    for _ in range(8):
        writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(out)])
        time.sleep(rng.uniform(0.3, 0.9))
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
        atomic.clean_leftovers(out)
        files = sorted(out.iterdir())
        assert [f.name for f in files] == list("abcdefgh")
        assert len({f.read_text() for f in files}) == 1  # one version, never a mix
