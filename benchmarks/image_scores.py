"""Image AUROC of candidate image scores on one fitted run, from the same predictions.

    python benchmarks/image_scores.py RUN_DIR CATEGORY_DIR [--json FILE]

Candidates: the anomaly map's maximum (the paper's), the mean of its top 0.1 %,
1 % and 5 % of pixels, minus the image's smallest log10 NFA (its most
significant a contrario region), the top 1 % of each scale's map alone, and the
top 1 % of the map standardised per pixel position by the mean and spread of
the maps of the run's stopping images (normal images the flow did not train on)
or of its training images (more of them, but fitted). With a score flow, also
that flow's top 1 % alone and standardised per position, and combinations of
standardised parts (each standardised on the stopping images, as ``fit`` does):
the larger of the two flows' (uflow's score before the per-scale parts), their
mean, the largest of each map-flow scale and the score flow (uflow's score
before the per-position step), the largest of every scale of both flows, and
(e) and (f): every part, or the score flow's alone, standardised per position
with shrinkage first (computed here in NumPy, independently of uflow's own
code; uflow scores with (e), or with (u) where its whole map's centre weight, printed
last, is at least 0.8); (g) and (h), (e) with the variance or
nothing left unshrunk; (i) and (j), the two flows' whole maps, or the map
flow's alone, per position; (k), (e)'s parts and the map flow's whole
map per position, the largest; (l) and (m), (e) with each part's top 5 %, or
its standardised map smoothed by uflow's display blur first; (n), (e) with
each part's map the distance of the latents from each position's mean and
covariance on the training images (PaDiM's statistic in latent space); (t), the run's
parts ((e) or (i), as it chose) combined by their mean instead of the largest, and (u),
that for runs that chose (i) only. It also prints how much weight (e) gives each
position's own centre, per part (0: global, 1: fully per position). Every image is scored once at the model's resolution,
as ``uflow evaluate`` does, and each map candidate is computed from the flow's
unsmoothed map on the input grid (what uflow's score reads), so the differences
come from the score alone. Used to fix uflow's image score
(``anomaly_map.image_score``) across several sets, never per dataset.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import uflow
from uflow.anomaly_map import ALIGNED_WEIGHT, display_map, likelihood_map
from uflow.evaluate import mvtec_test_set, model_resolution
from uflow.metrics import image_auroc
from uflow.model import UFlowModel, flow_latents, to_model_input
from uflow.train import training_images


def top_mean(maps: np.ndarray, share: float) -> np.ndarray:
    flat = maps.reshape(len(maps), -1)
    top = max(1, int(np.ceil(share * flat.shape[1])))
    return np.sort(flat, axis=1)[:, -top:].mean(axis=1)


@torch.no_grad()
def scale_maps(model: UFlowModel, paths: list[Path]) -> np.ndarray:
    """Each scale's flow map alone (N, L, S, S) on the model's input grid, each image resized as ``uflow evaluate`` does."""
    size, square = model.image_size, model.extractor.spec.fixed_image_size
    out = []
    for path in paths:
        batch = to_model_input(model_resolution(path, size, square), size)[None].to(model.device)
        out.append(torch.stack([likelihood_map([z], (size, size))[0] for z in model.latents(batch)]).cpu().numpy())
    return np.stack(out)


def flow_maps(model: UFlowModel, paths: list[Path]) -> np.ndarray:
    """The flow's unsmoothed maps (N, S, S) on the model's input grid: 1 - mean over scales of the likelihoods."""
    return scale_maps(model, paths).mean(axis=1)


@torch.no_grad()
def score_flow_scale_maps(model: UFlowModel, paths: list[Path]) -> np.ndarray:
    """Each of the score flow's scales alone (N, L, S, S) on the model's input grid."""
    size, square, spec = model.image_size, model.extractor.spec.fixed_image_size, model.extractor.spec
    out = []
    for path in paths:
        batch = to_model_input(model_resolution(path, size, square), size)[None].to(model.device)
        features = model.features(batch)
        latents, _ = model.score_flow([features[i].float() for i in spec.score_scales])
        out.append(torch.stack([likelihood_map([z], (size, size))[0] for z in latents]).cpu().numpy())
    return np.stack(out)


def score_flow_maps(model: UFlowModel, paths: list[Path]) -> np.ndarray:
    """The score flow's unsmoothed maps (N, S, S) on the model's input grid (from its coarser scales)."""
    return score_flow_scale_maps(model, paths).mean(axis=1)


def standardised_on(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``scores`` as uflow standardises a flow's score: by the reference scores' mean and population spread (floor 1 %)."""
    centre = reference.mean()
    return (scores - centre) / max(reference.std(), 0.01 * abs(centre), 1e-6)


def standardised_per_position(maps: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``maps`` minus the reference maps' mean at each pixel, over their spread there (floored at a tenth of its mean)."""
    spread = reference.std(axis=0)
    return (maps - reference.mean(axis=0)) / np.maximum(spread, 0.1 * spread.mean())


def shrunk_per_position(maps: np.ndarray, reference: np.ndarray, shrink_centre: bool = True, shrink_variance: bool = True) -> np.ndarray:
    """``maps`` standardised per pixel position, each position's centre and variance shrunk toward the global ones.

    The weight is a method-of-moments (James-Stein) one: the variance between positions beyond what ``n`` reference
    maps' sampling noise explains, over that plus the noise. Where position carries nothing (a texture) the weight
    falls to about 0 and this is a global standardisation; on aligned parts it nears 1. Either shrinkage can be
    switched off (candidates (g) and (h)).
    """
    n = len(reference)
    centre, variance = reference.mean(axis=0), reference.var(axis=0, ddof=1)

    def shrunk(local: np.ndarray, noise: np.ndarray) -> np.ndarray:
        overall = local.mean()
        between = max(float(local.var() - noise.mean()), 0.0)
        return overall + between / (between + noise + 1e-12) * (local - overall)

    centre = shrunk(centre, variance / n) if shrink_centre else centre
    variance = shrunk(variance, 2 * variance**2 / (n - 1)) if shrink_variance else variance
    spread = np.sqrt(np.maximum(variance, 0.0))
    return (maps - centre) / np.maximum(spread, 0.1 * spread.mean())


def centre_weight(reference: np.ndarray) -> float:
    """The mean over positions of the weight :func:`shrunk_per_position` gives each position's own centre."""
    noise = reference.var(axis=0, ddof=1) / len(reference)
    centre = reference.mean(axis=0)
    between = max(float(centre.var() - noise.mean()), 0.0)
    return float((between / (between + noise + 1e-12)).mean())


@torch.no_grad()
def latents_per_scale(model: UFlowModel, paths: list[Path]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The map flow's and the score flow's latents per scale, each (N, C, H, W), each image resized as ``uflow evaluate`` does."""
    size, square, spec = model.image_size, model.extractor.spec.fixed_image_size, model.extractor.spec
    map_latents, score_latents = [], []
    for path in paths:
        batch = to_model_input(model_resolution(path, size, square), size)[None].to(model.device)
        latents, coarse = flow_latents([f.float() for f in model.features(batch)], spec, model.flow, model.score_flow)
        map_latents.append([z[0].cpu().numpy() for z in latents])
        score_latents.append([z[0].cpu().numpy() for z in coarse])
    # Per scale, the images stacked: (N, C, H, W).
    return [np.stack(scale) for scale in zip(*map_latents)], [np.stack(scale) for scale in zip(*score_latents)]


def mahalanobis_per_position(latents: np.ndarray, trained: np.ndarray, size: int) -> np.ndarray:
    """Candidate (n): each position's latent vector's Mahalanobis distance (N, size, size) on the input grid.

    Against that position's mean and covariance over the training latents, each shrunk toward the pooled one: the
    mean with (e)'s James-Stein weight in vector form (the between-position spread of the means beyond tr(cov) / n),
    the covariance (1 - l) own + l pooled (the mean of the positions' own) with l = d / (n + d), plus 1e-3 I.
    """
    n, d, height, width = trained.shape
    train = torch.from_numpy(trained).double().permute(2, 3, 0, 1).reshape(height * width, n, d)
    centre = train.mean(dim=1)
    centred = train - centre[:, None]
    cov = centred.transpose(1, 2) @ centred / (n - 1)
    overall = centre.mean(dim=0)
    noise = cov.diagonal(dim1=1, dim2=2).sum(dim=1) / n
    between = max(float(((centre - overall) ** 2).sum(dim=1).mean() - noise.mean()), 0.0)
    centre = overall + (between / (between + noise + 1e-12))[:, None] * (centre - overall)
    share = d / (n + d)
    cov = (1 - share) * cov + share * cov.mean(dim=0) + 1e-3 * torch.eye(d, dtype=cov.dtype)
    factor = torch.linalg.cholesky(cov)
    x = torch.from_numpy(latents).double().permute(2, 3, 1, 0).reshape(height * width, d, len(latents))
    whitened = torch.linalg.solve_triangular(factor, x - centre[:, :, None], upper=False)
    distance = whitened.pow(2).sum(dim=1).sqrt().T.reshape(len(latents), 1, height, width)
    return torch.nn.functional.interpolate(distance.float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()


def run_training_images(model: UFlowModel) -> list[Path]:
    """The images the run's flows trained on: its data folder's images less the held-out ones it recorded."""
    # The run records held-out images as absolute paths and its data folder as given (perhaps relative).
    held_out = {Path(p).resolve() for key in ("val_images", "calibration_images", "verification_images") for p in model.training[key]}
    trained = [p for p in training_images(model.training["data"]) if p.resolve() not in held_out]
    if len(trained) != model.training["n_train"]:
        raise SystemExit("the run's training images are not where it recorded them")
    return trained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("category", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    model = uflow.load(args.run_dir)
    items, _ = mvtec_test_set(args.category)
    square = model.extractor.spec.fixed_image_size
    images = (model_resolution(it.path, model.image_size, square) for it in items)
    predictions = list(model.iter_predict(images))
    per_scale = scale_maps(model, [it.path for it in items])
    maps = per_scale.mean(axis=1)
    stopping_paths = [Path(p) for p in model.training["val_images"]]
    stopping_per_scale = scale_maps(model, stopping_paths)
    stopping = stopping_per_scale.mean(axis=1)
    trained = run_training_images(model)
    anomalous = [it.anomalous for it in items]
    candidates = {
        "max": maps.reshape(len(maps), -1).max(axis=1),
        "top 0.1 %": top_mean(maps, 0.001),
        "top 1 %": top_mean(maps, 0.01),
        "top 5 %": top_mean(maps, 0.05),
        "smallest log10 NFA": -np.array([float(np.min(p.log10_nfa)) for p in predictions]),
        **{f"scale {i} top 1 %": top_mean(per_scale[:, i], 0.01) for i in range(per_scale.shape[1])},
        "per-position (stopping) top 1 %": top_mean(standardised_per_position(maps, stopping), 0.01),
        "per-position (training) top 1 %": top_mean(standardised_per_position(maps, flow_maps(model, trained)), 0.01),
        "uflow's score": np.array([p.score for p in predictions]),
    }
    if model.score_flow is not None:
        # Every part standardised on the stopping images as uflow's calibration does, so the candidates do not
        # depend on which parts the run itself recorded.
        coarse_scales = score_flow_scale_maps(model, [it.path for it in items])
        stopping_coarse = score_flow_scale_maps(model, stopping_paths)
        coarse = coarse_scales.mean(axis=1)
        candidates["score flow top 1 %"] = top_mean(coarse, 0.01)
        map_whole = standardised_on(candidates["top 1 %"], top_mean(stopping, 0.01))
        map_each = [standardised_on(top_mean(per_scale[:, i], 0.01), top_mean(stopping_per_scale[:, i], 0.01)) for i in range(per_scale.shape[1])]
        coarse_whole = standardised_on(candidates["score flow top 1 %"], top_mean(stopping_coarse.mean(axis=1), 0.01))
        coarse_each = [standardised_on(top_mean(coarse_scales[:, i], 0.01), top_mean(stopping_coarse[:, i], 0.01)) for i in range(coarse_scales.shape[1])]
        candidates["larger of the two flows, standardised (parts: flows)"] = np.maximum(map_whole, coarse_whole)
        candidates["mean of the two standardised"] = (map_whole + coarse_whole) / 2
        candidates["score flow per-position (training) top 1 %"] = top_mean(standardised_per_position(coarse, score_flow_maps(model, trained)), 0.01)
        candidates["largest of map-flow scales and the score flow, standardised (parts: scales)"] = np.max([*map_each, coarse_whole], axis=0)
        candidates["largest of every scale of both flows, standardised"] = np.max([*map_each, *coarse_each], axis=0)
        # Per-position parts: each part's maps standardised per position (shrunk) on the training images first.
        trained_per_scale, trained_coarse = scale_maps(model, trained), score_flow_maps(model, trained)

        def every_part_per_position(share: float = 0.01, smooth: bool = False, combine=np.max, **shrink: bool) -> np.ndarray:
            parts = [(per_scale[:, i], stopping_per_scale[:, i], trained_per_scale[:, i]) for i in range(per_scale.shape[1])]
            parts.append((coarse, stopping_coarse.mean(axis=1), trained_coarse))

            def raw(maps: np.ndarray, trained: np.ndarray) -> np.ndarray:
                standard = shrunk_per_position(maps, trained, **shrink)
                if smooth:
                    side = standard.shape[-1]
                    standard = display_map(torch.from_numpy(standard.astype(np.float32)), (side, side)).numpy()
                return top_mean(standard, share)

            return combine([standardised_on(raw(test, trained), raw(stop, trained)) for test, stop, trained in parts], axis=0)

        coarse_pp = standardised_on(
            top_mean(shrunk_per_position(coarse, trained_coarse), 0.01),
            top_mean(shrunk_per_position(stopping_coarse.mean(axis=1), trained_coarse), 0.01),
        )
        every_part = every_part_per_position()
        candidates["(e) every part per position (shrunk, training), standardised (uflow's score where not aligned)"] = every_part
        # How far (e) trusts each position's own centre: 0 is a global standardisation, 1 a fully per-position one.
        weights = [round(centre_weight(trained_per_scale[:, i]), 2) for i in range(per_scale.shape[1])]
        weights.append(round(centre_weight(trained_coarse), 2))
        candidates["(f) parts: scales, the score flow per position (shrunk, training)"] = np.max([*map_each, coarse_pp], axis=0)
        candidates["(g) as (e), the variance not shrunk"] = every_part_per_position(shrink_variance=False)
        candidates["(h) as (e), nothing shrunk"] = every_part_per_position(shrink_centre=False, shrink_variance=False)
        trained_whole = trained_per_scale.mean(axis=1)
        whole_weight = centre_weight(trained_whole)  # what chooses uflow's parts (uflow.anomaly_map.parts_for)
        aligned = whole_weight >= ALIGNED_WEIGHT
        whole_pp = top_mean(shrunk_per_position(maps, trained_whole), 0.01)
        whole_part = standardised_on(whole_pp, top_mean(shrunk_per_position(stopping, trained_whole), 0.01))
        candidates["(i) the two flows' whole maps per position (shrunk), the larger (uflow's score on aligned parts before (u))"] = np.maximum(whole_part, coarse_pp)
        candidates["(j) the map flow's whole map per position (shrunk) alone"] = whole_pp
        flows_mean = (whole_part + coarse_pp) / 2
        candidates["(t) (e) or (i) as the run chose, the parts' mean instead of the largest"] = (
            flows_mean if aligned else every_part_per_position(combine=np.mean)
        )
        candidates["(u) as (t) for runs that chose (i); (e) unchanged (uflow's score)"] = flows_mean if aligned else every_part
        candidates["(k) (e)'s parts and the map flow's whole map per position, the largest"] = np.maximum(every_part, whole_part)
        candidates["(l) as (e), each part's top 5 %"] = every_part_per_position(share=0.05)
        candidates["(m) as (e), each part's standardised map smoothed first"] = every_part_per_position(smooth=True)
        size = model.image_size
        (test_map, test_score), (stop_map, stop_score), (train_map, train_score) = (
            latents_per_scale(model, group) for group in ([it.path for it in items], stopping_paths, trained)
        )

        def latent_part(groups: list[np.ndarray], train: list[np.ndarray]) -> np.ndarray:
            return np.mean([mahalanobis_per_position(z, t, size) for z, t in zip(groups, train)], axis=0)

        latent_parts = [(latent_part([test_map[i]], [train_map[i]]), latent_part([stop_map[i]], [train_map[i]])) for i in range(len(train_map))]
        latent_parts.append((latent_part(test_score, train_score), latent_part(stop_score, train_score)))
        candidates["(n) as (e), each part the latents' Mahalanobis distance per position (shrunk)"] = np.max(
            [standardised_on(top_mean(test, 0.01), top_mean(stop, 0.01)) for test, stop in latent_parts], axis=0
        )
    row = {"run": str(args.run_dir), "category": args.category.name, **{k: round(100 * image_auroc(v, anomalous), 2) for k, v in candidates.items()}}
    if model.score_flow is not None:
        row["(e)'s centre weight per part, mean over positions"] = weights
        # "flows", i.e. (i) (or (u) since the aligned runs' mean), from ALIGNED_WEIGHT on, else (e).
        row["the whole map's centre weight"] = round(whole_weight, 3)
    print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
