"""Running uflow on Ray: batch scoring over a pool of workers, and one task per category for benchmarks.

A way in, like the command line: nothing in the method imports this module,
and Ray is an optional extra (``pip install 'uflow-anomaly[ray]'``). With no
address an embedded Ray is started on this machine and stopped at the end;
with one, the run joins that cluster, whose nodes must have uflow installed
and see the model, the images and the output folder at the same paths
(shared storage: each worker reads its images and writes its outputs itself,
so no image or map ever passes through the driver).

Why a pool of actors and not Ray Data's ``map_batches``: Ray Data's file
sources expand every path into a list in the driver before the first batch
runs, ``from_items`` puts the whole list into the object store, and a custom
datasource has to cut its read tasks up front; a folder of millions of images
must stream. So the driver walks the inputs lazily and hands numbered batches
to the actors, never holding more than a few batches per actor, and keeps
only counts. Recovery is Ray's: a dead actor is restarted (``max_restarts``)
and the tasks it held run again on it (``max_task_retries``). Each batch
writes its image files and its part of the tables under its own number
(:func:`uflow.outputs.write_part`), so a batch run again replaces whatever its
dead attempt wrote: every image lands exactly once, by construction. The
driver then merges the parts atomically (:func:`uflow.outputs.finalize`).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .errors import UFlowError
from .outputs import OutputLayout, write_image_outputs, write_part
from .result import Prediction

INSTALL_HINT = "pip install 'uflow-anomaly[ray]'"
# Tasks queued per actor: one running, one waiting, so an actor never idles while the driver hands out the next batch.
BATCHES_PER_ACTOR = 2
# A batch whose worker dies this many times in a row is taken to be what kills it (an image that exhausts memory,
# say): the run stops naming it rather than restarting workers forever.
MAX_BATCH_RETRIES = 3


class Predictor(Protocol):
    """What a worker scores with: :class:`uflow.UFlowModel` or :class:`uflow.OnnxModel`."""

    def iter_predict(self, images: Iterable[Any], **options: Any) -> Iterator[Prediction]: ...


ModelLoader = Callable[[str], Predictor]  # device -> model; called once in each worker


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UFlowError(f"--engine ray needs Ray, which is not installed here: {INSTALL_HINT}") from None
    return ray


@contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """Ray for the duration of the block: the caller's if already initialised, else ``address``'s cluster, else an embedded one."""
    ray = _import_ray()
    if ray.is_initialized():
        yield ray
        return
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR}  # worker logs stay in Ray's session folder
    try:
        if address:
            ray.init(address=address, **quiet)
        else:  # "local" always starts a new instance, never a cluster that someone else started on this machine
            ray.init(address="local", include_dashboard=False, **quiet)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = f"the Ray cluster at {address}" if address else "an embedded Ray"
        raise UFlowError(f"cannot start {where}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def worker_device(device: str, cluster_gpus: float) -> tuple[str, int]:
    """The device each worker loads its model on and the GPUs it reserves: one GPU per worker, or none.

    Ray hides from each worker every GPU but the one it reserved, so a GPU
    worker always uses ``cuda`` (``cuda:N`` names a GPU of one machine, which
    means nothing across a cluster). ``auto`` uses GPUs when the cluster has
    any. A worker that reserves no GPU sees them all, so it is told ``cpu``.
    """
    if device == "auto":
        return ("cuda", 1) if cluster_gpus >= 1 else ("cpu", 0)
    if device.startswith("cuda"):
        if cluster_gpus < 1:
            raise UFlowError(f"--device {device}: the Ray cluster has no GPUs; use --device cpu or auto")
        return "cuda", 1
    return device, 0


def pool_size(resources: dict[str, float], gpus: int, cpus_per_worker: int) -> int:
    """How many workers a cluster with ``resources`` (Ray's ``cluster_resources()``) runs at once.

    A GPU worker also takes ``cpus_per_worker`` CPUs, so a cluster with more
    GPUs than CPUs is limited by its CPUs: an actor that can never be placed
    would hold its batches forever and the run would never end.
    """
    by_cpu = resources.get("CPU", 1) / cpus_per_worker
    return max(1, int(min(by_cpu, resources.get("GPU", 0) / gpus) if gpus else by_cpu))


def part_name(index: int) -> str:
    """Parts sort by name in the order the batches were taken from the inputs."""
    return f"{index:012d}"


@dataclass(frozen=True)
class BatchDone:
    """What one batch sends back to the driver: counts only, or the error that stops the run (``--on-error stop``)."""

    images: int = 0
    failed: int = 0
    stop_error: str | None = None


class BatchScorer:
    """A Ray worker: loads the model once, then scores batches of paths into the shared stage folder."""

    def __init__(self, load_model: ModelLoader, device: str, stage: Path, layout: OutputLayout, options: dict, skip_errors: bool):
        self.model = load_model(device)
        self.stage = stage
        self.layout = layout
        self.options = options
        self.skip_errors = skip_errors

    def score(self, index: int, paths: list[str]) -> BatchDone:
        """Write the batch's image files and its part ``index``; a second call with the same batch replaces the first's."""
        errors: list[dict] = []
        on_error = (lambda path, reason: errors.append({"path": str(path), "error": reason})) if self.skip_errors else None
        try:
            stream = self.model.iter_predict(paths, keep_images="overlay" in self.layout.kinds, on_error=on_error, **self.options)
            rows = [write_image_outputs(pred, self.stage, self.layout) for pred in stream]
        except UFlowError as exc:  # sent back as a value: Ray would wrap the exception in its own, traceback and all
            return BatchDone(stop_error=str(exc))
        write_part(self.stage, part_name(index), rows, errors)
        return BatchDone(len(rows), len(errors))


def score_on_ray(
    load_model: ModelLoader,
    paths: Iterable[str | os.PathLike],
    stage: Path,
    layout: OutputLayout,
    options: dict[str, Any],
    *,
    skip_errors: bool = True,
    device: str = "auto",
    address: str | None = None,
    workers: int | None = None,
    cpus_per_worker: int = 1,
    on_batch: Callable[[BatchDone], None] | None = None,
) -> None:
    """Score ``paths`` on a pool of Ray workers, each writing its batches' files and parts into ``stage``.

    ``load_model(device)`` runs once in each worker. ``options`` are
    :meth:`uflow.UFlowModel.iter_predict`'s (``batch_size`` is also the size
    of the batches handed out). ``workers`` defaults to one per GPU of the
    cluster when scoring on GPUs, else one per ``cpus_per_worker`` CPUs. With
    ``skip_errors`` unreadable images go to the errors part; without, the
    first one stops the run with its message. Finish with
    :func:`uflow.outputs.finalize` (or :meth:`uflow.outputs.ResultsWriter.finish`
    on the writer that owns ``stage``).
    """
    batch_size = int(options.get("batch_size", 16))
    if batch_size < 1:
        raise UFlowError(f"batch size must be at least 1, got {batch_size}")
    with ray_session(address) as ray:
        worker_dev, gpus = worker_device(device, ray.cluster_resources().get("GPU", 0))
        n_workers = workers or pool_size(ray.cluster_resources(), gpus, cpus_per_worker)
        scorer = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus, max_restarts=-1, max_task_retries=MAX_BATCH_RETRIES)(BatchScorer)
        pool = [scorer.remote(load_model, worker_dev, stage, layout, options, skip_errors) for _ in range(n_workers)]
        remaining = iter(paths)
        batches = enumerate(iter(lambda: [str(p) for p in itertools.islice(remaining, batch_size)], []))
        in_flight: dict[Any, tuple[Any, list[str]]] = {}  # task -> (its actor, its paths, for the error message)

        def hand_out(actor: Any) -> None:
            for index, batch in itertools.islice(batches, 1):
                in_flight[actor.score.remote(index, batch)] = (actor, batch)

        try:
            for actor in pool * BATCHES_PER_ACTOR:
                hand_out(actor)
            while in_flight:
                [task], _ = ray.wait(list(in_flight), num_returns=1)
                actor, batch = in_flight.pop(task)
                try:
                    done: BatchDone = ray.get(task)
                except ray.exceptions.RayActorError as exc:
                    raise UFlowError(
                        f"a Ray worker died {MAX_BATCH_RETRIES + 1} times on the batch starting with {batch[0]} "
                        f"({str(exc).splitlines()[0]})"
                    ) from None
                if done.stop_error:
                    raise UFlowError(done.stop_error)
                if on_batch:
                    on_batch(done)
                hand_out(actor)
        finally:
            for actor in pool:  # also stops workers still writing into a stage the caller is about to remove
                ray.kill(actor, no_restart=True)
            if in_flight:
                ray.wait(list(in_flight), num_returns=len(in_flight), timeout=30)


def map_on_ray(fn: Callable[..., Any], items: Sequence[Any], *, device: str = "auto", address: str | None = None) -> Iterator[Any]:
    """``fn(item, device=...)`` for every item as a Ray task (one GPU each where there are GPUs, else one CPU); results in order.

    Ray re-runs a task whose worker died (its default ``max_retries``), so
    ``fn`` must be safe to run twice: uflow's fits and evaluations write
    their files atomically.
    """
    with ray_session(address) as ray:
        worker_dev, gpus = worker_device(device, ray.cluster_resources().get("GPU", 0))
        task = ray.remote(num_cpus=1, num_gpus=gpus)(_call_on_device)
        running = [task.remote(fn, item, worker_dev) for item in items]
        for ref in running:
            try:
                yield ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, UFlowError):
                    raise UFlowError(str(exc.cause)) from None
                raise


def _call_on_device(fn: Callable[..., Any], item: Any, device: str) -> Any:
    return fn(item, device=device)
