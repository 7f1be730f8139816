"""Phase 4: a contrario segmentation, the threshold that needs no anomalous examples.

Under normality every latent element is an independent N(0, 1), so the
per-pixel statistic S = sum_c z_c^2 at a scale with C channels is chi-square
with C degrees of freedom. Candidate regions are the nodes of the max-tree of
S (connected components, 4-connectivity, of its upper level sets). A region R
whose smallest statistic is m has probability P(R) = P(chi2_C >= m)^|R| under
normality, computed with the exact survival function in log space (the
reference code's Chernoff bound is no bound at all when m <= C and flags whole
images whose latents are slightly too small). A region is detected when its
Number of False Alarms, NFA = N_tests * P(R), is below epsilon.

Tree simplification follows the paper: in every leaf branch keep only the node
with the smallest NFA; then, bottom-up, a node whose children are all leaves
replaces them when its NFA is no larger than theirs. The survivors (leaves) are
the detections.

Everything on the tree is vectorised: the max-tree and subtree areas come from
scikit-image's compiled code, and every other quantity (leaf counts, branch
minima, the "all descendants merge" test, region pixels, bounding boxes) is a
prefix sum or segment reduction over a depth-first order of the tree, which is
itself built by pointer jumping in O(N log depth) numpy operations.

Number of tests. ``"paper"``: N_T = sum_s N_s sum_{r=1..N_s} alpha beta^r / r
(alpha beta^r / r is the asymptotic number of polyominoes of size r), one
constant for every region. It grows as 0.61 N_s decades per scale (about 3,300
decades for 64x64 + 32x32 + 16x16), so only enormous, extreme regions can beat
it. ``"per_size"`` (default) spends epsilon evenly over scales and region
sizes instead: a region of size r at scale s is one of at most
N_s alpha beta^r / r connected sets of that size, and there are L scales and
N_s sizes, so N_T(s, r) = L * N_s * N_s * alpha * beta^r / r. The union bound
still gives at most epsilon false detections per image on average, and small
regions pay only for the shapes of their own size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
from scipy.special import gammaincc, gammaln, logsumexp
from skimage.morphology import max_tree

try:
    # scikit-image's compiled union-find and subtree areas, which its public
    # max_tree() and area_opening() wrap. Called directly because the public
    # wrapper bounds-checks every border pixel through Python (about 3.5 ms of
    # its 3.7 ms on a 64x64 map); padding the map by one pixel and passing only
    # the interior pixels as the processing order needs no bounds checks and
    # builds the same tree (checked against max_tree() in the tests).
    from skimage.morphology._max_tree import _compute_area, _max_tree
except ImportError:  # pragma: no cover - only if scikit-image reorganises its internals
    _compute_area = _max_tree = None

TestCount = Literal["per_size", "paper"]
TEST_COUNTS: tuple[str, ...] = ("per_size", "paper")

POLYOMINO_ALPHA = 0.316915
POLYOMINO_BETA = 4.062570
_LN10 = math.log(10.0)


@dataclass(frozen=True)
class Region:
    """A detected region, in output-image pixels."""

    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive)
    area: int
    log10_nfa: float
    scale: int  # index of the latent scale it came from, 0 = finest

    def to_dict(self) -> dict:
        return {"bbox": list(self.bbox), "area": self.area, "log10_nfa": round(self.log10_nfa, 4), "scale": self.scale}


@dataclass
class Segmentation:
    """Per-image output: log10 NFA map (inf where no candidate region covers), mask and regions."""

    log10_nfa: np.ndarray
    mask: np.ndarray
    regions: list[Region] = field(default_factory=list)


# --------------------------------------------------------------------------- statistics


def chi2_log_sf(x: np.ndarray, dof: int) -> np.ndarray:
    """Natural log of P(chi2_dof >= x), exact and finite far into the tail.

    scipy gives the regularised upper incomplete gamma Q(dof/2, x/2) but not its
    logarithm, and Q underflows to 0 around 1e-308; there the logarithm is taken
    from Legendre's continued fraction for Gamma(a, x), evaluated in numpy.
    """
    x = np.asarray(x, dtype=np.float64)
    a = 0.5 * dof
    half = 0.5 * np.maximum(x, 0.0)
    q = gammaincc(a, half)
    with np.errstate(divide="ignore"):
        out = np.log(q)
    tiny = q < 1e-300
    if np.any(tiny):
        out[tiny] = _log_upper_gamma_cf(a, half[tiny])
    return out


def _log_upper_gamma_cf(a: float, x: np.ndarray, iterations: int = 200) -> np.ndarray:
    """log Q(a, x) by modified Lentz on the continued fraction; valid for x > a + 1 (where Q is tiny)."""
    eps = 1e-300
    b = x + 1.0 - a
    c = np.full_like(x, 1.0 / eps)
    d = 1.0 / b
    h = d.copy()
    for i in range(1, iterations + 1):
        an = -i * (i - a)
        b = b + 2.0
        d = an * d + b
        d = np.where(np.abs(d) < eps, eps, d)
        c = b + an / c
        c = np.where(np.abs(c) < eps, eps, c)
        d = 1.0 / d
        delta = d * c
        h = h * delta
        if np.all(np.abs(delta - 1.0) < 1e-15):
            break
    return -x + a * np.log(x) - gammaln(a) + np.log(h)


def log10_paper_test_count(grid_sizes: Sequence[tuple[int, int]]) -> float:
    """log10 of the paper's N_T = sum_s N_s sum_{r<=N_s} alpha beta^r / r, computed in log space."""
    terms = []
    for h, w in grid_sizes:
        n = h * w
        r = np.arange(1, n + 1, dtype=np.float64)
        terms.append(math.log(n) + math.log(POLYOMINO_ALPHA) + logsumexp(r * math.log(POLYOMINO_BETA) - np.log(r)))
    return float(logsumexp(terms)) / _LN10


def log10_test_count(area: np.ndarray, n_pixels: int, n_scales: int, mode: TestCount, paper_log10: float) -> np.ndarray:
    """log10 N_T for regions of the given areas at a scale of ``n_pixels`` pixels."""
    if mode == "paper":
        return np.full(area.shape, paper_log10)
    return (
        math.log10(n_scales) + 2 * math.log10(n_pixels) + math.log10(POLYOMINO_ALPHA)
        + area * math.log10(POLYOMINO_BETA) - np.log10(area)
    )


def correlation_area(stat_maps: np.ndarray, radius: int = 3) -> float:
    """Pixels per independent sample of a stationary field, from maps of normal images (N, H, W).

    The a contrario probability P(R) = sf(m)^|R| assumes the |R| pixels of a
    region are independent. A trained flow's statistic maps are not: the
    backbone's receptive fields overlap, so neighbours are correlated and a
    region of |R| pixels carries about |R| / k independent observations, where
    k = sum over lags of the autocorrelation (the variance inflation of a mean
    over a correlated field). Lags are summed within ``radius`` pixels, where
    the correlation has decayed on every backbone measured; k is at least 1.
    """
    x = np.asarray(stat_maps, dtype=np.float64)
    n, h, w = x.shape
    x = x - x.mean()
    scale = x.std()
    if not np.isfinite(scale) or scale == 0:
        return 1.0
    x = x / scale
    spectrum = np.fft.rfft2(x, s=(2 * h, 2 * w))
    autocov = np.fft.irfft2(spectrum * np.conj(spectrum), s=(2 * h, 2 * w)).sum(axis=0)
    dy, dx = np.r_[0:h, -h:0], np.r_[0:w, -w:0]
    pairs = (h - np.abs(dy))[:, None] * (w - np.abs(dx))[None, :]
    rho = autocov / (n * np.maximum(pairs, 1))
    window = (np.abs(dy)[:, None] <= radius) & (np.abs(dx)[None, :] <= radius)
    return max(1.0, float(rho[window].sum()))


# --------------------------------------------------------------------------- one scale, one image


@dataclass
class _ScaleDetections:
    log10_nfa: np.ndarray  # (k,)
    starts: np.ndarray  # (k,) start of each region in depth-first order
    sizes: np.ndarray  # (k,) pixels per region
    order: np.ndarray  # (N,) pixel indices in depth-first order


def build_max_tree(stat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Max-tree of a 2-D map, 4-connectivity: (parent, traverser, subtree area), flat indices of ``stat``.

    ``traverser`` lists pixels parents-first (its first entry is the root); the
    parent of every pixel is the canonical pixel of its component or of the
    next lower one, as in :func:`skimage.morphology.max_tree`.
    """
    h, w = stat.shape
    values = np.ascontiguousarray(stat, dtype=np.float64)
    if _max_tree is None:  # pragma: no cover
        parent, traverser = max_tree(values, connectivity=1)
        parent, traverser = parent.ravel(), traverser.astype(np.int64)
        area = np.ones(values.size, dtype=np.int64)
        for p in traverser[:0:-1]:
            area[parent[p]] += area[p]
        return parent, traverser, area
    padded = np.zeros((h + 2, w + 2), dtype=np.float64)
    padded[1:-1, 1:-1] = values
    interior = ((np.arange(h)[:, None] + 1) * (w + 2) + np.arange(w)[None, :] + 1).ravel()
    order = interior[np.argsort(values.ravel(), kind="stable")]
    parent_padded = np.empty(padded.size, dtype=np.int64)
    offsets = np.array([-(w + 2), -1, 1, w + 2], dtype=np.int32)
    center = np.array([1, 1], dtype=np.int32)  # centre of the 3x3 connectivity structure
    _max_tree(padded.ravel(), np.ones(padded.size, dtype=np.uint8), offsets, center, np.array(padded.shape, dtype=np.int32), parent_padded, order)
    area_padded = _compute_area(padded.ravel(), parent_padded, order)
    to_original = np.full(padded.size, -1, dtype=np.int64)
    to_original[interior] = np.arange(h * w)
    return to_original[parent_padded[interior]], to_original[order], area_padded[interior].astype(np.int64)


def _depth_first_order(parent: np.ndarray, root: int, size: np.ndarray) -> np.ndarray:
    """Pre-order position of every pixel, children laid out after their parent, siblings in index order.

    pos(n) = pos(parent) + 1 + sizes of the earlier siblings, a sum over the
    path to the root, computed by pointer jumping.
    """
    n = parent.size
    idx = np.arange(n)
    nonroot = idx[idx != root]
    by_parent = nonroot[np.argsort(parent[nonroot], kind="stable")]
    sib_sizes = size[by_parent]
    csum = np.cumsum(sib_sizes)
    group_start = np.r_[True, parent[by_parent][1:] != parent[by_parent][:-1]]
    start_csum = np.maximum.accumulate(np.where(group_start, csum - sib_sizes, 0))
    step = np.zeros(n, dtype=np.int64)
    step[by_parent] = 1 + (csum - sib_sizes - start_csum)
    jump = parent.copy()
    while True:
        pending = jump != root
        if not pending.any():
            break
        step = step + np.where(pending, step[jump], 0)
        jump = np.where(pending, jump[jump], root)
    return step


def _detect_one(
    stat: np.ndarray, dof: float, n_scales: int, mode: TestCount, paper_log10: float, pixels_per_sample: float = 1.0
) -> _ScaleDetections:
    values = np.ascontiguousarray(stat, dtype=np.float64).ravel()
    n = values.size
    parent, traverser, area = build_max_tree(stat)
    root = int(traverser[0])
    idx = np.arange(n)
    canonical = (values[parent] != values) | (idx == root)

    pos = _depth_first_order(parent, root, np.where(canonical, area, 1))
    order = np.empty(n, dtype=np.int64)
    order[pos] = idx
    end = pos + np.where(canonical, area, 1)

    def subtree_sum(weights: np.ndarray) -> np.ndarray:
        csum = np.r_[0, np.cumsum(weights[order])]
        return csum[end] - csum[pos]

    log_p = np.where(canonical, (area / pixels_per_sample) * chi2_log_sf(values, dof), np.inf)
    log10_nfa = np.where(
        canonical, log10_test_count(area, n, n_scales, mode, paper_log10) + log_p / _LN10, np.inf
    )

    child_node = canonical & (idx != root)
    n_children = np.bincount(parent[child_node], minlength=n)
    is_leaf = canonical & (n_children == 0)
    leaves_below = subtree_sum(is_leaf.astype(np.int64))
    in_branch = canonical & (leaves_below == 1)
    branch_top = in_branch & ((idx == root) | ~in_branch[parent])

    # Branch minimum: each branch is one contiguous block of the depth-first order.
    tops = idx[branch_top]
    tops = tops[np.argsort(pos[tops])]
    nfa_in_order = np.r_[log10_nfa[order], np.inf]
    bounds = np.empty(2 * tops.size, dtype=np.int64)
    bounds[0::2], bounds[1::2] = pos[tops], end[tops]
    branch_min = np.minimum.reduceat(nfa_in_order, bounds)[0::2] if tops.size else np.empty(0)
    branch_of = np.searchsorted(pos[tops], pos, side="right") - 1
    is_kept = in_branch & (log10_nfa == branch_min[branch_of])
    kept_branch, first = np.unique(branch_of[is_kept], return_index=True)
    kept = idx[is_kept][first]  # the highest node reaching the branch minimum
    kept_of_branch = np.empty(tops.size, dtype=np.int64)
    kept_of_branch[kept_branch] = kept

    # Bottom-up merging: an internal node absorbs its subtree iff it and every
    # internal node below it are no worse than their (simplified) children.
    internal = canonical & ~in_branch
    child_value = np.where(branch_top, 0.0, log10_nfa)
    child_value[tops] = branch_min
    min_child = np.full(n, np.inf)
    counted = (internal | branch_top) & (idx != root)
    np.minimum.at(min_child, parent[counted], child_value[counted])
    local = internal & (log10_nfa <= min_child)
    blockers_below = subtree_sum((internal & ~local).astype(np.int64))
    absorbed = internal & local & (blockers_below == 0)
    parent_absorbed = np.where(idx == root, False, absorbed[parent])
    detections = [idx[absorbed & ~parent_absorbed]]
    top_parent_absorbed = np.where(tops == root, False, absorbed[parent[tops]])
    detections.append(kept_of_branch[~top_parent_absorbed])
    detected = np.concatenate(detections)
    return _ScaleDetections(log10_nfa[detected], pos[detected], end[detected] - pos[detected], order)


# --------------------------------------------------------------------------- batch


def _nearest_index(out_len: int, in_len: int) -> np.ndarray:
    return (np.arange(out_len) * in_len) // out_len


def segment(
    chi2_maps: Sequence[np.ndarray],
    channels: Sequence[int],
    output_sizes: Sequence[tuple[int, int]],
    epsilon: float = 1.0,
    test_count: TestCount = "per_size",
    pixels_per_sample: Sequence[float] | None = None,
) -> list[Segmentation]:
    """A contrario segmentation of a batch.

    ``chi2_maps[l]`` is (B, H_l, W_l): sum over the C_l = ``channels[l]`` latent
    channels of z^2. ``pixels_per_sample[l]`` (default 1: independent pixels)
    divides each region's size when its probability is computed; see
    :func:`correlation_area`. Returns, per image, the log10 NFA map at its output size
    (each scale upsampled by nearest neighbour, minimum over scales), the mask
    log10 NFA < log10 epsilon, and the detected regions sorted by NFA.
    """
    if epsilon <= 0:
        raise ValueError("epsilon must be positive")
    if test_count not in TEST_COUNTS:
        raise ValueError(f"test_count must be one of {TEST_COUNTS}")
    grids = [m.shape[1:] for m in chi2_maps]
    paper_log10 = log10_paper_test_count(grids) if test_count == "paper" else 0.0
    log_eps = math.log10(epsilon)
    results = []
    for b, (out_h, out_w) in enumerate(output_sizes):
        nfa_map = np.full((out_h, out_w), np.inf, dtype=np.float32)
        regions: list[Region] = []
        for level, (maps, dof) in enumerate(zip(chi2_maps, channels)):
            h, w = maps.shape[1:]
            found = _detect_one(np.asarray(maps[b]), dof, len(chi2_maps), test_count, paper_log10, 1.0 if pixels_per_sample is None else pixels_per_sample[level])
            grid = np.full(h * w, np.inf, dtype=np.float32)
            if found.sizes.size:
                offsets = np.repeat(found.starts - np.r_[0, np.cumsum(found.sizes)[:-1]], found.sizes)
                pixels = found.order[np.arange(found.sizes.sum()) + offsets]
                grid[pixels] = np.repeat(found.log10_nfa, found.sizes)
                regions.extend(_regions(found, pixels, level, (h, w), (out_h, out_w), log_eps))
            rows, cols = _nearest_index(out_h, h), _nearest_index(out_w, w)
            np.minimum(nfa_map, grid.reshape(h, w)[rows][:, cols], out=nfa_map)
        regions.sort(key=lambda r: r.log10_nfa)
        results.append(Segmentation(nfa_map, nfa_map < log_eps, regions))
    return results


def _regions(
    found: _ScaleDetections, pixels: np.ndarray, level: int, grid: tuple[int, int], out: tuple[int, int], log_eps: float
) -> list[Region]:
    significant = found.log10_nfa < log_eps
    if not significant.any():
        return []
    (h, w), (out_h, out_w) = grid, out
    rows_of, cols_of = _nearest_index(out_h, h), _nearest_index(out_w, w)
    row_count = np.bincount(rows_of, minlength=h)
    col_count = np.bincount(cols_of, minlength=w)
    row_first = np.searchsorted(rows_of, np.arange(h))
    col_first = np.searchsorted(cols_of, np.arange(w))
    r, c = pixels // w, pixels % w
    seg = np.r_[0, np.cumsum(found.sizes)[:-1]]
    r0, r1 = np.minimum.reduceat(r, seg), np.maximum.reduceat(r, seg)
    c0, c1 = np.minimum.reduceat(c, seg), np.maximum.reduceat(c, seg)
    area = np.add.reduceat(row_count[r] * col_count[c], seg)
    out_regions = []
    for k in np.flatnonzero(significant):
        out_regions.append(
            Region(
                bbox=(int(col_first[c0[k]]), int(row_first[r0[k]]), int(col_first[c1[k]] + col_count[c1[k]]), int(row_first[r1[k]] + row_count[r1[k]])),
                area=int(area[k]),
                log10_nfa=float(found.log10_nfa[k]),
                scale=level,
            )
        )
    return out_regions
