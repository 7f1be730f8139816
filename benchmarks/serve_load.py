"""Load test of `uflow serve` on loopback against the in-process batch predict, in the same run (CPU by default).

    python benchmarks/serve_load.py --runs 3
    python benchmarks/serve_load.py --run-dir runs/bottle --images mvtec/bottle/test --requests 200

Fits a model on 256x256 crops of scikit-image's brick texture (a few epochs:
speed does not depend on accuracy) unless ``--run-dir`` is given, starts
``uflow serve`` as a subprocess on a free 127.0.0.1 port and, in each run:

* in process: ``model.predict`` on the test files in batches of
  ``--batch-size`` (decoding and segmentation included, nothing written), and
  each file alone (``batch_size=1``): the single-image time. Both are timed
  in a worker thread, as the service calls the model, and the batch path also
  in the main thread, as ``uflow predict`` calls it (on this shared 2-core
  machine either was up to 2x faster than the other from run to run); the
  served/in-process ratio takes the faster of the two;
* served: ``--requests`` POST /predict of the same files at concurrency 1, 8
  and 32 (asyncio + httpx, each level stops issuing after ``--level-seconds``),
  answers without the PNGs, as the in-process path computes none.

Prints each run, then the medians over runs as a markdown table, with the two
targets: served throughput at concurrency 8 / in-process batch throughput
(>= 0.8) and p99 latency at concurrency 1 / single-image predict time (<= 2).
Everything stays on loopback and stops by itself; the server is always stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch

import uflow
from uflow.images import list_images

from fit_predict import make_images  # same 256 px brick crops as the fit/predict benchmark

LEVELS = (1, 8, 32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run_dir: Path, log: Path, max_batch: int, max_wait_ms: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "uflow", "serve", str(run_dir), "--port", str(port), "--device", "cpu",
           "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)]
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"uflow serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.terminate()
    raise SystemExit(f"uflow serve did not start within 120 s:\n{log.read_text()}")


async def load(url: str, uploads: list[tuple[str, bytes]], concurrency: int, requests: int, seconds: float) -> tuple[float, list[float], int]:
    """(requests answered per second, latencies in s, non-200 answers) for ``requests`` posts at ``concurrency``."""
    latencies: list[float] = []
    failures = 0
    issued = 0
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal issued, failures
        while issued < requests and time.monotonic() < stop_at:
            name, data = uploads[issued % len(uploads)]
            issued += 1
            started = time.perf_counter()
            response = await client.post(f"{url}/predict", files={"image": (name, data, "image/png")})
            latencies.append(time.perf_counter() - started)
            failures += response.status_code != 200

    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        began = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    return len(latencies) / elapsed, latencies, failures


def in_process(model, paths: list[Path], batch_size: int, singles: int) -> tuple[float, float]:
    """(batch predict images per second, median single-image predict seconds) from the files."""
    started = time.perf_counter()
    model.predict(paths, batch_size=batch_size)
    rate = len(paths) / (time.perf_counter() - started)
    times = []
    for path in paths[:singles]:
        started = time.perf_counter()
        model.predict([path], batch_size=1)
        times.append(time.perf_counter() - started)
    return rate, statistics.median(times) if times else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=96, help="requests per concurrency level and run")
    parser.add_argument("--level-seconds", type=float, default=60.0, help="stop issuing requests at a level after this long")
    parser.add_argument("--predict", type=int, default=48, help="test images to write (ignored with --images)")
    parser.add_argument("--singles", type=int, default=24, help="images timed alone for the single-image time")
    parser.add_argument("--batch-size", type=int, default=16, help="in-process predict batch size, and the server's --max-batch")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="the server's --max-wait-ms")
    parser.add_argument("--run-dir", default=None, help="an existing run folder instead of a quick fit")
    parser.add_argument("--images", default=None, help="an existing image folder instead of generated crops")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, CPU; server and client on loopback")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run_dir = Path(args.run_dir) if args.run_dir else tmp / "run"
        if not args.run_dir:
            uflow.fit(make_images(tmp / "train", 24, 0), run_dir, epochs=2, progress=False)
        paths = list_images(Path(args.images)) if args.images else make_images(tmp / "test", args.predict, 1)
        uploads = [(p.name, p.read_bytes()) for p in paths]
        model = uflow.load(run_dir, device="cpu")
        model.predict(paths[:2], batch_size=2)  # first calls are slow
        print(f"model: {model.backbone}, {model.image_size} px; {len(paths)} test images")
        process, url = start_server(run_dir, tmp / "server.log", args.batch_size, args.max_wait_ms)
        rows: list[dict[str, float]] = []
        model_thread = ThreadPoolExecutor(1)  # one long-lived thread, like the service's scorer
        model_thread.submit(model.predict, paths[:2], batch_size=2).result()
        try:
            asyncio.run(load(url, uploads, 8, 16, 30))  # warm the server's batch sizes and connections
            for run in range(args.runs):
                row: dict[str, float] = {}
                time.sleep(2)  # let the server's idle OpenMP threads stop spinning after the last level
                row["batch"], row["single"] = model_thread.submit(in_process, model, paths, args.batch_size, args.singles).result()
                row["batch_main"], _ = in_process(model, paths, args.batch_size, 0)
                for level in LEVELS:
                    rate, latencies, failures = asyncio.run(load(url, uploads, level, args.requests, args.level_seconds))
                    if failures:
                        raise SystemExit(f"{failures} requests failed at concurrency {level}; see {tmp / 'server.log'}")
                    row[f"rps{level}"] = rate
                    row[f"p50_{level}"] = float(np.percentile(latencies, 50))
                    row[f"p99_{level}"] = float(np.percentile(latencies, 99))
                    row[f"n{level}"] = len(latencies)
                rows.append(row)
                print(
                    f"run {run + 1}: in process {row['batch']:.2f} img/s batched ({row['batch_main']:.2f} in the main thread), "
                    f"{1000 * row['single']:.1f} ms single; served "
                    + ", ".join(f"c{c} {row[f'rps{c}']:.2f} req/s p50 {1000 * row[f'p50_{c}']:.0f} ms p99 {1000 * row[f'p99_{c}']:.0f} ms" for c in LEVELS)
                    + f"; ratios {row['rps8'] / max(row['batch'], row['batch_main']):.2f} and {row['p99_1'] / row['single']:.2f}"
                )
        finally:
            model_thread.shutdown()
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
        med = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    print(f"\nmedians of {args.runs} runs ({args.requests} requests per level and run)\n")
    print("| | requests or images /s | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|")
    print(f"| in process, `model.predict` batch {args.batch_size}, worker thread | {med['batch']:.2f} | | |")
    print(f"| in process, `model.predict` batch {args.batch_size}, main thread | {med['batch_main']:.2f} | | |")
    print(f"| in process, one image at a time, worker thread | {1 / med['single']:.2f} | {1000 * med['single']:.1f} | |")
    for c in LEVELS:
        print(f"| `uflow serve`, concurrency {c} | {med[f'rps{c}']:.2f} | {1000 * med[f'p50_{c}']:.1f} | {1000 * med[f'p99_{c}']:.1f} |")
    ratio = med["rps8"] / max(med["batch"], med["batch_main"])
    tail = med["p99_1"] / med["single"]
    print(f"\nserved at concurrency 8 / faster in-process batch: {ratio:.2f} (target >= 0.8: {'met' if ratio >= 0.8 else 'not met'})")
    print(f"p99 at concurrency 1 / single-image predict: {tail:.2f} (target <= 2: {'met' if tail <= 2 else 'not met'})")


if __name__ == "__main__":
    main()
