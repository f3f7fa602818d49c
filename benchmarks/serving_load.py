"""The served MLflow model under load: good images, decompression bombs, garbage and oversized bodies.

    python benchmarks/serving_load.py --requests 1000 --threads 8

Saves an untrained classifier the way the train stage saves one (``--model``, ``--image-size``),
logs it as the pyfunc model into a throw-away MLflow store, starts ``mlflow models serve`` on
127.0.0.1 only, and sends exactly ``--requests`` requests from ``--threads`` client threads (each
takes the next request from a fixed, seeded list and stops when the list is empty). Each request
is one kind:

- ``good``: one synthetic cell image (PNG or JPEG) -> ``ok``
- ``bomb``: a valid 86 KB PNG of 9400 x 9400 pixels (88 megapixels) -> ``too-many-pixels``
- ``garbage``: random bytes, text, or a string that is not base64 -> ``not-an-image`` / ``not-base64``
- ``path``: ``/etc/shadow``, ``/proc/self/environ``, ``/dev/zero`` -> ``path-not-allowed``
- ``large-image``: one image of ``predict.max_image_bytes`` + 1 MB -> ``too-large``
- ``many-rows``: ``predict.max_rows`` + 1 rows -> ``too-many-rows`` on every row

and checks every answer row by row. Prints (and writes as JSON with ``--out``): whether the
server is alive at the end, the peak resident memory of the server's process tree (sampled every
50 ms), p50/p99 latency overall and per kind, and any row that did not get its status. Needs Linux
(memory is read from /proc).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import queue
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import cv2
import mlflow
import numpy as np
import requests

from pipeline.config import PBC_CLASSES, SampleParams, parse_params
from pipeline.imaging import read_rgb
from pipeline.inference import save_model
from pipeline.model_meta import ModelMeta
from pipeline.models import build_classifier, get_backbone
from pipeline.sample import generate_sample
from pipeline.serving import log_pyfunc_model

KINDS = {"good": 0.50, "bomb": 0.15, "garbage": 0.20, "path": 0.05, "large-image": 0.05, "many-rows": 0.05}
SECRET_PATHS = ("/etc/shadow", "/proc/self/environ", "/dev/zero")


def png_bomb(width: int, height: int) -> bytes:
    """A valid greyscale PNG of ``width`` x ``height`` black pixels (9400 x 9400: 86 KB)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    packer, row = zlib.compressobj(9), bytes(width + 1)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def b64(data: bytes) -> str:
    """Base64 text of ``data``, the served model's image column."""
    return base64.b64encode(data).decode("ascii")


def encoded(image: np.ndarray, suffix: str) -> bytes:
    """An RGB image encoded as ``suffix`` (".png" or ".jpg")."""
    ok, data = cv2.imencode(suffix, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"could not encode {suffix}")
    return data.tobytes()


def save_untrained_model(path: Path, model: str, image_size: int, params) -> Path:
    """An untrained classifier saved like the train stage saves one (no temperature fitted)."""
    backbone = get_backbone(model)
    network = build_classifier(model, len(PBC_CLASSES), image_size)
    meta = ModelMeta(model=model, classes=PBC_CLASSES, image_size=image_size, mean=backbone.mean, std=backbone.std,
                     normalize=params.normalize)
    save_model(path, network, meta)
    return path


def payloads(cells: list[np.ndarray], params, rng: random.Random) -> dict[str, list[tuple[dict, list[str]]]]:
    """Per kind, (request body, the status each of its rows must get)."""
    predict = params.predict

    def body(images: list[str | None], paths: list[str | None] | None = None) -> dict:
        columns, rows = ["image"], [[image] for image in images]
        if paths is not None:
            columns, rows = ["image", "path"], [[image, path] for image, path in zip(images, paths, strict=True)]
        return {"dataframe_split": {"columns": columns, "data": rows}}

    goods = [b64(encoded(cell, suffix)) for cell in cells for suffix in (".png", ".jpg")]
    bomb = b64(png_bomb(9400, 9400))
    return {
        "good": [(body([image]), ["ok"]) for image in goods],
        "bomb": [(body([bomb]), ["too-many-pixels"])],
        "garbage": [
            (body([b64(rng.randbytes(5000))]), ["not-an-image"]),
            (body([b64(b"root:$6$salt$hash:19000:0:99999:7:::\n" * 20)]), ["not-an-image"]),
            (body(["this is %% not base64 !"]), ["not-base64"]),
        ],
        "path": [(body([None], [path]), ["path-not-allowed"]) for path in SECRET_PATHS],
        "large-image": [(body([b64(rng.randbytes(predict.max_image_bytes + 2**20))]), ["too-large"])],
        "many-rows": [(body([goods[0]] * (predict.max_rows + 1)), ["too-many-rows"] * (predict.max_rows + 1))],
    }


def schedule(n: int, bodies: dict, rng: random.Random) -> list[tuple[str, dict, list[str]]]:
    """``n`` requests, kinds drawn with the weights of :data:`KINDS`, bodies in turn within a kind."""
    kinds = rng.choices(list(KINDS), weights=list(KINDS.values()), k=n)
    seen = dict.fromkeys(KINDS, 0)
    plan = []
    for kind in kinds:
        request, expected = bodies[kind][seen[kind] % len(bodies[kind])]
        seen[kind] += 1
        plan.append((kind, request, expected))
    return plan


def tree_rss(pid: int) -> int:
    """Resident bytes of process ``pid`` and all its descendants, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent and child not in tree]
        tree.update(children)
        frontier += children
    total = 0
    for member in tree:
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return total


class MemoryWatch(threading.Thread):
    """Samples the resident memory of a process tree until stopped; keeps the peak."""

    def __init__(self, pid: int, every: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.every, self.peak = pid, every, 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self.stopped.wait(self.every)


def free_port() -> int:
    """A TCP port free on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_uri: str, port: int, env: dict, log) -> subprocess.Popen:
    """``mlflow models serve`` on 127.0.0.1:``port``, in its own process group; returns once /ping answers."""
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited with {server.returncode}; see {log.name}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                return server
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"mlflow models serve did not answer /ping within 180 s; see {log.name}")


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL if it lingers."""
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=15)


def send_all(url: str, plan: list, threads: int) -> list[dict]:
    """Send every request of ``plan`` from ``threads`` threads; one result per request."""
    todo: queue.Queue = queue.Queue()
    for index, entry in enumerate(plan):
        todo.put((index, *entry))
    results: list[dict] = [{}] * len(plan)

    def client() -> None:
        with requests.Session() as session:
            while True:
                try:
                    index, kind, request, expected = todo.get_nowait()
                except queue.Empty:
                    return
                started = time.perf_counter()
                try:
                    response = session.post(url, json=request, timeout=120)
                    seconds = time.perf_counter() - started
                    got = [row["status"] for row in response.json()["predictions"]] if response.ok else []
                    error = "" if response.ok else f"HTTP {response.status_code}: {response.text[:200]}"
                except (requests.RequestException, ValueError, KeyError) as exc:
                    seconds, got, error = time.perf_counter() - started, [], f"{type(exc).__name__}: {exc}"[:200]
                results[index] = {"kind": kind, "seconds": seconds, "expected": expected, "got": got, "error": error}

    workers = [threading.Thread(target=client) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return results


def percentiles(seconds: list[float]) -> dict[str, float]:
    """p50 and p99 in milliseconds."""
    return {"p50_ms": round(float(np.percentile(seconds, 50)) * 1000, 1),
            "p99_ms": round(float(np.percentile(seconds, 99)) * 1000, 1)}


def summarize(results: list[dict], alive: bool, peak: int, idle: int, wall: float) -> dict:
    """The figures to report, from every request's result."""
    wrong = [r for r in results if r["error"] or r["got"] != r["expected"]]
    bad_rows = sum(len(r["expected"]) for r in results if r["kind"] != "good")
    return {
        "requests": len(results),
        "wall_s": round(wall, 1),
        "server_alive_at_end": alive,
        "server_rss_idle_mb": round(idle / 2**20),
        "server_rss_peak_mb": round(peak / 2**20),
        "latency_all": percentiles([r["seconds"] for r in results]),
        "latency_by_kind": {kind: {"requests": len(rows), **percentiles([r["seconds"] for r in rows])}
                            for kind in KINDS if (rows := [r for r in results if r["kind"] == kind])},
        "bad_rows": bad_rows,
        "bad_rows_with_their_status": bad_rows - sum(len(r["expected"]) for r in wrong if r["kind"] != "good"),
        "requests_answered_wrongly": len(wrong),
        "wrong_examples": [{k: r[k] for k in ("kind", "error")} | {"got": r["got"][:3], "expected": r["expected"][:3]}
                           for r in wrong[:5]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--model", default="baseline-cnn", help="backbone of the untrained model served")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    params = parse_params({"normalize": {"size": 96}, "predict": {"device": "cpu"}})
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        store = f"sqlite:///{work / 'mlflow.db'}"
        mlflow.set_tracking_uri(store)
        generate_sample(work / "cells", SampleParams(per_class=4, size=360, seed=args.seed))
        cells = [read_rgb(path) for path in sorted((work / "cells").rglob("*.png"))]
        model_path = save_untrained_model(work / "model.pt", args.model, args.image_size, params)
        with mlflow.start_run():
            model_uri = log_pyfunc_model(model_path, params, list(PBC_CLASSES), cells[0]).model_uri
        plan = schedule(args.requests, payloads(cells, params, rng), rng)
        env = {**os.environ, "MLFLOW_TRACKING_URI": store,
               "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with (work / "serve.log").open("w+") as log:
            server = start_server(model_uri, port, env, log)
            try:
                send_all(f"{url}/invocations", plan[:8], 1)  # warm-up, not counted
                idle = tree_rss(server.pid)
                watch = MemoryWatch(server.pid)
                watch.start()
                started = time.perf_counter()
                results = send_all(f"{url}/invocations", plan, args.threads)
                wall = time.perf_counter() - started
                watch.stopped.set()
                watch.join()
                try:
                    alive = server.poll() is None and requests.get(f"{url}/ping", timeout=5).status_code == 200
                except requests.RequestException:
                    alive = False
            finally:
                stop_server(server)
    figures = {"model": args.model, "image_size": args.image_size, "threads": args.threads,
               "limits": params.predict.model_dump(include={"max_rows", "max_image_bytes", "max_pixels"}),
               **summarize(results, alive, watch.peak, idle, wall)}
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
