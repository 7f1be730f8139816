"""Plain reference implementation of the U-Flow a contrario tree, for tests only.

This module is a deliberately slow, node-by-node test oracle for the vectorised
implementation.  It was written without reading that implementation.  It handles
maps up to about 16x16 and favours being easy to check over being fast.

What it computes
----------------
Input: a 2-D float map ``stat`` (H, W), where higher means more anomalous, and a
callable ``node_log10_nfa(level, area)`` that gives the log10 NFA of a candidate
region whose smallest statistic is ``level`` and whose size is ``area`` pixels.

1. Candidate regions are the nodes of the max-tree, with 4-connectivity. These
   are the connected components of the upper level sets {stat >= t}, for every
   value t that the map takes. A node is a distinct pixel set: if the same set
   appears at several thresholds, it is still one node. Its level is the minimum
   of ``stat`` over its pixels, and its area is its pixel count. Its parent is the
   smallest node that strictly contains it. The root is the whole image.
   ``max_tree_nodes`` builds the tree directly: for each distinct value t, in
   increasing order, it labels stat >= t with scipy.ndimage.label (4-connectivity)
   and drops pixel sets it has already seen.

2. Simplification, in the order the authors' code uses:

       prune; merged = merge
       while merged: prune; merged = merge
       prune

   * A *leaf branch* starts at a leaf and climbs toward the root. The parent of
     the current node is added while the current node is its parent's only
     child. So the branch contains the topmost node of the chain (the child of a
     bifurcation) but not the bifurcation. It also contains the root when the
     remaining tree is a single chain.
   * *prune*: lists the leaves at the start of the pass. For each leaf, it keeps
     the single node of the leaf's branch with the smallest log10 NFA and removes
     the others. The children of a removed node are reattached to its parent, so
     the kept node becomes a leaf. If the root is removed, the kept node becomes
     the new root.
   * *merge*: lists at the start of the pass every bifurcation (a node with >= 2
     children) whose children are all leaves. If the bifurcation's log10 NFA is
     <= the smallest of its children's, its children are removed and it becomes a
     leaf. merge returns whether anything was merged.

   **Tie rule (fixed by the project, and different from the authors' code in one
   place, see below):** when pruning a branch and several nodes share the
   smallest value, keep the one closest to the root, which is the largest
   region. When merging, the parent replaces its children when
   parent <= min(children), so a tie goes to the parent.

3. Output: the surviving leaves after simplification, as a list of
   ``(frozenset of flat pixel indices row * W + col, log10 NFA)``, sorted by
   log10 NFA and then by smallest pixel index. Every surviving leaf is
   returned, significant or not.

Facts found in the authors' code
--------------------------------
Source: repository mtailanian/uflow, file ``src/nfa_tree.py``, stored version at
commit 58d0ff89a6066eb27d31844ac3721da09e2e9766, class ``NFATree``.

* ``build_tree`` / ``prune`` / ``accumulate``: the tree is
  ``skimage.morphology.max_tree(score, connectivity=1)``, which is
  4-connectivity. It is stored as a networkx DiGraph with edges child -> parent,
  so "predecessors" are children and "successors" is the parent. ``prune`` merges
  canonical pixels with equal score into one node. ``accumulate`` gives each node
  the pixels of its whole subtree. Each node is therefore one distinct connected
  component of an upper level set, as in step 1 here.
* ``compute_log_prob``: a node's value is ``len(region) * log10(Chernoff bound
  at min over region of sum_c z_c^2)``. This is a function of (level, area),
  which this module takes as the callable. The log10 number of tests is added
  afterwards as a constant (``compute_nfa_anomaly_score_tree``), which does not
  change any comparison.
* ``compute_log_prob_map``: the order is ``nfa_prune()``, then
  ``keep_merging = nfa_merge()``, then ``while keep_merging: nfa_prune();
  keep_merging = nfa_merge()``, then a final ``nfa_prune()``, then
  ``get_final_clusters()``. This matches the description above.
* ``get_branch``: starting from a leaf, it appends the parent while the current
  node is its parent's only child, and stops at the root (which has no parent).
  So the branch contains the topmost single-child node, meaning the child of
  the bifurcation. It does not contain the bifurcation. It does contain the
  root when the tree is a single chain.
* ``nfa_prune``: it lists leaves once at the start of the pass. For each leaf,
  it takes ``np.argmin`` over the branch's values in the order
  [leaf, ..., top]. Nodes not chosen are removed, and their children are
  reattached to their parent with ``it.product(predecessors, successors)``.
  **Tie difference:** ``np.argmin`` returns the first minimum, so among equal
  smallest values the authors keep the node closest to the *leaf* (the smallest
  region). As the project requires, this module keeps the node closest to the
  *root* (the largest region).
* ``nfa_merge``: it lists bifurcations (>= 2 children) once at the start. It
  skips a bifurcation if any child has children. If
  ``log_prob(b) <= np.min(children)``, it removes all children, so ``b`` becomes
  a leaf. The tie goes to the parent, the same as here. The bifurcations are
  visited in networkx insertion order, which is skimage's ``pixel_indices``
  sorted by increasing value. Every ancestor is therefore checked before its
  descendants. A bifurcation whose children become all leaves during a pass
  (because a child merged in that pass) is only considered in the next pass,
  after another prune. This module does the same: a merge pass decides which
  bifurcations are eligible at the start of the pass. (Merges within one pass
  cannot change one another's eligibility or values, so the visiting order
  within a pass has no other effect.)
* ``get_final_clusters``: for each final leaf, it takes the argmin over its
  branch. After the final prune, every branch is a single node. The result is
  stored in a dict *keyed by the log_prob value*, so two final leaves with
  exactly equal values collide and only the last one is kept and painted. This
  module returns every surviving leaf in a list, so no such collision happens
  here. That is a difference in output format only, as the brief requires.
* The authors paint all final leaves with their value, significant or not, and
  leave NaN (later 0) elsewhere. This module likewise returns all surviving
  leaves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy import ndimage

FOUR_CONNECTIVITY = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)


@dataclass
class Node:
    """One max-tree node: a connected component of an upper level set."""

    pixels: frozenset  # flat pixel indices row * W + col
    level: float  # minimum of stat over the pixels
    area: int  # number of pixels
    parent: int | None = None  # index of the smallest strictly larger node; None for the root
    children: list = field(default_factory=list)  # indices of the nodes whose parent is this one


def max_tree_nodes(stat: np.ndarray) -> list[Node]:
    """All max-tree nodes of ``stat`` (4-connectivity), root first.

    Nodes are ordered by (level ascending, area descending, smallest pixel). The
    root is the whole image and is always at index 0.
    """
    stat = np.asarray(stat, dtype=np.float64)
    assert stat.ndim == 2, "stat must be a 2-D map"
    flat_stat = stat.ravel()

    # Collect every distinct pixel set among the components of {stat >= t}.
    seen_pixel_sets: set[frozenset] = set()
    nodes: list[Node] = []
    for t in np.unique(stat):  # increasing order
        labels, count = ndimage.label(stat >= t, structure=FOUR_CONNECTIVITY)
        flat_labels = labels.ravel()
        for label in range(1, count + 1):
            pixels = frozenset(int(i) for i in np.flatnonzero(flat_labels == label))
            if pixels in seen_pixel_sets:
                continue  # the same region at a higher threshold: still one node
            seen_pixel_sets.add(pixels)
            level = float(min(flat_stat[i] for i in pixels))
            nodes.append(Node(pixels=pixels, level=level, area=len(pixels)))

    nodes.sort(key=lambda n: (n.level, -n.area, min(n.pixels)))

    # Parent = the smallest node that strictly contains this one.
    for index, node in enumerate(nodes):
        best_parent = None
        for other_index, other in enumerate(nodes):
            if other.area > node.area and node.pixels < other.pixels:  # strict subset
                if best_parent is None or other.area < nodes[best_parent].area:
                    best_parent = other_index
        node.parent = best_parent
        if best_parent is not None:
            nodes[best_parent].children.append(index)

    roots = [i for i, n in enumerate(nodes) if n.parent is None]
    assert roots == [0], "the whole image must be the single root, at index 0"
    assert nodes[0].area == stat.size
    return nodes


def simplify_reference(
    stat: np.ndarray, node_log10_nfa: Callable[[float, int], float]
) -> list[tuple[frozenset[int], float]]:
    """The surviving leaves after prune / merge simplification (see the module docstring).

    Returns ``[(pixels, log10_nfa), ...]`` sorted by log10 NFA, then by smallest pixel index.
    """
    nodes = max_tree_nodes(stat)
    nfa = {i: float(node_log10_nfa(n.level, n.area)) for i, n in enumerate(nodes)}

    # The working tree: alive nodes, each with a parent (or None) and a set of children.
    parent: dict[int, int | None] = {i: n.parent for i, n in enumerate(nodes)}
    children: dict[int, set[int]] = {i: set(n.children) for i, n in enumerate(nodes)}

    def is_leaf(i: int) -> bool:
        return len(children[i]) == 0

    def remove_node(i: int) -> None:
        """Remove node i, reattaching its children to its parent (or making them roots)."""
        p = parent[i]
        for c in children[i]:
            parent[c] = p
            if p is not None:
                children[p].add(c)
        if p is not None:
            children[p].discard(i)
        del parent[i]
        del children[i]

    def leaf_branch(leaf: int) -> list[int]:
        """[leaf, its parent, ...]: climb while the current node is its parent's only child."""
        branch = [leaf]
        current = leaf
        while parent[current] is not None and len(children[parent[current]]) == 1:
            current = parent[current]
            branch.append(current)
        return branch

    def prune() -> None:
        leaves = [i for i in parent if is_leaf(i)]
        for leaf in leaves:
            branch = leaf_branch(leaf)
            smallest = min(nfa[i] for i in branch)
            # Tie rule: among nodes with the smallest value, keep the one closest to the root,
            # i.e. the last one in [leaf, ..., top].
            keep = [i for i in branch if nfa[i] == smallest][-1]
            for i in branch:
                if i != keep:
                    remove_node(i)

    def merge() -> bool:
        eligible = [
            b
            for b in parent
            if len(children[b]) >= 2 and all(is_leaf(c) for c in children[b])
        ]
        merged = False
        for b in eligible:
            kids = sorted(children[b])
            if nfa[b] <= min(nfa[c] for c in kids):  # a tie goes to the parent
                merged = True
                for c in kids:
                    remove_node(c)  # b becomes a leaf
        return merged

    prune()
    merged = merge()
    while merged:
        prune()
        merged = merge()
    prune()

    result = [(nodes[i].pixels, nfa[i]) for i in parent if is_leaf(i)]
    result.sort(key=lambda item: (item[1], min(item[0])))
    return result
