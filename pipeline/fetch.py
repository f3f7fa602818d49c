"""``wbc fetch``: download a public blood-cell dataset, check it and unpack it under ``data/raw``.

Each dataset in :data:`DATASETS` names its remote files, the checksum its publisher gives for
them (when one is published), its licence and how to cite it. A download streams into
``<file>.part`` and resumes from there with an HTTP ``Range`` request when it was cut off; the
checksum is checked before the file takes its final name. What was fetched, from where and with
which digests is written to ``<dest>/<dataset>/FETCHED.json``: when no checksum is published,
the first fetch records the sha256 it computed there and later fetches are checked against it.

Only the standard library talks to the network (``urllib``), so no new dependency is needed.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import json
import re
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Literal
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.config import PBC_CLASSES
from pipeline.layout import RAW

RECORD_FILE = "FETCHED.json"
USER_AGENT = "wbc-pipeline-fetch (+urllib)"
TIMEOUT_S = 60
CHUNK = 1 << 20
MEDMNIST_SPLITS = ("train", "val", "test")


class FetchError(RuntimeError):
    """A dataset could not be fetched; the message says what failed and what to do."""


class OfflineError(FetchError):
    """The server could not be reached at all."""


class ChecksumError(FetchError):
    """A file's size or digest is not the one expected."""


class UnsafeArchiveError(FetchError):
    """An archive names files outside the folder it is unpacked into."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset and what is known of it before downloading."""

    url: str
    filename: str
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None
    checksum_source: str = ""  # where the checksum above is published
    # Mendeley Data lists each file's sha256 and size through its public API; used when no
    # checksum is written into the registry.
    listing_url: str | None = None
    file_id: str | None = None


@dataclass(frozen=True)
class Dataset:
    """A downloadable dataset: its files, licence, citation and how it becomes image folders."""

    name: str
    title: str
    landing_page: str
    licence: str
    citation: str
    files: tuple[RemoteFile, ...]
    unpack: Literal["zip", "medmnist-npz"]
    labels: tuple[str, ...] = ()  # medmnist-npz: class name of each label index


@dataclass(frozen=True)
class Expected:
    """The digest (and maybe size) a file must have, and who says so."""

    algorithm: Literal["sha256", "md5"]
    digest: str
    source: str
    size: int | None = None


PBC = Dataset(
    name="pbc",
    title="PBC: microscopic peripheral blood cell images (Acevedo et al. 2020), 17,092 JPEGs in 8 classes",
    landing_page="https://data.mendeley.com/datasets/snkd93bnjr/1",
    licence="CC BY 4.0",
    citation=(
        "Acevedo A, Merino A, Alférez S, Molina Á, Boldú L, Rodellar J. A dataset of microscopic peripheral "
        "blood cell images for development of automatic recognition systems. Data in Brief 30 (2020) 105474, "
        "doi:10.1016/j.dib.2020.105474. Data: Mendeley Data, V1, doi:10.17632/snkd93bnjr.1."
    ),
    files=(
        RemoteFile(
            url=(
                "https://data.mendeley.com/public-files/datasets/snkd93bnjr/files/"
                "2fc38728-2ae7-4a62-a857-032af82334c3/file_downloaded"
            ),
            filename="PBC_dataset_normal_DIB.zip",
            listing_url="https://data.mendeley.com/public-api/datasets/snkd93bnjr/files?folder_id=root&version=1",
            file_id="2fc38728-2ae7-4a62-a857-032af82334c3",
        ),
    ),
    unpack="zip",
)

BLOODMNIST = Dataset(
    name="bloodmnist",
    title="BloodMNIST (MedMNIST v2): the PBC images centre-cropped and resized to 28x28, official 7:1:2 split",
    landing_page="https://zenodo.org/records/10519652",
    licence="CC BY 4.0",
    citation=(
        "Yang J, Shi R, Wei D, Liu Z, Zhao L, Ke B, Pfister H, Ni B. MedMNIST v2 - A large-scale lightweight "
        "benchmark for 2D and 3D biomedical image classification. Scientific Data 10, 41 (2023), "
        "doi:10.1038/s41597-022-01721-8; and the source data, Acevedo et al., Data in Brief 30 (2020) 105474, "
        "doi:10.1016/j.dib.2020.105474."
    ),
    files=(
        RemoteFile(
            url="https://zenodo.org/records/10519652/files/bloodmnist.npz?download=1",
            filename="bloodmnist.npz",
            md5="7053d0359d879ad8a5505303e11de1dc",
            checksum_source="medmnist INFO['bloodmnist']['MD5'] (MedMNIST/MedMNIST, medmnist/info.py)",
        ),
    ),
    unpack="medmnist-npz",
    # Label 3 is "immature granulocytes (myelocytes, metamyelocytes and promyelocytes)", PBC's "ig".
    labels=("basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"),
)

DATASETS: dict[str, Dataset] = {dataset.name: dataset for dataset in (PBC, BLOODMNIST)}

if not set(BLOODMNIST.labels) <= set(PBC_CLASSES):
    raise AssertionError("BloodMNIST labels must be project class names")


# ---------------------------------------------------------------------------------------------
# Downloading


def _request(url: str, offset: int = 0):
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urlopen(Request(url, headers=headers), timeout=TIMEOUT_S)


def _body_start(response, offset: int) -> int:
    """The byte of the file the response body starts at: 0 for a whole file, else the range start."""
    if response.status != 206:
        return 0
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    start = int(match.group(1)) if match else offset
    if start != offset:
        raise FetchError(f"{response.url}: asked for bytes from {offset}, the server sent them from {start}")
    return start


def _open_resumable(url: str, part: Path, hint: str):
    """The response for ``url``, asking only for what ``part`` lacks; and where its body starts."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        try:
            response = _request(url, offset)
        except HTTPError as exc:
            # 416: the partial file is as long as (or longer than) the file; start over.
            if exc.code != 416 or not offset:
                raise
            part.unlink()
            offset = 0
            response = _request(url)
    except HTTPError as exc:
        raise FetchError(
            f"{url} answered HTTP {exc.code} ({exc.reason}); the file may have moved. {hint}"
        ) from None
    except (URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise OfflineError(
            f"could not reach {url} ({reason}); this machine seems to be offline. {hint}"
        ) from None
    try:
        start = _body_start(response, offset)
    except FetchError:
        response.close()
        raise
    if offset and start == 0:
        print(f"{part.name}: the server does not resume downloads; starting again from the beginning")
    elif start:
        print(f"{part.name}: resuming after {start:,} bytes")
    return response, start


def download_to_part(url: str, part: Path, progress: bool = True, hint: str = "") -> None:
    """Stream ``url`` into ``part``, resuming a partial file when the server honours ``Range``.

    Raises OfflineError when the server cannot be reached and FetchError on an HTTP error or
    when the transfer breaks off; the partial file is kept so the next run resumes it.
    """
    part.parent.mkdir(parents=True, exist_ok=True)
    response, start = _open_resumable(url, part, hint)
    with response:
        length = response.headers.get("Content-Length")
        total = start + int(length) if length and length.isdigit() else None
        with (
            part.open("ab" if start else "wb") as out,
            tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                 desc=part.name.removesuffix(".part"), disable=not progress) as bar,
        ):
            try:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as exc:
                raise _broken_off(url, part, out.tell(), str(exc)) from None
            # http.client ends a body cut short by the server without an error; the size tells.
            if total is not None and out.tell() < total:
                raise _broken_off(url, part, out.tell(), f"{total:,} bytes announced")


def _broken_off(url: str, part: Path, received: int, why: str) -> FetchError:
    return FetchError(
        f"the download of {url} broke off after {received:,} bytes ({why}); "
        f"run the command again to resume it from {part}"
    )


def file_digests(path: Path) -> dict[str, str | int]:
    """Size, sha256 and md5 of a file, read once."""
    sha256, md5, size = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            sha256.update(block)
            md5.update(block)
            size += len(block)
    return {"bytes": size, "sha256": sha256.hexdigest(), "md5": md5.hexdigest()}


def mismatch(expected: Expected, found: dict[str, str | int]) -> str | None:
    """What differs between a file's digests and the expected ones; None when they agree."""
    if expected.size is not None and found["bytes"] != expected.size:
        return f"size: expected {expected.size:,} bytes, got {found['bytes']:,}"
    if found[expected.algorithm] != expected.digest.lower():
        return f"{expected.algorithm}: expected {expected.digest.lower()}, got {found[expected.algorithm]}"
    return None


def published_listing_checksum(remote: RemoteFile) -> Expected | None:
    """The sha256 and size a Mendeley Data file listing publishes for ``remote``; None if unknown.

    A listing that cannot be read is not an error: the file is then recorded unverified.
    """
    if not remote.listing_url:
        return None
    try:
        with _request(remote.listing_url) as response:
            entries = json.load(response)
    except (OSError, ValueError) as exc:
        print(f"{remote.filename}: could not read the published checksum from {remote.listing_url} ({exc})")
        return None
    for entry in entries if isinstance(entries, list) else []:
        if entry.get("id") == remote.file_id or entry.get("filename") == remote.filename:
            details = entry.get("content_details") or {}
            if details.get("sha256_hash"):
                return Expected("sha256", details["sha256_hash"], f"published at {remote.listing_url}",
                                details.get("size") or entry.get("size"))
    print(f"{remote.filename}: {remote.listing_url} lists no checksum for this file")
    return None


def expected_checksum(remote: RemoteFile, recorded: dict | None) -> Expected | None:
    """What ``remote`` must hash to: the registry's checksum, else the one recorded at an earlier
    fetch, else the one its host publishes; None when nothing is known (first fetch, unverified)."""
    if remote.sha256:
        return Expected("sha256", remote.sha256, remote.checksum_source, remote.size)
    if remote.md5:
        return Expected("md5", remote.md5, remote.checksum_source, remote.size)
    if recorded and recorded.get("sha256"):
        source = (
            f"{RECORD_FILE} of an earlier fetch (checked then against: {recorded.get('verified_against')}); "
            "delete that file if the publisher has changed the data"
        )
        return Expected("sha256", recorded["sha256"], source, recorded.get("bytes"))
    return published_listing_checksum(remote)


def fetch_file(
    remote: RemoteFile,
    path: Path,
    expected: Expected | None,
    force: bool = False,
    progress: bool = True,
    hint: str = "",
) -> dict:
    """Make sure ``path`` holds ``remote``, downloading it if needed; return its record.

    A file already at ``path`` is checked, never deleted: a mismatch raises ChecksumError.
    A download that does not match removes its ``.part`` file and raises ChecksumError.
    """
    part = path.with_name(path.name + ".part")
    if path.exists() and not force:
        found = file_digests(path)
        problem = expected and mismatch(expected, found)
        if problem:
            raise ChecksumError(
                f"{path} is already there but is not the expected file ({problem}; expected per "
                f"{expected.source}). It was left untouched: move it away, or run with --force to download again."
            )
        print(f"{path.name}: already present" + (", checksum ok" if expected else ""))
    else:
        if force and part.exists():
            part.unlink()
        print(f"{path.name}: downloading {remote.url}")
        download_to_part(remote.url, part, progress, hint)
        found = file_digests(part)
        problem = expected and mismatch(expected, found)
        if problem:
            part.unlink()
            raise ChecksumError(
                f"{remote.url} downloaded, but it is not the expected file ({problem}; expected per "
                f"{expected.source}). The bad download {part} was removed; nothing else was changed."
            )
        part.replace(path)
    if expected is None:
        print(f"{path.name}: no published checksum to check against; recorded sha256 {found['sha256']} "
              f"in {RECORD_FILE} so later fetches are checked against it")
    return {
        "url": remote.url,
        **found,
        "verified_against": f"{expected.algorithm} {expected.source}" if expected else None,
        "fetched_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------------
# Unpacking


def _is_unsafe(name: str) -> bool:
    """True for archive names that could land outside the target folder (zip-slip)."""
    normalized = name.replace("\\", "/")
    return (
        normalized.startswith("/")
        or bool(re.match(r"^[A-Za-z]:", normalized))
        or ".." in PurePosixPath(normalized).parts
    )


def _is_junk(name: str) -> bool:
    """macOS archive metadata (``__MACOSX/``, ``._*``, ``.DS_Store``): not images, never unpacked."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return bool(parts) and (parts[0] == "__MACOSX" or parts[-1].startswith("._") or parts[-1] == ".DS_Store")


def safe_extract(archive: Path, target: Path, progress: bool = True) -> Path:
    """Unpack a zip into ``target`` after checking every name; return the image root.

    Raises UnsafeArchiveError, unpacking nothing, when any entry is absolute or climbs out
    with ``..``. The image root is the archive's single top folder when it has one.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise FetchError(f"{archive} is not a readable zip archive ({exc}); delete it and fetch again") from None
    with zf:
        members = zf.infolist()
        unsafe = [m.filename for m in members if _is_unsafe(m.filename)]
        if unsafe:
            raise UnsafeArchiveError(
                f"{archive} names {len(unsafe)} file(s) outside the folder it unpacks into, e.g. "
                f"{', '.join(repr(name) for name in unsafe[:3])}; refusing to unpack it"
            )
        members = [m for m in members if not _is_junk(m.filename)]
        root = target.resolve()
        for member in tqdm(members, desc=f"unpack {archive.name}", unit="file", disable=not progress):
            if not (root / member.filename).resolve().is_relative_to(root):
                raise UnsafeArchiveError(f"{archive}: {member.filename!r} resolves outside {target}")
            zf.extract(member, target)
    tops = {PurePosixPath(m.filename).parts[0] for m in members if m.filename.strip("/")}
    only = target / next(iter(tops)) if len(tops) == 1 else None
    return only if only is not None and only.is_dir() else target


def medmnist_to_folders(npz: Path, out: Path, labels: tuple[str, ...], progress: bool = True) -> dict[str, int]:
    """Write a MedMNIST ``.npz`` as PNGs in one folder-per-class tree, ``out/images/<class>/``.

    Files are named ``<split>_<index>.png`` and ``out/splits.csv`` (path, label, split) keeps
    the official split. Returns the number of images per split.
    """
    images_root = out / "images"
    rows, counts = [], {}
    with np.load(npz) as data:
        missing = [f"{s}_{kind}" for s in MEDMNIST_SPLITS for kind in ("images", "labels") if f"{s}_{kind}" not in data]
        if missing:
            raise FetchError(f"{npz} lacks the arrays {', '.join(missing)}; is it a MedMNIST 2D file?")
        for split in MEDMNIST_SPLITS:
            images, indices = data[f"{split}_images"], data[f"{split}_labels"].reshape(-1)
            if len(images) != len(indices) or (len(indices) and not 0 <= indices.min() <= indices.max() < len(labels)):
                raise FetchError(f"{npz}: {split} labels do not fit its {len(images)} images and {len(labels)} classes")
            for n, (image, index) in enumerate(
                tqdm(zip(images, indices, strict=True), total=len(images), desc=f"png {split}", disable=not progress)
            ):
                label = labels[int(index)]
                relative = f"{label}/{split}_{n:05d}.png"
                (images_root / label).mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.ascontiguousarray(image)).save(images_root / relative)
                rows.append({"path": relative, "label": label, "split": split})
            counts[split] = len(images)
    with (out / "splits.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "split"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return counts


# ---------------------------------------------------------------------------------------------
# The command


def _read_record(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_record(path: Path, record: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def _manual_hint(dataset: Dataset, remote: RemoteFile, path: Path) -> str:
    return (
        f"To get the data by hand, download {remote.filename} from {dataset.landing_page} and put it at "
        f"{path}; then run `wbc fetch {dataset.name}` again to check and unpack it."
    )


def _unpack(dataset: Dataset, archive: Path, target: Path, progress: bool) -> tuple[Path, dict]:
    if dataset.unpack == "zip":
        return safe_extract(archive, target, progress), {}
    counts = medmnist_to_folders(archive, target, dataset.labels, progress)
    return target / "images", {"official_split_counts": counts, "splits_csv": str(target / "splits.csv")}


def fetch_dataset(dataset: Dataset, dest: Path = RAW, force: bool = False, progress: bool = True) -> dict:
    """Download, check and unpack ``dataset`` into ``dest/<name>/``; return the FETCHED.json record.

    Files already present and matching are not downloaded again, and an archive already
    unpacked from the same bytes is not unpacked again, unless ``force``.
    """
    target = dest / dataset.name
    target.mkdir(parents=True, exist_ok=True)
    record_path = target / RECORD_FILE
    previous = _read_record(record_path)
    record = {
        "dataset": dataset.name,
        "title": dataset.title,
        "landing_page": dataset.landing_page,
        "licence": dataset.licence,
        "citation": dataset.citation,
        "files": dict(previous.get("files", {})),
    }
    for remote in dataset.files:
        path = target / remote.filename
        recorded = previous.get("files", {}).get(remote.filename)
        expected = expected_checksum(remote, recorded)
        hint = _manual_hint(dataset, remote, path)
        record["files"][remote.filename] = fetch_file(remote, path, expected, force, progress, hint)
        _write_record(record_path, record)

    archive = target / dataset.files[0].filename
    sha256 = record["files"][archive.name]["sha256"]
    unpacked = previous.get("unpacked", {})
    if not force and unpacked.get("from_sha256") == sha256 and Path(unpacked.get("data_root", "")).is_dir():
        print(f"{dataset.name}: already unpacked in {unpacked['data_root']}")
        record["unpacked"] = unpacked
    else:
        data_root, extra = _unpack(dataset, archive, target, progress)
        record["unpacked"] = {"from_sha256": sha256, "data_root": str(data_root), **extra}
    _write_record(record_path, record)
    return record


def run_fetch(name: str, dest: Path = RAW, force: bool = False, progress: bool = True) -> dict:
    """The ``wbc fetch NAME`` command: fetch a dataset of :data:`DATASETS` by name."""
    try:
        dataset = DATASETS[name]
    except KeyError:
        raise FetchError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}") from None
    return fetch_dataset(dataset, dest, force, progress)
