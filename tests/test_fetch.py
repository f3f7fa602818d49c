"""``wbc fetch`` without the internet: files are served from a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import socket
import threading
import zipfile
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import fetch
from pipeline.config import PBC_CLASSES
from pipeline.fetch import (
    BLOODMNIST,
    DATASETS,
    RECORD_FILE,
    ChecksumError,
    Dataset,
    FetchError,
    OfflineError,
    RemoteFile,
    UnsafeArchiveError,
    fetch_dataset,
    run_fetch,
    safe_extract,
)


class Server:
    """Serves ``files`` (path -> bytes); honours Range unless told not to; logs each request."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.honour_range = True
        self.cut_after: int | None = None  # send only this many body bytes of the next response
        self.requests: list[tuple[str, str | None]] = []
        self.sent = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path, requested = self.path.split("?")[0], self.headers.get("Range")
                server.requests.append((path, requested))
                body = server.files.get(path)
                if body is None:
                    self.send_error(404)
                    return
                start = int(requested[6:-1]) if requested and server.honour_range else 0
                if start >= len(body) and start:
                    self.send_error(416)
                    return
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                payload = body[start:]
                if server.cut_after is not None:
                    payload, server.cut_after = payload[: server.cut_after], None
                self.wfile.write(payload)
                server.sent += len(payload)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = Server()
    yield srv
    srv.close()


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buffer.getvalue()


# Big enough to arrive in several chunks and to be cut in the middle.
ARCHIVE = zip_bytes(
    {
        "cells/basophil/a.jpg": b"basophil" * 40_000,
        "cells/platelet/b.jpg": bytes(range(256)) * 2_000,
        "__MACOSX/cells/._a.jpg": b"resource fork",
    }
)
SHA256 = hashlib.sha256(ARCHIVE).hexdigest()


def zip_dataset(server: Server, *, sha256: str | None = SHA256, listing: bool = False) -> Dataset:
    server.files["/cells.zip"] = ARCHIVE
    remote = RemoteFile(
        url=f"{server.base}/cells.zip",
        filename="cells.zip",
        sha256=sha256,
        checksum_source="the test" if sha256 else "",
        listing_url=f"{server.base}/listing" if listing else None,
        file_id="file-1",
    )
    return Dataset("cells", "test cells", "https://example.org/cells", "CC BY 4.0", "Cite me.", (remote,), "zip")


def test_download_checks_checksum_unpacks_and_records(server, tmp_path):
    record = fetch_dataset(zip_dataset(server), tmp_path, progress=False)

    target = tmp_path / "cells"
    assert (target / "cells.zip").read_bytes() == ARCHIVE
    assert not (target / "cells.zip.part").exists()
    assert (target / "cells" / "basophil" / "a.jpg").exists()
    assert not (target / "__MACOSX").exists()
    assert record["unpacked"]["data_root"] == str(target / "cells")
    saved = json.loads((target / RECORD_FILE).read_text())
    assert saved["files"]["cells.zip"]["sha256"] == SHA256
    assert saved["files"]["cells.zip"]["verified_against"] == "sha256 the test"
    assert saved["licence"] == "CC BY 4.0" and saved["citation"] == "Cite me."


def test_resume_asks_only_for_the_missing_bytes(server, tmp_path):
    dataset = zip_dataset(server)
    part = tmp_path / "cells" / "cells.zip.part"
    part.parent.mkdir()
    part.write_bytes(ARCHIVE[:1000])

    fetch_dataset(dataset, tmp_path, progress=False)

    assert server.requests == [("/cells.zip", "bytes=1000-")]
    assert server.sent == len(ARCHIVE) - 1000
    assert (tmp_path / "cells" / "cells.zip").read_bytes() == ARCHIVE


def test_resume_starts_over_when_the_server_ignores_range(server, tmp_path, capsys):
    dataset = zip_dataset(server)
    server.honour_range = False
    part = tmp_path / "cells" / "cells.zip.part"
    part.parent.mkdir()
    part.write_bytes(b"not the start of the archive")

    fetch_dataset(dataset, tmp_path, progress=False)

    assert server.requests == [("/cells.zip", f"bytes={len(b'not the start of the archive')}-")]
    assert (tmp_path / "cells" / "cells.zip").read_bytes() == ARCHIVE
    assert "starting again from the beginning" in capsys.readouterr().out


def test_a_part_as_long_as_the_file_is_downloaded_again(server, tmp_path):
    dataset = zip_dataset(server)
    part = tmp_path / "cells" / "cells.zip.part"
    part.parent.mkdir()
    part.write_bytes(b"x" * len(ARCHIVE))  # the server answers 416 Range Not Satisfiable

    fetch_dataset(dataset, tmp_path, progress=False)

    assert server.requests == [("/cells.zip", f"bytes={len(ARCHIVE)}-"), ("/cells.zip", None)]
    assert (tmp_path / "cells" / "cells.zip").read_bytes() == ARCHIVE


def test_a_broken_transfer_keeps_the_part_and_the_next_run_resumes(server, tmp_path):
    dataset = zip_dataset(server)
    server.cut_after = 5000
    with pytest.raises(FetchError, match="broke off after 5,000 bytes"):
        fetch_dataset(dataset, tmp_path, progress=False)
    assert (tmp_path / "cells" / "cells.zip.part").stat().st_size == 5000

    fetch_dataset(dataset, tmp_path, progress=False)
    assert server.requests[-1] == ("/cells.zip", "bytes=5000-")
    assert (tmp_path / "cells" / "cells.zip").read_bytes() == ARCHIVE


def test_checksum_mismatch_removes_the_download_and_names_both_digests(server, tmp_path):
    dataset = zip_dataset(server, sha256="0" * 64)
    mine = tmp_path / "cells" / "notes.txt"
    mine.parent.mkdir()
    mine.write_text("the user's own file")

    with pytest.raises(ChecksumError) as caught:
        fetch_dataset(dataset, tmp_path, progress=False)

    assert "0" * 64 in str(caught.value) and SHA256 in str(caught.value)
    assert not (tmp_path / "cells" / "cells.zip.part").exists()
    assert not (tmp_path / "cells" / "cells.zip").exists()
    assert mine.read_text() == "the user's own file"


def test_a_present_file_that_does_not_match_is_left_untouched(server, tmp_path):
    path = tmp_path / "cells" / "cells.zip"
    path.parent.mkdir()
    path.write_bytes(b"a file the user put here")

    with pytest.raises(ChecksumError, match="left untouched"):
        fetch_dataset(zip_dataset(server), tmp_path, progress=False)
    assert path.read_bytes() == b"a file the user put here"
    assert server.requests == []


def test_a_verified_file_is_not_downloaded_again(server, tmp_path, capsys):
    dataset = zip_dataset(server)
    fetch_dataset(dataset, tmp_path, progress=False)
    server.requests.clear()

    fetch_dataset(dataset, tmp_path, progress=False)

    assert server.requests == []
    out = capsys.readouterr().out
    assert "already present, checksum ok" in out and "already unpacked" in out


def test_force_downloads_again(server, tmp_path):
    dataset = zip_dataset(server)
    fetch_dataset(dataset, tmp_path, progress=False)
    fetch_dataset(dataset, tmp_path, force=True, progress=False)
    assert server.requests == [("/cells.zip", None), ("/cells.zip", None)]


def test_without_a_published_checksum_the_first_fetch_records_one(server, tmp_path, capsys):
    dataset = zip_dataset(server, sha256=None)
    record = fetch_dataset(dataset, tmp_path, progress=False)

    assert record["files"]["cells.zip"]["sha256"] == SHA256
    assert record["files"]["cells.zip"]["verified_against"] is None
    assert f"recorded sha256 {SHA256}" in capsys.readouterr().out

    # A later fetch checks the file against the recorded digest, without the network.
    path = tmp_path / "cells" / "cells.zip"
    path.write_bytes(ARCHIVE[:-1] + b"!")
    server.requests.clear()
    with pytest.raises(ChecksumError, match=RECORD_FILE):
        fetch_dataset(dataset, tmp_path, progress=False)
    assert server.requests == []


def test_a_checksum_published_in_a_mendeley_listing_is_used(server, tmp_path):
    listing = [{"id": "file-1", "filename": "cells.zip",
                "content_details": {"sha256_hash": SHA256, "size": len(ARCHIVE)}}]
    server.files["/listing"] = json.dumps(listing).encode()
    record = fetch_dataset(zip_dataset(server, sha256=None, listing=True), tmp_path, progress=False)
    assert record["files"]["cells.zip"]["verified_against"].startswith("sha256 published at")

    listing[0]["content_details"]["sha256_hash"] = "f" * 64
    server.files["/listing"] = json.dumps(listing).encode()
    with pytest.raises(ChecksumError, match="f" * 64):
        fetch_dataset(zip_dataset(server, sha256=None, listing=True), tmp_path / "again", progress=False)


def test_offline_names_the_url_the_landing_page_and_where_to_put_the_file(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on: connection refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    remote = RemoteFile(url=f"http://127.0.0.1:{port}/cells.zip", filename="cells.zip", sha256=SHA256)
    dataset = Dataset("cells", "t", "https://example.org/cells", "CC BY 4.0", "c", (remote,), "zip")

    with pytest.raises(OfflineError) as caught:
        fetch_dataset(dataset, tmp_path, progress=False)

    message = str(caught.value)
    assert remote.url in message and "offline" in message
    assert "https://example.org/cells" in message and str(tmp_path / "cells" / "cells.zip") in message


def test_an_http_error_says_so(server, tmp_path):
    dataset = zip_dataset(server)
    del server.files["/cells.zip"]
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch_dataset(dataset, tmp_path, progress=False)


@pytest.mark.parametrize("evil", ["../outside.txt", "/etc/outside.txt", "cells/../../outside.txt", "C:/outside.txt"])
def test_zip_slip_is_refused_before_anything_is_unpacked(tmp_path, evil):
    archive = tmp_path / "evil.zip"
    archive.write_bytes(zip_bytes({"cells/ok.txt": b"fine", evil: b"escape"}))
    target = tmp_path / "deep" / "target"

    with pytest.raises(UnsafeArchiveError, match="refusing"):
        safe_extract(archive, target, progress=False)
    assert not target.exists()
    assert not (tmp_path / "deep" / "outside.txt").exists()


def test_a_damaged_zip_is_a_clear_error(tmp_path):
    archive = tmp_path / "damaged.zip"
    archive.write_bytes(b"PK not really")
    with pytest.raises(FetchError, match="not a readable zip"):
        safe_extract(archive, tmp_path / "out", progress=False)


def tiny_medmnist(path: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 10), ("val", 3), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n, dtype=np.uint8) % 8).reshape(n, 1)
    np.savez_compressed(path, **arrays)
    return arrays


def test_bloodmnist_becomes_a_folder_per_class_tree(server, tmp_path):
    npz = tmp_path / "made.npz"
    arrays = tiny_medmnist(npz)
    server.files["/bloodmnist.npz"] = npz.read_bytes()
    remote = replace(BLOODMNIST.files[0], url=f"{server.base}/bloodmnist.npz?download=1",
                     md5=hashlib.md5(npz.read_bytes()).hexdigest())
    dest = tmp_path / "raw"

    record = fetch_dataset(replace(BLOODMNIST, files=(remote,)), dest, progress=False)

    root = dest / "bloodmnist" / "images"
    assert record["unpacked"]["data_root"] == str(root)
    assert record["unpacked"]["official_split_counts"] == {"train": 10, "val": 3, "test": 4}
    assert sorted(p.name for p in root.iterdir()) == sorted(PBC_CLASSES)
    # Label 3 is BloodMNIST's "immature granulocytes", the project's "ig".
    image = np.asarray(Image.open(root / "ig" / "train_00003.png"))
    assert np.array_equal(image, arrays["train_images"][3])
    with (dest / "bloodmnist" / "splits.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 17 and rows[0] == {"path": "basophil/train_00000.png", "label": "basophil", "split": "train"}
    assert sum(1 for _ in root.rglob("*.png")) == 17


def test_a_npz_without_medmnist_arrays_is_refused(tmp_path):
    npz = tmp_path / "other.npz"
    np.savez(npz, x=np.zeros(3))
    with pytest.raises(FetchError, match="train_images"):
        fetch.medmnist_to_folders(npz, tmp_path / "out", BLOODMNIST.labels, progress=False)


def test_the_registry():
    assert set(DATASETS) == {"pbc", "bloodmnist"}
    pbc = DATASETS["pbc"].files[0]
    assert pbc.sha256 is None and pbc.md5 is None  # none is published with the file itself
    assert pbc.listing_url and pbc.file_id in pbc.url
    blood = DATASETS["bloodmnist"]
    assert blood.files[0].md5 == "7053d0359d879ad8a5505303e11de1dc"
    assert blood.labels == PBC_CLASSES
    for dataset in DATASETS.values():
        assert dataset.licence == "CC BY 4.0" and "doi:" in dataset.citation


def test_an_unknown_name_is_an_error(tmp_path):
    with pytest.raises(FetchError, match="pbc, bloodmnist"):
        run_fetch("imagenet", tmp_path)
