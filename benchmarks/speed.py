"""Speed and memory, side by side: uflow (PyTorch and ONNX Runtime) against anomalib 2.7.0's Uflow.

    python benchmarks/speed.py                       # small CPU settings
    python benchmarks/speed.py --device cuda --train-images 200 --epochs 10 --predict-images 512 --precision bf16 --workers 8
    python benchmarks/speed.py --backbone mcait ...  # the paper's MS-CaiT at 448 px

Same data (crops of scikit-image's real brick photograph), same backbone
(resnet18 by default; wide_resnet50_2 and MS-CaiT are the others both
implement) and the same backbone weights for both projects: a seeded state
dict file per timm model is written once and loaded into both (anomalib's own
loader asks timm to download ImageNet weights, which this machine cannot; the
script loads the files into anomalib's timm models itself). Timing does not
depend on the weights' values.

anomalib is installed by this script into its own virtual environment
(``--anomalib-venv``, pinned to 2.7.0 and to this machine's torch build), never
into uflow's. Each measurement runs in a fresh process so its peak memory is
its own. anomalib is trained with its torch model and loss in a plain loop
(no Lightning engine, model built before the clock starts) and predicts maps
only (its NFA segmentation is a separate, much slower step), all of which
favour it; uflow's fit time includes building the backbone, extracting the
features, validating every epoch, calibrating and saving.

Reported: time to fit for the same epochs; predict throughput (batches of ``--batch-size``)
and latency at batch 1, end to end from decoded images (resize and
normalisation included; uflow's a contrario segmentation included unless the
row says "maps only"); peak RAM and GPU memory. Medians over ``--runs``.
The "backbone forward only" row times uflow's frozen backbone alone on
batches already on the device: the practical ceiling for predict throughput.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

HERE = Path(__file__).resolve()
ANOMALIB = "anomalib==2.7.0"
TORCH_PINS = ["torch==2.14.1", "torchvision==0.29.1"]


# --------------------------------------------------------------------------- workers (fresh processes)


def _peak_memory(device: str) -> dict:
    import resource

    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.startswith("cuda"):
        import torch

        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _load_arrays(folder: str) -> list:
    import numpy as np
    from PIL import Image

    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(Path(folder).glob("*.png"))]


def _significant(x: float) -> float:
    return float(f"{x:.4g}")


def _time_predict(run_all, run_one, images: list, runs: int, device: str, latency_images: int, warmup: int) -> dict:
    """Throughput of ``run_all`` (all images) and latency of ``run_one`` (one image), medians over ``runs``."""
    run_all(images[:warmup])
    throughput, latency = [], []
    for _ in range(runs):
        _sync(device)
        start = time.perf_counter()
        run_all(images)
        _sync(device)
        throughput.append(len(images) / (time.perf_counter() - start))
        single = []
        for image in images[:latency_images]:
            start = time.perf_counter()
            run_one(image)
            _sync(device)
            single.append(1000 * (time.perf_counter() - start))
        latency.append(statistics.median(single))
    return {"images_per_s": _significant(statistics.median(throughput)), "latency_ms": _significant(statistics.median(latency)), "runs": throughput}


def job_uflow_fit(a: dict) -> dict:
    import uflow

    times = []
    for r in range(a["runs"]):
        start = time.perf_counter()
        uflow.fit(a["train"], Path(a["out"]) / f"run{r}", backbone=a["backbone"], image_size=a["size"], epochs=a["epochs"],
                  patience=a["epochs"], weights=a["weights"], device=a["device"], progress=False, allow_download=False)
        _sync(a["device"])
        times.append(time.perf_counter() - start)
    return {"fit_s": round(statistics.median(times), 2), "runs": times, **_peak_memory(a["device"])}


def job_uflow_predict(a: dict) -> dict:
    import uflow

    model = uflow.load(Path(a["out"]) / "run0", device=a["device"], weights=a["weights"], allow_download=False)
    model.accelerate(a["precision"], compile=a["compile"])
    images = _load_arrays(a["test"])

    def run_all(batch):
        model.predict(batch, batch_size=a["batch_size"], segmentation=a["segmentation"], workers=a["workers"])

    def run_one(image):
        model.predict(image, segmentation=a["segmentation"])

    return {**_time_predict(run_all, run_one, images, a["runs"], a["device"], a["latency_images"], a["batch_size"]), **_peak_memory(a["device"])}


def job_uflow_backbone(a: dict) -> dict:
    import torch

    import uflow
    from uflow.images import as_float_image
    from uflow.model import to_model_input

    model = uflow.load(Path(a["out"]) / "run0", device=a["device"], weights=a["weights"], allow_download=False)
    model.accelerate(a["precision"], compile=a["compile"])
    images = [to_model_input(as_float_image(x)[0], model.image_size) for x in _load_arrays(a["test"])]
    memory_format = torch.channels_last if a["device"].startswith("cuda") else torch.contiguous_format
    size = a["batch_size"]
    batches = [torch.stack(images[i : i + size]).to(a["device"]).contiguous(memory_format=memory_format) for i in range(0, len(images), size)]

    def run_all(subset):
        for batch in subset:
            model.features(batch)

    def run_one(batch):
        model.features(batch[:1])

    # Batches stand in for images here, so one warm-up batch and one latency image.
    result = _time_predict(run_all, run_one, batches, a["runs"], a["device"], 1, 1)
    result["images_per_s"] = _significant(result["images_per_s"] * len(images) / len(batches))
    result["runs"] = [r * len(images) / len(batches) for r in result["runs"]]
    return {**result, **_peak_memory(a["device"])}


def job_onnx_predict(a: dict) -> dict:
    from uflow.onnx_model import OnnxModel

    model = OnnxModel.load(a["onnx"])
    images = _load_arrays(a["test"])

    def run_all(batch):
        model.predict(batch, batch_size=a["batch_size"], segmentation=a["segmentation"])

    def run_one(image):
        model.predict(image, segmentation=a["segmentation"])

    return {**_time_predict(run_all, run_one, images, a["runs"], "cpu", a["latency_images"], a["batch_size"]), **_peak_memory("cpu")}


@contextlib.contextmanager
def offline_timm() -> Iterator[None]:
    """timm.create_model never fetches weights inside: anomalib asks it for pretrained ones, which offline machines cannot get."""
    import timm

    original = timm.create_model

    def offline(*args, **kwargs):
        kwargs["pretrained"] = False
        return original(*args, **kwargs)

    timm.create_model = offline
    try:
        yield
    finally:
        timm.create_model = original


def _anomalib_model(a: dict):
    """anomalib's UflowModel with our weights file in its timm backbone (its loader would download)."""
    import torch
    from anomalib.models.image.uflow.torch_model import UflowModel

    with offline_timm():
        model = UflowModel(input_size=(a["size"], a["size"]), flow_steps=4, backbone=a["backbone"])
    files = a["weights"].split(",")
    if a["backbone"] == "mcait":  # two whole timm CaiTs
        for extractor, file in zip((model.feature_extractor.extractor1, model.feature_extractor.extractor2), files):
            extractor.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
    else:  # timm features_only model: the classifier's head tensors are left over
        extractor = model.feature_extractor.feature_extractor
        missing, unexpected = extractor.load_state_dict(torch.load(files[0], map_location="cpu", weights_only=True), strict=False)
        own_keys = set(extractor.state_dict())
        assert not missing and all(k not in own_keys for k in unexpected), f"weights do not fit anomalib's backbone: {missing[:3]}"
    return model.to(a["device"])


def _anomalib_batch(images: list, size: int, device: str):
    import numpy as np
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255).to(device)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def job_anomalib_fit(a: dict) -> dict:
    import torch
    from anomalib.models.image.uflow.loss import UFlowLoss

    images = _load_arrays(a["train"])
    data = _anomalib_batch(images, a["size"], "cpu")  # decoded and resized once: favours anomalib
    times = []
    for _ in range(a["runs"]):
        torch.manual_seed(0)
        model = _anomalib_model(a)
        loss_fn = UFlowLoss()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=1e-3, weight_decay=1e-5)
        _sync(a["device"])
        start = time.perf_counter()
        for _ in range(a["epochs"]):
            model.train()
            model.feature_extractor.eval()
            for idx in torch.randperm(len(data)).split(16):
                z, ljd = model(data[idx].to(a["device"]))
                loss = loss_fn(z, ljd)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        _sync(a["device"])
        times.append(time.perf_counter() - start)
    return {"fit_s": round(statistics.median(times), 2), "runs": times, **_peak_memory(a["device"])}


def job_anomalib_predict(a: dict) -> dict:
    import torch

    model = _anomalib_model(a).eval()
    images = _load_arrays(a["test"])

    def run_all(batch):
        with torch.no_grad():
            for i in range(0, len(batch), a["batch_size"]):
                model(_anomalib_batch(batch[i : i + a["batch_size"]], a["size"], a["device"])).anomaly_map.cpu()

    def run_one(image):
        run_all([image])

    return {**_time_predict(run_all, run_one, images, a["runs"], a["device"], a["latency_images"], a["batch_size"]), **_peak_memory(a["device"])}


JOBS = {f.__name__[4:]: f for f in (job_uflow_fit, job_uflow_predict, job_uflow_backbone, job_onnx_predict, job_anomalib_fit, job_anomalib_predict)}


# --------------------------------------------------------------------------- driver


def run_job(python: str, name: str, args: dict) -> dict:
    res = subprocess.run([python, str(HERE), "--job", name, json.dumps(args)], capture_output=True, text=True,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if res.returncode != 0:
        raise SystemExit(f"{name} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def ensure_anomalib(venv: Path) -> str:
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import anomalib, sys; sys.exit(anomalib.__version__ != '2.7.0')"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return str(python)
    print(f"installing {ANOMALIB} into {venv} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *TORCH_PINS], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", ANOMALIB], check=True)
    return str(python)


def make_data(root: Path, n_train: int, n_test: int, size: int) -> tuple[Path, Path]:
    import numpy as np
    from PIL import Image

    from uflow.textures import _texture

    texture = (_texture("brick") * 255).astype(np.uint8)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            y, x = rng.integers(0, texture.shape[0] - size + 1, 2)
            Image.fromarray(texture[y : y + size, x : x + size]).save(folder / f"{i:04d}.png")
    return root / "train", root / "test"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=None, help="image size (default 256; MS-CaiT works at 448 only)")
    parser.add_argument("--backbone", default="resnet18", choices=["resnet18", "wide_resnet50_2", "mcait"])
    parser.add_argument("--train-images", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--predict-images", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16, help="predict batch size, both projects (fit uses 16)")
    parser.add_argument("--latency-images", type=int, default=16, help="images timed one at a time per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--anomalib-venv", type=Path, default=Path.home() / ".cache" / "uflow" / "anomalib-2.7.0-venv")
    parser.add_argument("--skip-anomalib", action="store_true")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="uflow's backbone precision")
    parser.add_argument("--compile", action="store_true", help="torch.compile uflow's backbone")
    parser.add_argument("--workers", type=int, default=0, help="uflow segmentation worker processes")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--job", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        print(json.dumps(JOBS[args.job[0]](json.loads(args.job[1]))))
        return

    import timm
    import torch

    from uflow.backbones import get_spec

    spec = get_spec(args.backbone)
    args.size = args.size or (spec.default_image_size if spec.fixed_image_size else 256)
    work = Path(tempfile.mkdtemp(prefix="uflow-speed-"))
    train, test = make_data(work / "data", args.train_images, args.predict_images, args.size)
    weights = []
    for arch in spec.timm_models:
        torch.manual_seed(0)
        weights.append(str(work / f"{arch}.pth"))
        torch.save(timm.create_model(arch).state_dict(), weights[-1])
    common = {"train": str(train), "test": str(test), "out": str(work / "uflow"), "backbone": args.backbone, "size": args.size,
              "epochs": args.epochs, "weights": ",".join(weights), "device": args.device, "runs": args.runs,
              "latency_images": args.latency_images, "batch_size": args.batch_size, "precision": args.precision, "compile": args.compile, "workers": args.workers}
    me = sys.executable
    rows: dict[str, dict] = {}
    rows["uflow fit"] = run_job(me, "uflow_fit", common)
    rows["uflow predict"] = run_job(me, "uflow_predict", {**common, "segmentation": True})
    rows["uflow predict (maps only)"] = run_job(me, "uflow_predict", {**common, "segmentation": False})
    rows["uflow backbone forward only"] = run_job(me, "uflow_backbone", common)
    if args.device == "cpu" and args.backbone != "mcait":  # MS-CaiT does not export to ONNX
        from uflow import load
        from uflow.export import export_onnx

        onnx_path = export_onnx(load(work / "uflow" / "run0", weights=common["weights"], allow_download=False), work / "model.onnx")
        rows["uflow onnxruntime predict"] = run_job(me, "onnx_predict", {**common, "onnx": str(onnx_path), "segmentation": True})
        rows["uflow onnxruntime predict (maps only)"] = run_job(me, "onnx_predict", {**common, "onnx": str(onnx_path), "segmentation": False})
    if not args.skip_anomalib:
        python = ensure_anomalib(args.anomalib_venv)
        rows["anomalib fit"] = run_job(python, "anomalib_fit", common)
        rows["anomalib predict (maps only)"] = run_job(python, "anomalib_predict", common)

    machine = f"{platform.machine()}, {os.cpu_count()} CPUs" + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else "")
    print(f"\n{time.strftime('%Y-%m-%d')} · {machine} · device {args.device} · {args.backbone} at {args.size} px · "
          f"fit: {args.train_images} images x {args.epochs} epochs · predict: {args.predict_images} images · median of {args.runs} runs")
    print(f"weights: one seeded state dict file per timm model ({', '.join(spec.timm_models)}) loaded into both projects "
          "(no ImageNet download possible here)")
    print(f"{'':40s} {'fit s':>8s} {'img/s b' + str(args.batch_size):>10s} {'ms b1':>8s} {'peak RAM MB':>12s} {'peak GPU MB':>12s}")
    for name, r in rows.items():
        print(f"{name:40s} {r.get('fit_s', ''):>8} {r.get('images_per_s', ''):>10} {r.get('latency_ms', ''):>8} "
              f"{r.get('peak_rss_mb', ''):>12} {r.get('peak_gpu_mb', '-'):>12}")
    ceiling = rows["uflow predict"]["images_per_s"] / rows["uflow backbone forward only"]["images_per_s"]
    print(f"uflow predict with segmentation reaches {ceiling:.2f}x the backbone's forward-only throughput")
    if "anomalib fit" in rows:
        ratio_fit = rows["anomalib fit"]["fit_s"] / rows["uflow fit"]["fit_s"]
        ratio_pred = rows["uflow predict (maps only)"]["images_per_s"] / rows["anomalib predict (maps only)"]["images_per_s"]
        ratio_seg = rows["uflow predict"]["images_per_s"] / rows["anomalib predict (maps only)"]["images_per_s"]
        print(f"ratios: fit time anomalib / uflow {ratio_fit:.2f}x; predict throughput uflow / anomalib, maps only {ratio_pred:.2f}x; "
              f"predict with segmentation vs anomalib maps only {ratio_seg:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json), "anomalib_venv": str(args.anomalib_venv)},
                                         "machine": machine, "rows": rows}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
