"""`uflow predict --engine ray` against in-process predict, against the number of Ray workers, and the driver's memory on a long list.

    python benchmarks/ray_scale.py                      # about 20 minutes on 2 busy CPU cores
    python benchmarks/ray_scale.py --runs 3 --images 480 --paths 20000

Fits a tiny model (64 px crops of scikit-image's brick texture, 2 epochs:
speed does not depend on accuracy), writes ``--images`` test PNGs, then drives
the real command line in fresh processes, as a user would:

(a) in-process ``uflow predict`` against ``--engine ray`` with an embedded Ray
    (one worker per CPU), same images, all outputs (overlay, map, mask); the
    in-process command also with ``OMP_NUM_THREADS=1``, the one PyTorch thread
    Ray gives each one-CPU worker;
(b) ``--engine ray`` with 1 worker (a local Ray cluster started with one CPU,
    joined with ``--address``) and with 2 (the embedded Ray of (a));
(c) the peak RSS of the driver process alone (``ru_maxrss`` of RUSAGE_SELF,
    read in that process as it exits, so Ray's raylet and worker processes are
    not counted) scoring ``--paths`` paths (hard links to the test images) with
    ``--outputs none``, and its VmHWM (peak so far) and VmRSS from /proc as
    the run passes each of ``--checkpoints`` scored images.

Two rates per run: the whole command (process start, model load, Ray start
included) and scoring, from the modification times of the written maps: the
second half of the images over the time from the first half's last map to the
last map, so that model loading and the start of the workers are left out.
(a) and (b) are repeated ``--runs`` times, interleaved; medians are printed,
and ratios are medians of the per-run ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uflow

from speed import make_data  # the same brick crops as the speed benchmark, here at 64 px

SRC = Path(__file__).resolve().parents[1] / "src"
# Runs the command line and reports the peak RSS of this process alone, as it exits.
DRIVER = (
    "import resource, sys; from uflow.cli import main; status = main(sys.argv[1:]); "
    "print('peak_rss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(status)"
)


def environment() -> dict:
    # Ray's workers import this checkout's uflow; a token of this run's own keeps ~/.ray out of it.
    path = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))


ENV = environment()
# name -> (extra arguments, extra environment); "--address" in a name: run on the one-CPU local cluster.
ENGINES = {
    "in-process": ([], {}),
    "in-process, OMP_NUM_THREADS=1": ([], {"OMP_NUM_THREADS": "1"}),
    "ray, 2 workers (embedded)": (["--engine", "ray"], {}),
    "ray, 1 worker (--address)": (["--engine", "ray"], {}),
}


def proc_status_kb(pid: int) -> dict[str, int]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in lines) if k in ("VmRSS", "VmHWM")}


def scored_so_far(out: Path, batch_size: int) -> int:
    """Images scored by Ray's workers so far: one spooled part per finished batch."""
    return sum(1 for _ in out.glob(".uflow-partial-*/.rows/*.jsonl")) * batch_size


def predict(run_dir: Path, images: Path, out: Path, extra: list[str], batch_size: int, checkpoints: list[int] = (), env: dict | None = None) -> dict:
    """One `uflow predict` in a fresh process: whole-command seconds, driver peak RSS, and the driver's memory at each checkpoint."""
    command = [sys.executable, "-c", DRIVER, "predict", str(run_dir), str(images), "--out", str(out), "--quiet", "--no-download",
               "--batch-size", str(batch_size), *extra]
    log = out.with_suffix(".log")
    started = time.perf_counter()
    with log.open("w") as err:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True, env={**ENV, **(env or {})})
        at: dict[int, dict[str, int]] = {}
        pending = sorted(checkpoints)
        while proc.poll() is None:
            if pending:
                status, done = proc_status_kb(proc.pid), scored_so_far(out, batch_size)
                while pending and done >= pending[0] and status:
                    at[pending.pop(0)] = status
            time.sleep(0.25)
        stdout = proc.stdout.read()
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"predict failed ({proc.returncode}): {log.read_text()[-2000:]}")
    peak_kb = int(stdout.split("peak_rss_kb")[1].split()[0])
    return {"seconds": seconds, "peak_mb": peak_kb / 1024, "at": at, "scoring": scoring_rate(out)}


def scoring_rate(out: Path) -> float | None:
    """Images per second over the second half of the written maps (None without per-image files)."""
    times = sorted(p.stat().st_mtime_ns for p in out.rglob("*_map.npy"))
    half = len(times) // 2
    if half < 2:
        return None
    return (len(times) - half) / ((times[-1] - times[half - 1]) / 1e9)


class LocalCluster:
    """A Ray head node on loopback with ``cpus`` CPUs, stopped through the `ray start --block` process that owns it."""

    def __init__(self, cpus: int):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.address = f"127.0.0.1:{port}"
        ray_cli = str(Path(sys.executable).with_name("ray"))
        self.head = subprocess.Popen(
            [ray_cli, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", str(cpus),
             "--include-dashboard=false", "--disable-usage-stats"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
        )
        for line in self.head.stdout:
            if "Ray runtime started" in line:
                return
        raise SystemExit("ray start exited before the cluster was up")

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.head.send_signal(signal.SIGTERM)
        try:
            self.head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.head.kill()
            self.head.wait()


def link_paths(images: list[Path], folder: Path, n: int) -> Path:
    """``n`` paths to the same few images (hard links), 1,000 per subfolder, so no folder listing is large."""
    for i in range(n):
        target = folder / f"d{i // 1000:03d}" / f"{i:06d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(images[i % len(images)], target)
    return folder


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped"))  # so that the local cluster is stopped too
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--images", type=int, default=480, help="test images for (a) and (b)")
    parser.add_argument("--paths", type=int, default=20000, help="paths for the driver memory run (c)")
    parser.add_argument("--checkpoints", default="5000,10000,20000", help="scored images at which (c) reads the driver's memory")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    checkpoints = [int(c) for c in args.checkpoints.split(",")]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, no GPU used; python {platform.python_version()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="uflow-ray-scale-") as tmp:
        tmp = Path(tmp)
        train, test = make_data(tmp / "data", 24, args.images, 64)
        run_dir = tmp / "run"
        uflow.fit(train, run_dir, image_size=64, epochs=2, progress=False, allow_download=False)
        results: dict[str, list[dict]] = {name: [] for name in ENGINES}
        with LocalCluster(cpus=1) as one_cpu:
            for run in range(args.runs):
                for i, (name, (extra, env)) in enumerate(ENGINES.items()):
                    address = ["--address", one_cpu.address] if "--address" in name else []
                    results[name].append(predict(run_dir, test, tmp / f"out-{run}-{i}", extra + address, args.batch_size, env=env))
                print(f"run {run + 1}: " + "; ".join(
                    f"{name} {args.images / r[-1]['seconds']:.1f} img/s whole, {r[-1]['scoring']:.1f} scoring"
                    for name, r in results.items()), flush=True)

        paths = link_paths(sorted(test.glob("*.png")), tmp / "many", args.paths)
        memory = predict(run_dir, paths, tmp / "out-many", ["--engine", "ray", "--outputs", "none"], args.batch_size, checkpoints)

    print(f"\n(a), (b): {args.images} images at 64 px, all outputs, batch {args.batch_size}, median of {args.runs} runs\n")
    print("| engine | img/s, whole command | img/s, scoring | driver peak RSS MB |")
    print("|---|---:|---:|---:|")
    for name, runs in results.items():
        print(f"| {name} | {median([args.images / r['seconds'] for r in runs]):.1f} | {median([r['scoring'] for r in runs]):.1f} | "
              f"{median([r['peak_mb'] for r in runs]):.0f} |")
    local, local_1, ray2, ray1 = results.values()
    for label, key in (("whole command", "seconds"), ("scoring", "scoring")):
        for name, (a, b) in {"ray/in-process": (local, ray2), "ray/in-process, 1 thread": (local_1, ray2),
                             "ray 1 worker/in-process 1 thread (Ray's cost per worker)": (local_1, ray1),
                             "2 workers/1 worker": (ray1, ray2)}.items():
            ratios = [(x[key] / y[key]) if key == "seconds" else (y[key] / x[key]) for x, y in zip(a, b)]
            print(f"\n{label}, {name}: {median(ratios):.2f} (runs: {', '.join(f'{r:.2f}' for r in ratios)})", end="")
    print(f"\n\n(c): driver of `--engine ray --outputs none` on {args.paths} paths, {memory['seconds']:.0f} s\n")
    print("| scored images | driver VmRSS MB | driver peak so far MB |")
    print("|---:|---:|---:|")
    for n, status in sorted(memory["at"].items()):
        print(f"| {n} | {status['VmRSS'] / 1024:.0f} | {status['VmHWM'] / 1024:.0f} |")
    print(f"| all, tables written (peak at exit) | | {memory['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
