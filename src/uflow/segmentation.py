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

Tree simplification is the paper's (the authors' iterative prune / merge,
computed here in closed form, see :func:`simplify_tree`): in every leaf branch
keep only the node with the smallest NFA; merge a bifurcation whose children
are all leaves when its NFA is no larger than theirs; repeat; prune once more.
Ties: a branch keeps its node nearest the root, a bifurcation equal to its best
child merges. The surviving leaves are the candidate detections; a test
compares them with a plain node-by-node implementation on hundreds of maps.

Everything on the tree is vectorised: the max-tree and subtree areas come from
scikit-image's compiled code, and every other quantity (arms, their minima,
the "every bifurcation below merges" test, region pixels) is a prefix sum or
segment reduction over a depth-first order of the tree, which is itself built
by pointer jumping in O(N log depth) numpy operations.

Each scale's leaves are brought to the image size so that thresholding gives
the masks bilinear upsampling gives (:func:`upsample_for_threshold`), not
blocks of the scale's stride.

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

import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import numpy as np
from scipy import ndimage
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
    # Whether the image is flagged: it has a detection, or it was flagged on other grounds (keep_most_significant in segment).
    flagged: bool = False


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


# --------------------------------------------------------------------------- the paper's tree, one map


@dataclass
class Leaves:
    """Surviving leaves of the simplified tree of one map: regions, each a contiguous run of ``order``."""

    log10_nfa: np.ndarray  # (k,)
    starts: np.ndarray  # (k,) start of each region in ``order``
    sizes: np.ndarray  # (k,) pixels per region
    order: np.ndarray  # (N,) flat pixel indices in depth-first order of the max-tree

    def pixel_runs(self) -> tuple[np.ndarray, np.ndarray]:
        """(flat pixel indices of every leaf, one after the other; leaf number of each)."""
        offsets = np.repeat(self.starts - np.r_[0, np.cumsum(self.sizes)[:-1]], self.sizes)
        return self.order[np.arange(self.sizes.sum()) + offsets], np.repeat(np.arange(self.sizes.size), self.sizes)


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


NodeNFA = Callable[[np.ndarray, np.ndarray], np.ndarray]


def simplify_tree(stat: np.ndarray, node_log10_nfa: NodeNFA) -> Leaves:
    """The paper's simplification of the max-tree of ``stat``, vectorised; returns every surviving leaf.

    Nodes are the distinct pixel sets of the max-tree (4-connectivity); a
    node's level is its smallest value, its area its pixel count, and
    ``node_log10_nfa(levels, areas)`` gives their log10 NFA. The authors'
    procedure is iterative: prune every leaf branch (a leaf and the chain of
    only children above it) to its best node; merge each bifurcation whose
    children are all leaves into a leaf when its NFA is no larger than the
    smallest of theirs; repeat until nothing merges; prune once more.

    Its fixed point has a closed form, computed here in one pass. Call an
    *arm* a node whose parent is a bifurcation (or the root) together with
    the chain of only children below it, down to a leaf or a bifurcation.
    Arms are what the pruning collapses: a leaf branch is an arm, and so is
    the new leaf branch above a merged bifurcation. An arm collapses into its
    best node iff every bifurcation b in its subtree merges, and b merges iff
    NFA(b) <= the best NFA of each arm below it (those arms have collapsed
    first). The survivors are the best nodes of collapsed arms whose parent
    arm did not collapse. Ties, as the reference: within an arm the node
    closest to the root (the largest region) is kept; a bifurcation equal to
    its best child merges.
    """
    values = np.ascontiguousarray(stat, dtype=np.float64).ravel()
    n = values.size
    parent, traverser, area = build_max_tree(np.asarray(stat))
    root = int(traverser[0])
    canonical = values[parent] != values
    canonical[root] = True
    extent = np.where(canonical, area, 1)
    pos = _depth_first_order(parent, root, extent)
    order = np.empty(n, dtype=np.int64)
    order[pos] = np.arange(n)

    # Nodes in depth-first order (the root first), so every subtree and every arm is a contiguous run.
    nodes = order[canonical[order]]
    m = nodes.size
    node_of = np.empty(n, dtype=np.int64)
    node_of[nodes] = np.arange(m)
    up = node_of[parent[nodes]]  # parent node; up[0] (the root's) is meaningless
    nfa = np.asarray(node_log10_nfa(values[nodes], area[nodes]), dtype=np.float64)
    n_children = np.bincount(up[1:], minlength=m)
    bifurcation = n_children >= 2
    arm_top = np.r_[True, bifurcation[up[1:]]]
    tops = np.flatnonzero(arm_top)
    arm = np.cumsum(arm_top) - 1
    arm_best = np.minimum.reduceat(nfa, tops)
    at_best = np.flatnonzero(nfa == arm_best[arm])
    best_node = at_best[np.r_[True, arm[at_best][1:] != arm[at_best][:-1]]]  # first in the run: nearest the root

    child_tops = tops[1:]
    best_child = np.full(m, np.inf)
    np.minimum.at(best_child, up[child_tops], arm_best[1:])
    blocks = np.r_[0, np.cumsum(bifurcation & (nfa > best_child))]
    subtree_end = np.searchsorted(pos[nodes], pos[nodes] + extent[nodes])  # in node order
    collapses = blocks[subtree_end[tops]] == blocks[tops]
    survives = collapses & np.r_[True, ~collapses[arm[up[child_tops]]]]
    kept = nodes[best_node[survives]]
    return Leaves(nfa[best_node[survives]], pos[kept], area[kept], order)


def node_nfa(dof: float, n_pixels: int, n_scales: int, test_count: TestCount, paper_log10: float, pixels_per_sample: float = 1.0) -> NodeNFA:
    """log10 NFA of max-tree nodes of a chi-square map: log10 N_T(area) + (area / k) log10 P(chi2_dof >= level)."""

    def log10_nfa(levels: np.ndarray, areas: np.ndarray) -> np.ndarray:
        areas = np.asarray(areas, dtype=np.float64)
        log_p = (areas / pixels_per_sample) * chi2_log_sf(levels, dof)
        return log10_test_count(areas, n_pixels, n_scales, test_count, paper_log10) + log_p / _LN10

    return log10_nfa


# --------------------------------------------------------------------------- to image size


def _bilinear_source(out_len: int, in_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output index: the lower of its two source samples in the edge-padded input, and the weight of the upper one.

    Half-pixel centres (align_corners=False), as torch's and the paper's bilinear upsampling.
    """
    s = (np.arange(out_len) + 0.5) * (in_len / out_len) - 0.5
    low = np.floor(s)
    return (np.clip(low, -1, in_len - 1) + 1).astype(np.int64), np.clip(s - low, 0.0, 1.0)


_BITS = (np.arange(16)[:, None] >> np.arange(4)[None, :]) & 1  # corner j is in subset s
_POPCOUNT = _BITS.sum(axis=1)


def _order_code(corners: Sequence[np.ndarray]) -> np.ndarray:
    """How four values are ordered, as a 16-bit code: bit 4k + j says corner j is no larger than corner k."""
    code = np.zeros(np.shape(corners[0]), dtype=np.int64)
    for k, ck in enumerate(corners):
        for j, cj in enumerate(corners):
            code |= (cj <= ck).astype(np.int64) << (4 * k + j)
    return code


# The 75 ways four values can be ordered (ties included), and each code's number among them.
_ORDERS = np.unique(_order_code(list(np.stack(np.meshgrid(*[np.arange(4)] * 4, indexing="ij")).reshape(4, -1))))
_ORDER_NUMBER = np.full(1 << 16, -1, dtype=np.int64)
_ORDER_NUMBER[_ORDERS] = np.arange(_ORDERS.size)


def _bilinear_weights(wy: np.ndarray, wx: np.ndarray) -> np.ndarray:
    """Weights of the corners (top left, top right, bottom left, bottom right), stacked on a last axis."""
    return np.stack([(1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx], axis=-1)


def _median_corner(orders: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Which corner is the bilinear-weighted lower median, for orderings (numbers into the 75) and corner weights.

    Corner k qualifies when the corners no larger than it weigh more than one
    half; the answer is the qualifying corner with the smallest value (the
    fewest corners no larger). ``orders`` (...) and ``weights`` (..., 4) broadcast.
    """
    sets = (_ORDERS[orders][..., None] >> (4 * np.arange(4))) & 15  # (..., 4): corners no larger than each corner
    mass = (_BITS[sets] * weights[..., None, :]).sum(axis=-1)
    rank = np.where(mass > 0.5, _POPCOUNT[sets], 5)
    return rank.argmin(axis=-1).astype(np.int8)


@functools.lru_cache(maxsize=32)
def _upsampling_plan(h: int, w: int, out_h: int, out_w: int) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, int] | np.ndarray]:
    """Per output pixel its 2x2 source block; then (table of medians per ordering and phase, phase per pixel,
    number of phases) when the table is smaller than the image, else the corner weights per pixel."""
    rows, wy = _bilinear_source(out_h, h)
    cols, wx = _bilinear_source(out_w, w)
    wy_levels, row_phase = np.unique(wy, return_inverse=True)
    wx_levels, col_phase = np.unique(wx, return_inverse=True)
    block = rows[:, None] * (w + 1) + cols[None, :]
    if _ORDERS.size * wy_levels.size * wx_levels.size <= out_h * out_w:  # integer strides: a few phases
        weights = _bilinear_weights(wy_levels[:, None], wx_levels[None, :])
        table = _median_corner(np.arange(_ORDERS.size)[:, None, None], weights[None])  # (75, phases y, phases x)
        phase = row_phase[:, None] * wx_levels.size + col_phase[None, :]
        return block, (table.ravel(), phase, wy_levels.size * wx_levels.size)
    return block, _bilinear_weights(wy[:, None], wx[None, :])


def upsample_for_threshold(grid: np.ndarray, out: tuple[int, int], labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Bring a map of region values to ``out`` so that every threshold gives a smooth mask.

    Thresholding a nearest-neighbour upsampling draws masks in blocks of the
    scale's stride (16 output pixels at the coarsest scale). Here the value of
    an output pixel is the bilinear-weighted lower median of its four source
    samples: for every t at once, ``result < t`` is exactly the bilinear
    upsampling of the mask ``grid < t`` thresholded at one half, so masks have
    the outlines bilinear interpolation gives and the oracle threshold sweep
    sees the same masks as the automatic threshold. Returns the values and,
    when ``labels`` (same shape as ``grid``) is given, the label of the sample
    each output pixel took its value from.

    Written by hand for speed: the median depends only on how the four values
    are ordered (one of 75 orderings) and on the pixel's two weights (its
    phase: one per output pixel of a source stride), so for integer strides
    it is tabulated once per map and output size and read per pixel.
    """
    h, w = grid.shape
    block, how = _upsampling_plan(h, w, out[0], out[1])
    padded = np.pad(grid, 1, mode="edge")
    corners = [padded[:-1, :-1].ravel(), padded[:-1, 1:].ravel(), padded[1:, :-1].ravel(), padded[1:, 1:].ravel()]
    block_order = _ORDER_NUMBER[_order_code(corners)][block]
    if isinstance(how, tuple):
        table, phase, n_phases = how
        pick = table[block_order * n_phases + phase]
    else:  # as many phases as pixels (a size that is no multiple of the map's): computed per pixel
        pick = _median_corner(block_order, how)
    flat = block * 4 + pick
    values = np.stack(corners, axis=1).ravel()[flat]
    if labels is None:
        return values, None
    padded = np.pad(labels, 1, mode="edge")
    return values, np.stack([padded[:-1, :-1].ravel(), padded[:-1, 1:].ravel(), padded[1:, :-1].ravel(), padded[1:, 1:].ravel()], axis=1).ravel()[flat]


# --------------------------------------------------------------------------- batch


def segment(
    chi2_maps: Sequence[np.ndarray],
    channels: Sequence[float],
    output_sizes: Sequence[tuple[int, int]],
    log10_epsilon: float | Sequence[float] = 0.0,
    test_count: TestCount = "per_size",
    pixels_per_sample: Sequence[float] | None = None,
    keep_most_significant: Sequence[bool] | None = None,
) -> list[Segmentation]:
    """A contrario segmentation of a batch.

    ``chi2_maps[l]`` is (B, H_l, W_l): sum over the C_l = ``channels[l]`` latent
    channels of z^2. ``pixels_per_sample[l]`` (default 1: independent pixels)
    divides each region's size when its probability is computed; see
    :func:`correlation_area`. Returns, per image, the log10 NFA map at its
    output size (each scale's surviving leaves brought to that size by
    :func:`upsample_for_threshold`, then the minimum over scales; inf where no
    leaf covers), the mask of the leaves with ``log10 NFA < log10_epsilon``
    (equal to thresholding that map, up to its float32 rounding) and those
    leaves as regions, sorted by NFA.

    ``log10_epsilon`` may be one threshold per image (-inf: no detection).
    Where ``keep_most_significant`` is true and no leaf of the image is below
    its threshold, the image's most significant leaf (and any tied with it)
    is its detection: an image flagged on other grounds still shows where.
    """
    batch = len(output_sizes)
    thresholds = np.broadcast_to(np.asarray(log10_epsilon, dtype=np.float64), (batch,))
    if np.isnan(thresholds).any():
        raise ValueError("log10 epsilon must be a number")
    keep = np.zeros(batch, dtype=bool) if keep_most_significant is None else np.asarray(keep_most_significant, dtype=bool)
    scorers = _scorers(chi2_maps, channels, test_count, pixels_per_sample)
    results = []
    for b, out in enumerate(output_sizes):
        per_level = [simplify_tree(np.asarray(maps[b]), scorer) for maps, scorer in zip(chi2_maps, scorers)]
        threshold = thresholds[b]
        smallest = min(float(leaves.log10_nfa.min()) for leaves in per_level)
        if keep[b] and not smallest < threshold:
            threshold = np.nextafter(smallest, np.inf)
        nfa_map = np.full(out, np.inf, dtype=np.float32)
        mask = np.zeros(out, dtype=bool)
        regions: list[Region] = []
        for level, (maps, leaves) in enumerate(zip(chi2_maps, per_level)):
            pixels, leaf = leaves.pixel_runs()
            grid = np.full(maps.shape[1] * maps.shape[2], np.inf, dtype=np.float32)
            grid[pixels] = leaves.log10_nfa[leaf]
            significant = leaves.log10_nfa < threshold
            labels = None
            if significant.any():  # region k is label numbers[k], 0 elsewhere
                numbers = np.cumsum(significant)
                labels = np.zeros(grid.size, dtype=np.int32)
                labels[pixels] = np.where(significant[leaf], numbers[leaf], 0)
                labels = labels.reshape(maps.shape[1:])
            values, upsampled = upsample_for_threshold(grid.reshape(maps.shape[1:]), out, labels)
            np.minimum(nfa_map, values, out=nfa_map)
            if upsampled is not None:
                mask |= upsampled > 0  # decided in float64, so mask and regions agree at the threshold itself
                regions.extend(_regions(leaves.log10_nfa[significant], upsampled, level))
        regions.sort(key=lambda r: r.log10_nfa)
        # A kept leaf can cover no output pixel when the image is smaller than the latent grid; the image stays flagged.
        results.append(Segmentation(nfa_map, mask, regions, bool(regions) or bool(keep[b])))
    return results


def smallest_log10_nfa(
    chi2_maps: Sequence[np.ndarray], channels: Sequence[float], test_count: TestCount = "per_size", pixels_per_sample: Sequence[float] | None = None
) -> np.ndarray:
    """Per image of a batch, the smallest log10 NFA among the surviving leaves of every scale.

    An image has a detection at threshold t iff this is below t; arguments as :func:`segment`.
    """
    scorers = _scorers(chi2_maps, channels, test_count, pixels_per_sample)
    batch = len(chi2_maps[0])
    return np.array([min(float(simplify_tree(np.asarray(maps[b]), f).log10_nfa.min()) for maps, f in zip(chi2_maps, scorers)) for b in range(batch)])


def _scorers(chi2_maps: Sequence[np.ndarray], channels: Sequence[float], test_count: TestCount, pixels_per_sample: Sequence[float] | None) -> list[NodeNFA]:
    if test_count not in TEST_COUNTS:
        raise ValueError(f"test_count must be one of {TEST_COUNTS}")
    grids = [m.shape[1:] for m in chi2_maps]
    paper_log10 = log10_paper_test_count(grids) if test_count == "paper" else 0.0
    return [
        node_nfa(dof, h * w, len(grids), test_count, paper_log10, 1.0 if pixels_per_sample is None else pixels_per_sample[level])
        for level, (dof, (h, w)) in enumerate(zip(channels, grids))
    ]


def _regions(log10_nfa: np.ndarray, labels: np.ndarray, level: int) -> list[Region]:
    """Regions from an output-size label image (region k is label k + 1): box, pixel count, log10 NFA."""
    areas = np.bincount(labels.ravel(), minlength=log10_nfa.size + 1)
    out = []
    for k, box in enumerate(ndimage.find_objects(labels, max_label=log10_nfa.size)):
        if box is None:  # no output pixel takes its value from this region (output smaller than the map)
            continue
        ys, xs = box
        out.append(Region((xs.start, ys.start, xs.stop, ys.stop), int(areas[k + 1]), float(log10_nfa[k]), level))
    return out
