"""--engine ray: the same outputs as in-process, a killed worker replaced, GPU workers, benchmark tasks.

One local Ray cluster on loopback (two CPUs, two declared GPUs that do not
exist, so GPU scheduling is checked on this CPU machine) serves the module;
it is stopped through the ``ray start --block`` process that owns it, never
with ``ray stop``, which would stop every Ray on the machine.
"""

from __future__ import annotations

import csv
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from uflow.images import iter_inputs
from uflow.outputs import OUTPUT_KINDS, OutputLayout, ResultsWriter
from uflow.errors import UFlowError
from uflow.ray_engine import INSTALL_HINT, BatchDone, BatchScorer, pool_size, worker_device

SRC = str(Path(__file__).resolve().parents[1] / "src")
# Ray's token authentication, with a token of this module's own: nothing read from or written to ~/.ray.
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def _env() -> dict:
    # Workers started by the cluster import this checkout's uflow, whatever is installed.
    path = os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=path, **AUTH)


def uflow_cli(*args, background: bool = False):
    command = [sys.executable, "-m", "uflow", *map(str, args)]
    if background:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    return subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300)


@pytest.fixture(scope="module")
def cluster():
    """Address of a local Ray cluster: a head node with two worker CPUs on loopback."""
    pytest.importorskip("ray", reason="the ray extra is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_cli = str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
         "--num-gpus", "2", "--include-dashboard=false", "--disable-usage-stats"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
    )
    try:
        started = time.monotonic()
        for line in head.stdout:  # --block prints its banner, then blocks
            if "Ray runtime started" in line:
                break
            assert time.monotonic() - started < 120, "ray start took too long"
        else:
            pytest.fail("ray start exited before the cluster was up")
        yield {"address": f"127.0.0.1:{port}", "port": port}
    finally:
        head.send_signal(signal.SIGTERM)  # ray start --block stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()


def _read_rows(folder: Path) -> list[dict]:
    return list(csv.DictReader((folder / "results.csv").open()))


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_worker_device_reserves_one_gpu_per_worker_or_none():
    assert worker_device("auto", 0) == ("cpu", 0)
    assert worker_device("auto", 0.5) == ("cpu", 0)  # a fraction of a GPU cannot hold a whole worker
    assert worker_device("auto", 4) == ("cuda", 1)
    assert worker_device("cuda", 1) == ("cuda", 1)
    assert worker_device("cuda:3", 4) == ("cuda", 1)  # Ray shows each worker only its own GPU
    assert worker_device("cpu", 4) == ("cpu", 0)  # GPUs in the cluster are left alone
    for device, gpus in (("cuda", 0), ("cuda:1", 0.5)):
        with pytest.raises(UFlowError, match=f"--device {device}: the Ray cluster has no GPUs"):
            worker_device(device, gpus)


def test_pool_size_is_one_worker_per_gpu_or_per_cpus_and_never_more_than_can_be_placed():
    assert pool_size({"CPU": 8.0}, gpus=0, cpus_per_worker=1) == 8
    assert pool_size({"CPU": 8.0, "GPU": 2.0}, gpus=0, cpus_per_worker=1) == 8  # --device cpu on a GPU cluster
    assert pool_size({"CPU": 8.0}, gpus=0, cpus_per_worker=3) == 2
    assert pool_size({"CPU": 8.0, "GPU": 2.0}, gpus=1, cpus_per_worker=1) == 2
    assert pool_size({"CPU": 2.0, "GPU": 4.0}, gpus=1, cpus_per_worker=1) == 2  # each GPU worker also takes a CPU
    assert pool_size({"CPU": 1.0}, gpus=0, cpus_per_worker=2) == 1


def test_without_ray_the_error_names_the_install_command(run_dir, brick, tmp_path):
    code = "import sys; sys.modules['ray'] = None; from uflow.cli import main; sys.exit(main(sys.argv[1:]))"
    args = ["predict", run_dir, brick / "test" / "good", "--out", tmp_path / "out", "--engine", "ray", "--quiet"]
    res = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=_env(), timeout=300)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [f"uflow: error: --engine ray needs Ray, which is not installed here: {INSTALL_HINT}"]
    assert not list((tmp_path / "out").glob(".uflow-partial-*"))


def _predict_in_process(model, images: Path, out: Path, batch_size: int) -> None:
    """What 'uflow predict' does without --engine, with the fixture's model (saves a process start)."""
    layout = OutputLayout(images.resolve(), OUTPUT_KINDS, (model.calibration.display_low, model.calibration.display_high))
    with ResultsWriter(out, layout, {}) as writer:
        for pred in model.iter_predict(iter_inputs([images]), batch_size=batch_size, keep_images=True, on_error=writer.add_error):
            writer.add(pred)
        writer.finish()


def test_ray_predict_gives_the_in_process_files_and_tables(cluster, model, run_dir, brick, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(brick / "test", images)
    bad = images / "good" / "zz_truncated.png"
    bad.write_bytes(next((images / "good").glob("*.png")).read_bytes()[:200])
    n_good_images = len(list(images.rglob("*.png"))) - 1

    local, ray = tmp_path / "local", tmp_path / "ray"
    _predict_in_process(model, images, local, batch_size=3)
    res = uflow_cli("predict", run_dir, images, "--out", ray, "--quiet", "--batch-size", "3", "--engine", "ray",
                    "--address", cluster["address"], "--device", "cpu")
    assert res.returncode == 1, res.stderr  # the bad image is listed, the rest scored, and the exit status says so
    assert res.stderr.strip().splitlines() == [
        f"uflow: error: 1 of {n_good_images + 1} images could not be scored and are listed in {ray / 'errors.csv'} "
        f"(first: {bad}: cannot read image (file is truncated))"
    ]

    assert _files(ray) == _files(local)
    assert (ray / "errors.csv").read_text() == (local / "errors.csv").read_text()
    rows_local, rows_ray = _read_rows(local), _read_rows(ray)
    assert len(rows_ray) == n_good_images
    assert [r["path"] for r in rows_ray] == [r["path"] for r in rows_local], "same images, once each, in input order"
    for a, b in zip(rows_local, rows_ray):
        assert abs(float(a["score"]) - float(b["score"])) < 1e-4
        assert (a["label"], a["regions"]) == (b["label"], b["regions"])
    images_local = json.loads((local / "results.json").read_text())["images"]
    images_ray = json.loads((ray / "results.json").read_text())["images"]
    assert [r["outputs"] for r in images_ray] == [r["outputs"] for r in images_local]
    for name in _files(local):
        if name.endswith("_map.npy"):
            np.testing.assert_allclose(np.load(ray / name), np.load(local / name), atol=1e-4)
        elif name.endswith("_mask.png"):
            assert (ray / name).read_bytes() == (local / name).read_bytes()


def test_a_batch_scored_again_replaces_its_first_attempt(model, brick, tmp_path):
    """What makes a retried batch count once, without Ray: the part and the files are named after the batch."""
    images = sorted((brick / "test").rglob("*.png"))[:3]
    layout = OutputLayout(brick / "test", ("map",))
    with ResultsWriter(tmp_path / "out", layout, {}) as writer:
        scorer = BatchScorer(lambda device: model, "cpu", writer.stage, layout, {"batch_size": 2}, skip_errors=True)
        first = scorer.score(0, [str(p) for p in images[:2]])
        assert scorer.score(0, [str(p) for p in images[:2]]) == first == BatchDone(images=2)
        assert scorer.score(1, [str(images[2]), str(tmp_path / "missing.png")]) == BatchDone(images=1, failed=1)
        summary = writer.finish()
    assert (summary.n_images, summary.n_errors) == (3, 1)
    assert [r["path"] for r in _read_rows(tmp_path / "out")] == [str(p) for p in images]

    stopping = BatchScorer(lambda device: model, "cpu", tmp_path, layout, {}, skip_errors=False)
    assert stopping.score(2, [str(tmp_path / "missing.png")]) == BatchDone(stop_error=f"{tmp_path / 'missing.png'}: no such file")


def _scorer_pids(port: int) -> list[int]:
    """Processes of uflow's Ray workers under this cluster's raylet (found in /proc: nothing else is touched)."""
    procs = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            procs[int(entry.name)] = (ppid, cmdline)
    raylets = {pid for pid, (_, cmd) in procs.items() if "raylet" in cmd.split(" ")[0] and f":{port}" in cmd}
    return [pid for pid, (ppid, cmd) in procs.items() if ppid in raylets and cmd.startswith("ray::BatchScorer")]


def test_a_killed_worker_is_replaced_and_every_image_lands_once(cluster, run_dir, brick, tmp_path):
    sources = sorted((brick / "test").rglob("*.png"))
    images = tmp_path / "images"
    for copy in range(30):
        (images / f"c{copy:02d}").mkdir(parents=True)
        for src in sources:
            shutil.copy(src, images / f"c{copy:02d}" / f"{src.parent.name}_{src.name}")
    expected = sorted(str(p) for p in images.rglob("*.png"))
    out = tmp_path / "out"
    run = uflow_cli("predict", run_dir, images, "--out", out, "--quiet", "--batch-size", "2", "--outputs", "map", "--engine", "ray",
                    "--address", cluster["address"], "--device", "cpu", background=True)
    try:
        deadline = time.monotonic() + 120
        parts: list[Path] = []
        victims: list[int] = []
        while len(parts) < 2 or len(victims) < 2:  # both workers are up and scoring
            assert run.poll() is None, run.communicate()
            assert time.monotonic() < deadline, "no batch finished in time"
            time.sleep(0.05)
            parts = list(out.glob(".uflow-partial-*/.rows/*.jsonl"))
            victims = _scorer_pids(cluster["port"])
        os.kill(victims[0], signal.SIGKILL)
        assert run.poll() is None and len(parts) < len(expected) // 2, "the kill came mid-run"
        _, stderr = run.communicate(timeout=180)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, stderr
    assert victims[0] not in _scorer_pids(cluster["port"])
    rows = _read_rows(out)
    assert sorted(r["path"] for r in rows) == expected, "every image exactly once"
    by_source: dict[str, set[str]] = {}
    for row in rows:
        by_source.setdefault(Path(row["path"]).name, set()).add(f"{float(row['score']):.4f}")
    assert all(len(scores) == 1 for scores in by_source.values()), "a rescored copy gets its original's score"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*_map.npy")) == sorted(
        Path(p).relative_to(images).with_suffix("").as_posix() + "_map.npy" for p in expected
    )
    assert not list(out.glob(".uflow-partial-*"))


GPU_RUN = """
import os, sys
from pathlib import Path
import uflow
from uflow.outputs import OutputLayout, ResultsWriter
from uflow.ray_engine import score_on_ray

address, run_dir, images, out, seen = sys.argv[1:]

def load_on_cpu(device):  # the declared GPUs do not exist: record what Ray gave this worker, score on the CPU
    import json, ray
    held = ray.get_runtime_context().get_assigned_resources()
    (Path(seen) / os.environ["CUDA_VISIBLE_DEVICES"]).write_text(json.dumps({"device": device, **held}))
    return uflow.load(run_dir, device="cpu", allow_download=False)

layout = OutputLayout(Path(images), ("map",))
with ResultsWriter(out, layout, {}) as writer:
    score_on_ray(load_on_cpu, sorted(Path(images).rglob("*.png")), writer.stage, layout, {"batch_size": 2}, device="cuda", address=address)
    writer.finish()
"""


def test_gpu_workers_reserve_one_gpu_each(cluster, model, run_dir, brick, tmp_path):
    seen, out = tmp_path / "seen", tmp_path / "out"
    seen.mkdir()
    args = [cluster["address"], run_dir, brick / "test", out, seen]
    res = subprocess.run([sys.executable, "-c", GPU_RUN, *map(str, args)], capture_output=True, text=True, env=_env(), timeout=120)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in seen.iterdir()) == ["0", "1"], "one worker per GPU, each shown only its own"
    for worker in seen.iterdir():
        assert json.loads(worker.read_text()) == {"device": "cuda", "GPU": 1.0, "CPU": 1.0}
    paths = sorted((brick / "test").rglob("*.png"))
    rows = _read_rows(out)
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    expected = model.predict(paths, batch_size=2)
    np.testing.assert_allclose([float(r["score"]) for r in rows], [p.score for p in expected], atol=1e-4)


def test_benchmark_on_ray_gives_the_sequential_table(texture_root, tmp_path):
    pytest.importorskip("ray", reason="the ray extra is not installed")
    from uflow.benchmark import run_benchmark

    root = tmp_path / "root"
    root.mkdir()
    for name in ("brick", "brick_copy"):  # two categories fitted at once on two worker CPUs
        (root / name).symlink_to(texture_root / "brick", target_is_directory=True)
    options = ["--image-size", "64", "--epochs", "2", "--quiet", "--no-download"]
    res = uflow_cli("benchmark", root, "--out", tmp_path / "ray", *options, "--engine", "ray")  # embedded Ray: no --address
    assert res.returncode == 0, res.stderr
    fit_options = {"image_size": 64, "epochs": 2, "seed": 0, "allow_download": False}
    sequential = dict(run_benchmark(root, tmp_path / "seq", fit_options=fit_options, only=["brick"], progress=False))
    on_ray = json.loads((tmp_path / "ray" / "benchmark.json").read_text())["categories"]
    assert set(on_ray) == {"brick", "brick_copy"}
    for name in on_ray:
        for key, value in sequential["brick"].items():
            assert on_ray[name]["metrics"][key] == pytest.approx(value, rel=1e-3, abs=1e-4), key
    assert "brick_copy" in res.stdout and any(line.startswith("mean") for line in res.stdout.splitlines())
