"""Command line: ``uflow fit``, ``predict``, ``watch``, ``serve``, ``export``, ``evaluate``, ``benchmark`` and ``demo``.

Problems with the user's data or models print one line, ``uflow: error: ...``,
and exit with status 1; anything else is a bug and keeps its traceback.
Progress bars are drawn only on a terminal; redirected to a file, each
command logs one line per event instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from . import __version__
from .calibration import DECISION, DECISIONS, FALSE_ALARM_RATE, NULLS, PROMISE_CONFIDENCE
from .errors import UFlowError

try:
    from .backbones import BACKBONES, DEFAULT_BACKBONE
    from .flow import DEFAULT_BATCH_SIZE, DEFAULT_LR
    from .train import POSITIONS
except ImportError:  # inference-only install (onnxruntime, no PyTorch): only 'predict MODEL.onnx' can run
    BACKBONES, DEFAULT_BACKBONE, DEFAULT_LR, DEFAULT_BATCH_SIZE, POSITIONS = {}, "tf_efficientnet_lite0", 0.0, 0, {"auto": ()}
from .segmentation import TEST_COUNTS


def _confidence(text: str) -> float | None:
    if text == "average":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability such as 0.9, or 'average', got {text!r}") from None


def _add_common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when present; default)")
    p.add_argument("--weights", default=None, metavar="PATH", help="backbone weights file (state dict; for mcait two files, comma separated)")
    p.add_argument("--no-download", action="store_true", help="never try timm's download of backbone weights")


def _add_acceleration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="backbone precision (bf16: faster on GPUs; the flow stays fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone (GPU; the first batches are slow)")


def _add_engine_args(p: argparse.ArgumentParser, local: str, ray: str) -> None:
    p.add_argument("--engine", choices=["local", "ray"], default="local", help=f"local: {local} (default); ray: {ray} (needs the ray extra)")
    p.add_argument(
        "--address",
        default=None,
        metavar="HOST:PORT",
        help="with --engine ray: join this Ray cluster (default: start Ray on this machine); its nodes must see the model, images and --out at the same paths",
    )


def _add_segmentation_args(p: argparse.ArgumentParser, with_switch: bool = True) -> None:
    p.add_argument(
        "--epsilon",
        type=float,
        default=None,
        help="detect at log10 NFA < log10 EPSILON, the paper's rule (expected false detections per image under its null; "
        "unverified). Default: the run's verified threshold",
    )
    if with_switch:
        p.add_argument("--no-segmentation", action="store_true", help="skip the a contrario segmentation (maps and scores only)")
    p.add_argument(
        "--test-count",
        choices=TEST_COUNTS,
        default="per_size",
        help="number of tests: per_size (default, epsilon spread over region sizes) or paper (one count for all regions)",
    )
    p.add_argument(
        "--null",
        choices=NULLS,
        default="calibrated",
        help="null distribution of the per-pixel statistic: calibrated on held-out normal images (default) or chi2(C)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uflow", description="U-Flow anomaly detection and segmentation from normal images only.")
    parser.add_argument("--version", action="version", version=f"uflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fit = sub.add_parser("fit", help="train on normal images", description="Train a U-Flow model on normal images and save it to a run folder.")
    fit.add_argument("data", help="MVTec-style category folder (uses train/good) or a folder of normal images")
    fit.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder to write the model into")
    fit.add_argument("--backbone", default=DEFAULT_BACKBONE, choices=sorted(BACKBONES), help=f"feature extractor (default {DEFAULT_BACKBONE})")
    fit.add_argument("--image-size", type=int, default=None, help="input size in pixels (default: the backbone's own)")
    fit.add_argument("--epochs", type=int, default=60, help="maximum epochs (default 60)")
    fit.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help=f"training batch size (default {DEFAULT_BATCH_SIZE})")
    fit.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"Adam learning rate (default {DEFAULT_LR:g})")
    fit.add_argument("--patience", type=int, default=10, help="stop after this many epochs without a better validation NLL")
    fit.add_argument(
        "--position",
        choices=list(POSITIONS),
        default="auto",
        help="position-aware flow: auto (default) trains one with and one without and keeps the one held-out normal images find likelier",
    )
    fit.add_argument(
        "--no-score-flow",
        dest="score_flow",
        action="store_false",
        help="skip the second, coarser flow that sharpens the image score (a shorter fit; maps and masks are the same)",
    )
    fit.add_argument("--val-fraction", type=float, default=0.15, help="share of normal images that choose the epoch and fit the null (default 0.15)")
    fit.add_argument(
        "--false-alarm-rate", type=float, default=FALSE_ALARM_RATE, help="promise: share of normal images allowed any detection (default 0.05)"
    )
    fit.add_argument(
        "--confidence",
        type=_confidence,
        default=PROMISE_CONFIDENCE,
        help="probability that this run keeps the promise (default 0.9; 'average' for the rate on average over runs, split conformal)",
    )
    fit.add_argument(
        "--decision",
        choices=list(DECISIONS),
        default=DECISION,
        help=f"what flags an image at the automatic threshold: its most significant region or its score (default {DECISION})",
    )
    fit.add_argument("--calibration-fraction", type=float, default=0.25, help="share of normal images that set the threshold (default 0.25)")
    fit.add_argument(
        "--verification-fraction", type=float, default=0.15, help="share of normal images, used for nothing else, that check it (default 0.15)"
    )
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_common_model_args(fit)

    pred = sub.add_parser(
        "predict",
        help="score images with a trained model",
        description="Write, per image, an overlay PNG, the raw anomaly map (.npy) and the mask PNG, mirroring the input folders, plus results.csv and results.json.",
    )
    pred.add_argument("run_dir", metavar="MODEL", help="run folder written by 'uflow fit', or a .onnx file written by 'uflow export'")
    pred.add_argument("images", nargs="+", metavar="IMAGES", help="image files, folders (searched recursively) or glob patterns")
    pred.add_argument("--out", required=True, metavar="DIR", help="output folder")
    pred.add_argument("--batch-size", type=int, default=16)
    _add_acceleration_args(pred)
    pred.add_argument(
        "--workers", type=int, default=0, help="processes that run the segmentation while the model computes the next batch (useful on a GPU; default 0)"
    )
    pred.add_argument(
        "--outputs",
        default="overlay,map,mask",
        help="per-image files to write: a comma-separated subset of overlay,map,mask, or none for the tables only (default all three)",
    )
    pred.add_argument(
        "--on-error",
        choices=["skip", "stop"],
        default="skip",
        help="an unreadable image: skip it, list it in errors.csv and exit 1 at the end (default), or stop at once and write nothing",
    )
    pred.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_engine_args(pred, "score in this process", "score on a pool of Ray workers, the model loaded once in each")
    _add_segmentation_args(pred)
    _add_common_model_args(pred)

    export = sub.add_parser(
        "export",
        help="export a trained model to ONNX",
        description="Write one ONNX graph from a raw image batch (B, H, W, 3) RGB, uint8 (default) or float32 in [0, 1], "
        "to the image score, the anomaly map at image size and the per-scale chi-square maps; resizing and normalisation are "
        "inside the graph, batch, height and width are dynamic, the model description is in the metadata. "
        "'uflow predict MODEL.onnx' runs it with onnxruntime and the same segmentation.",
    )
    export.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by 'uflow fit'")
    export.add_argument("--format", choices=["onnx"], default="onnx")
    export.add_argument("--out", required=True, metavar="FILE.onnx")
    export.add_argument("--input-dtype", choices=["uint8", "float32"], default="uint8", help="graph input type (default uint8, 0..255)")
    export.add_argument("--weights", default=None, metavar="PATH", help="backbone weights file, as for predict")
    export.add_argument("--no-download", action="store_true")

    serve = sub.add_parser(
        "serve",
        help="serve a model over HTTP: an inspection station",
        description="Serve MODEL on FastAPI + uvicorn: POST /predict (multipart field 'image'; ?mask=true&overlay=true add the PNGs), "
        "GET /health, /model, /metrics (Prometheus) and / (a page to drop images on). Concurrent requests are scored in batches. "
        "Ctrl-C or SIGTERM finishes the requests in flight, then stops.",
    )
    serve.add_argument("run_dir", metavar="MODEL", help="run folder written by 'uflow fit', or a .onnx file written by 'uflow export'")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 for the network)")
    serve.add_argument("--port", type=int, default=8000, help="default 8000")
    serve.add_argument(
        "--token", default=None, help="require 'Authorization: Bearer TOKEN' on /predict and /model (default: the UFLOW_TOKEN environment variable, if set)"
    )
    # Defaults live in uflow.service (importing FastAPI here would slow every command); None keeps them.
    serve.add_argument("--max-batch", type=int, default=None, help="most images scored together (default 16)")
    serve.add_argument("--max-wait-ms", type=float, default=None, help="longest wait for more images once one has arrived (default 10)")
    serve.add_argument("--max-body-mb", type=float, default=None, help="largest request body in MiB (default 32; 413 above)")
    serve.add_argument("--max-pixels", type=int, default=None, help="largest image, width x height (default 40000000; 413 above)")
    _add_acceleration_args(serve)
    _add_common_model_args(serve)

    ev = sub.add_parser(
        "evaluate",
        help="metrics and report on an MVTec-style category",
        description="Score test/good and test/<defect> of an MVTec-style category, compute pixel and image AUROC, AUPRO, "
        "F1-max and mIoU (automatic, fair and oracle thresholds), write metrics.json and report.html and print the table. "
        "Without a ground_truth folder only image metrics are computed.",
    )
    ev.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by 'uflow fit'")
    ev.add_argument("data", metavar="DATA", help="MVTec-style category folder")
    ev.add_argument("--out", default=None, metavar="DIR", help="where metrics.json and report.html go (default: RUN_DIR)")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--no-report", action="store_true", help="metrics.json only")
    ev.add_argument("--quiet", action="store_true")
    _add_segmentation_args(ev, with_switch=False)
    _add_common_model_args(ev)

    bench = sub.add_parser(
        "benchmark",
        help="fit and evaluate every category under an MVTec-style root",
        description="For each category under ROOT (folders with train/good and test): fit into OUT/<category>/run, "
        "evaluate into OUT/<category>; print the per-category table with means and write OUT/benchmark.json and OUT/report.html.",
    )
    bench.add_argument("root", metavar="ROOT", help="MVTec-style root folder (one subfolder per category)")
    bench.add_argument("--out", required=True, metavar="DIR")
    bench.add_argument("--categories", default=None, help="comma-separated subset of categories")
    bench.add_argument("--backbone", default=DEFAULT_BACKBONE, choices=sorted(BACKBONES))
    bench.add_argument("--image-size", type=int, default=None)
    bench.add_argument("--epochs", type=int, default=60)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--quiet", action="store_true")
    _add_engine_args(bench, "one category after another", "categories in parallel as Ray tasks")
    _add_segmentation_args(bench, with_switch=False)
    _add_common_model_args(bench)

    watch = sub.add_parser(
        "watch",
        help="score images as they land in a hot folder",
        description="Score each image that appears in IN_DIR once it is completely written, write its files to --out as "
        "'uflow predict' does, append its row to --out/results.csv and move it to the done folder (unreadable images: "
        "errors.csv and the failed folder). Stop with Ctrl-C or SIGTERM; a restart never scores an image twice or loses one.",
    )
    watch.add_argument("run_dir", metavar="MODEL", help="run folder written by 'uflow fit', or a .onnx file written by 'uflow export'")
    watch.add_argument("in_dir", metavar="IN_DIR", help="the folder to watch (only images directly in it)")
    watch.add_argument("--out", required=True, metavar="DIR", help="output folder: per-image files, results.csv, errors.csv")
    watch.add_argument("--done", default=None, metavar="DIR", help="where scored images go (default IN_DIR/done)")
    watch.add_argument("--failed", default=None, metavar="DIR", help="where unreadable images go (default IN_DIR/failed)")
    watch.add_argument("--settle", type=float, default=1.0, metavar="S", help="seconds a file must stay unchanged before it is read (default 1)")
    watch.add_argument("--poll", type=float, default=0.5, metavar="S", help="seconds between looks at the folder (default 0.5)")
    watch.add_argument("--once", action="store_true", help="score what is in the folder, waiting for it to settle, then exit")
    watch.add_argument("--batch-size", type=int, default=8)
    watch.add_argument("--outputs", default="overlay,map,mask", help="per-image files, as for predict (default overlay,map,mask)")
    watch.add_argument("--quiet", action="store_true", help="log warnings only")
    _add_acceleration_args(watch)
    _add_segmentation_args(watch)
    _add_common_model_args(watch)

    demo = sub.add_parser(
        "demo",
        help="end-to-end run on bundled real textures (no download)",
        description="Build a small MVTec-style dataset from scikit-image's real brick, grass and gravel photographs with "
        "synthetic defects, fit and evaluate each, print the metrics table and write report.html.",
    )
    demo.add_argument("--out", default="demo_output", metavar="DIR", help="output folder (default demo_output)")
    demo.add_argument("--categories", default="brick,grass,gravel", help="comma-separated subset of brick,grass,gravel")
    demo.add_argument("--epochs", type=int, default=None, help="training epochs per category (default 30)")
    demo.add_argument("--quiet", action="store_true")
    return parser


def _progress_bars(args: argparse.Namespace) -> bool:
    """Bars on a terminal only: in a log file their carriage-return frames are thousands of unreadable lines."""
    return not args.quiet and sys.stderr.isatty()


def _configure_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")

    def one_line(message, category, filename, lineno, file=None, line=None) -> None:
        # Python's default prints the file, the line number and the source line: noise for a person reading a log.
        logging.getLogger("uflow").warning("warning: %s", message)

    warnings.showwarning = one_line


def _cmd_fit(args: argparse.Namespace) -> None:
    from .anomaly_map import ALIGNED_WEIGHT
    from .train import fit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning about too few images is part of the promise line printed below
        model = fit(
            args.data,
            args.out,
            backbone=args.backbone,
            image_size=args.image_size,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            patience=args.patience,
            position=args.position,
            score_flow=args.score_flow,
            val_fraction=args.val_fraction,
            calibration_fraction=args.calibration_fraction,
            verification_fraction=args.verification_fraction,
            false_alarm_rate=args.false_alarm_rate,
            confidence=args.confidence,
            decision=args.decision,
            seed=args.seed,
            device=args.device,
            weights=args.weights,
            allow_download=not args.no_download,
            progress=_progress_bars(args),
        )
    t = model.training
    print(
        f"trained {model.backbone} on {t['n_train']} images ({t['n_val']} to stop and fit the null, {t['n_calibration']} to calibrate, "
        f"{t['n_verification']} to verify): best epoch {t['best_epoch']}/{t['epochs_run']}, "
        f"val NLL {t['best_val_nll']:.4f} nats/dim ({t['stopped']}), {t['seconds']} s; model in {args.out}"
    )
    if len(t["candidates"]) > 1:
        nll = ", ".join(
            f"{'position-aware' if c['positional'] else 'position-blind'} {c['best_val_nll']:.4f}"
            + (f" after the {c['epochs_run']} epochs of the race" if c.get("stopped") == "raced" else "")
            for c in t["candidates"]
        )
        print(f"kept the {'position-aware' if t['positional'] else 'position-blind'} flow (held-out NLL: {nll})")
    if t.get("score_flow"):
        s = t["score_flow"]
        print(f"score flow (coarser scales, for the image score): best epoch {s['best_epoch']}/{s['epochs_run']}, val NLL {s['best_val_nll']:.4f} ({s['stopped']})")
    if t.get("whole_map_centre_weight") is not None:
        weight = t["whole_map_centre_weight"]
        if model.calibration.score_parts == "flows":
            combined = "mean" if model.calibration.score_combination == "mean" else "larger"
            print(f"image score from the {combined} of the flows' whole maps per position: aligned images (whole map's centre weight {weight:.3f} >= {ALIGNED_WEIGHT})")
        else:
            print(f"image score from each scale per position (whole map's centre weight {weight:.3f} < {ALIGNED_WEIGHT}: not aligned images)")
    print(model.calibration.promise.note)


def _load_predict_model(args: argparse.Namespace, device: str):
    """The model 'uflow predict' scores with (also called in each Ray worker, with that worker's device)."""
    from .onnx_model import OnnxModel

    if Path(args.run_dir).suffix == ".onnx":
        if getattr(args, "workers", 0) or args.compile or args.precision != "fp32":
            raise UFlowError("--workers, --compile and --precision apply to run folders, not to an .onnx model")
        return OnnxModel.load(args.run_dir)
    from .model import load

    model = load(args.run_dir, device=device, weights=args.weights, allow_download=not args.no_download)
    return model.accelerate(args.precision, compile=args.compile)


def _labels_by_score(model: Any, args: argparse.Namespace) -> bool:
    promise = model.calibration.promise
    return args.no_segmentation or (args.epsilon is None and promise is not None and promise.decision == "score")


def _cmd_predict(args: argparse.Namespace) -> None:
    from functools import partial

    from tqdm.auto import tqdm

    from .images import input_base, iter_inputs
    from .outputs import OutputLayout, ResultsWriter, parse_output_kinds

    kinds = parse_output_kinds(args.outputs)
    # With Ray the workers score on their own devices; the model is loaded here only to check it and read its calibration.
    model = _load_predict_model(args, "cpu" if args.engine == "ray" else args.device)
    paths = iter_inputs(args.images)
    layout = OutputLayout(input_base(args.images), kinds, (model.calibration.display_low, model.calibration.display_high))
    by_score = _labels_by_score(model, args)
    meta = {
        "model": str(Path(args.run_dir).resolve()),
        "segmentation": not args.no_segmentation,
        "epsilon": args.epsilon,
        "log10_nfa_threshold": model.calibration.log10_threshold(args.epsilon, args.test_count, args.null) if not args.no_segmentation else None,
        # What labelled the images: the score (and its threshold) when nothing is segmented or the run decides on it.
        "decision": "score" if by_score else "region",
        "score_threshold": model.calibration.image_threshold if by_score else None,
        "score_threshold_verified": by_score and getattr(model.calibration.promise, "score_threshold", None) is not None,
        "test_count": args.test_count,
        "null": args.null,
    }
    with ResultsWriter(args.out, layout, meta) as writer:
        options = {"batch_size": args.batch_size, "segmentation": not args.no_segmentation, **_segmentation_options(args)}
        if args.workers:
            options["workers"] = args.workers
        if args.engine == "ray":
            from .ray_engine import score_on_ray

            with tqdm(desc="predict", unit="img", disable=not _progress_bars(args)) as bar:
                score_on_ray(
                    partial(_load_predict_model, args), paths, writer.stage, layout, options, skip_errors=args.on_error == "skip",
                    device=args.device, address=args.address, on_batch=lambda done: bar.update(done.images + done.failed),
                )
        else:
            on_error = writer.add_error if args.on_error == "skip" else None
            stream = model.iter_predict(paths, keep_images="overlay" in kinds, on_error=on_error, **options)
            for pred in tqdm(stream, desc="predict", unit="img", disable=not _progress_bars(args)):
                writer.add(pred)
        summary = writer.finish()
    print(f"{summary.n_images} images, {summary.n_anomalous} anomalous; results in {Path(args.out) / 'results.csv'}")
    if summary.n_errors:
        raise UFlowError(
            f"{summary.n_errors} of {summary.n_images + summary.n_errors} images could not be scored and are listed in "
            f"{Path(args.out) / 'errors.csv'} (first: {summary.first_error})"
        )


def _cmd_watch(args: argparse.Namespace) -> None:
    import signal
    import threading

    from .outputs import parse_output_kinds
    from .watch import HotFolder

    kinds = parse_output_kinds(args.outputs)
    model = _load_predict_model(args, args.device)
    options = {"segmentation": not args.no_segmentation, **_segmentation_options(args)}
    stop = threading.Event()

    def request_stop(signum, frame) -> None:
        logging.getLogger("uflow.watch").info("stopping after the batch in hand")
        stop.set()

    # Before the hot folder creates its files: a supervisor that sees results.csv may stop the watcher at once.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, request_stop)
    folder = HotFolder(
        model, args.in_dir, args.out, kinds=kinds, done_dir=args.done, failed_dir=args.failed, predict_options=options,
        settle_s=args.settle, poll_s=args.poll, batch_size=args.batch_size,
    )
    done = folder.run(stop, once=args.once)
    print(f"{done.scored} images scored ({done.anomalous} anomalous), {done.failed} unreadable, {done.recovered} recovered; results in {folder.results.path}")


def _cmd_serve(args: argparse.Namespace) -> None:
    import logging.config

    import uvicorn

    from .service import create_app, log_config

    token = args.token or os.environ.get("UFLOW_TOKEN") or None
    model = _load_predict_model(args, args.device)
    limits = {
        "max_body_bytes": None if args.max_body_mb is None else int(args.max_body_mb * 2**20),
        "max_pixels": args.max_pixels,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
    }
    app = create_app(model, source=str(Path(args.run_dir).resolve()), token=token, **{k: v for k, v in limits.items() if v is not None})
    logging.config.dictConfig(log_config())
    log = logging.getLogger("uflow.service")
    log.info(
        "serving %s (%s, %d px) at http://%s:%d/ %s", args.run_dir, model.backbone, model.image_size, args.host, args.port,
        "with a token" if token else "without a token",
    )
    if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without a token: anyone who can reach this port can use the model", args.host)
    # uvicorn stops on SIGINT/SIGTERM after the requests in flight are answered (30 s at most).
    uvicorn.run(app, host=args.host, port=args.port, log_config=log_config(), access_log=False, timeout_graceful_shutdown=30)


def _cmd_export(args: argparse.Namespace) -> None:
    from .export import export_onnx
    from .model import load

    model = load(args.run_dir, device="cpu", weights=args.weights, allow_download=not args.no_download)
    path = export_onnx(model, args.out, input_dtype=args.input_dtype)
    print(f"exported {model.backbone} ({model.image_size} px, input {args.input_dtype} B x H x W x 3) to {path}")


def _segmentation_options(args: argparse.Namespace) -> dict:
    return {"epsilon": args.epsilon, "test_count": args.test_count, "null": args.null}


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from .evaluate import evaluate
    from .tables import format_intervals, format_table
    from .model import load

    model = load(args.run_dir, device=args.device, weights=args.weights, allow_download=not args.no_download)
    out = Path(args.out or args.run_dir)
    result = evaluate(
        model, args.data, out, batch_size=args.batch_size, report=not args.no_report, progress=_progress_bars(args), **_segmentation_options(args)
    )
    print(format_table([(result.category, result.metrics)]))
    intervals = format_intervals([(result.category, result.metrics)])
    if intervals:
        print(intervals)
    print(f"metrics: {out / 'metrics.json'}")
    if not args.no_report:
        print(f"report:  {(out / 'report.html').resolve()}")


def _category_list(text: str | None) -> list[str] | None:
    return [c.strip() for c in text.split(",") if c.strip()] if text else None


def _cmd_benchmark(args: argparse.Namespace) -> None:
    from .benchmark import run_benchmark

    fit_options = {
        "backbone": args.backbone,
        "image_size": args.image_size,
        "epochs": args.epochs,
        "seed": args.seed,
        "device": args.device,
        "weights": args.weights,
        "allow_download": not args.no_download,
    }
    if args.engine == "ray":
        from functools import partial

        from .ray_engine import map_on_ray

        fit_options.pop("device")  # each task is given its worker's device
        map_categories = partial(map_on_ray, device=args.device, address=args.address)
    else:
        map_categories = map
    run_benchmark(
        args.root, args.out, fit_options=fit_options, evaluate_options=_segmentation_options(args),
        only=_category_list(args.categories), progress=_progress_bars(args), map_categories=map_categories,
    )
    print(f"report:  {(Path(args.out) / 'report.html').resolve()}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import DEMO_EPOCHS, run_demo
    from .textures import CATEGORIES

    chosen = tuple(_category_list(args.categories) or ())
    unknown = sorted(set(chosen) - set(CATEGORIES))
    if unknown or not chosen:
        raise UFlowError(f"demo categories must be among {', '.join(CATEGORIES)}, got {args.categories!r}")
    run_demo(Path(args.out), categories=chosen, epochs=args.epochs or DEMO_EPOCHS, progress=_progress_bars(args))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(getattr(args, "quiet", False))
    handlers = {
        "fit": _cmd_fit, "predict": _cmd_predict, "watch": _cmd_watch, "serve": _cmd_serve, "export": _cmd_export,
        "evaluate": _cmd_evaluate, "benchmark": _cmd_benchmark, "demo": _cmd_demo,
    }
    try:
        handlers[args.command](args)
    except UFlowError as exc:
        print(f"uflow: error: {exc}", file=sys.stderr)
        return 1
    except ImportError as exc:
        if exc.name not in (
            "torch", "torchvision", "timm", "safetensors", "onnx", "onnxruntime", "onnxscript", "matplotlib", "sklearn",
            "fastapi", "uvicorn", "multipart", "python_multipart", "prometheus_client",
        ):
            raise
        print(f"uflow: error: '{args.command}' needs {exc.name}, which is not installed here; repair the install: pip install uflow-anomaly", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("uflow: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
