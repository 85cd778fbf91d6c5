"""Matformer's periodic multigraph: the same edges as a brute-force reading of the rule, for cells
of every shape (one-atom cells whose neighbours are all images of the atom, skewed and sparse
cells); symmetric; 12 pattern self-loops per atom; and the (receiver, sender, length) multiset is
unchanged by rotation/reflection, translation with wrap and relabelling the atoms."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from ase.build import bulk

from shipyard_models.matformer.graph import PATTERN_IMAGES, periodic_graph

K, EPS = 12, 1e-5


def brute_force_edges(pos, cell, k=K, eps=EPS, reach=5):
    """The rule read literally: every image in a big box, per atom sort, cut at d_k (1 + eps),
    add reverses. Returns a set of (dst, src, n1, n2, n3)."""
    spacing = 1.0 / np.linalg.norm(np.linalg.inv(cell), axis=0)
    images = np.array(list(itertools.product(range(-reach, reach + 1), repeat=3)))
    edges, cutoffs = set(), []
    for i in range(len(pos)):
        cands = []
        for j in range(len(pos)):
            d = np.linalg.norm(pos[j] + images @ cell - pos[i], axis=1)
            for n, dist in zip(images, d):
                if j == i and not n.any():
                    continue
                cands.append((dist, j, tuple(n)))
        cands.sort(key=lambda c: c[0])
        cutoff = cands[k - 1][0] * (1 + eps)
        cutoffs.append(cutoff)
        for dist, j, n in cands:
            if dist <= cutoff:
                edges.add((i, j, *n))
                edges.add((j, i, *(-np.array(n))))
    # the box must contain every image within the largest cutoff, or the reference is wrong
    frac = pos @ np.linalg.inv(cell)
    spread = np.abs(frac[:, None] - frac[None]).max(axis=(0, 1))  # largest |f_j - f_i| per axis
    assert (max(cutoffs) / spacing + spread < reach).all()
    return edges


def edge_set(g, pattern=False):
    keep = g.is_pattern if pattern else ~g.is_pattern
    return {(int(d), int(s), *map(int, n)) for d, s, n in zip(g.dst[keep], g.src[keep], g.image[keep])}


def rattled_alloy(seed=0):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
    rng = np.random.default_rng(seed)
    atoms.numbers[rng.random(len(atoms)) < 0.5] = 79
    atoms.positions += rng.normal(0, 0.1, atoms.positions.shape)
    return atoms.positions, np.asarray(atoms.cell[:])


CELLS = {
    "fcc-primitive-1-atom": (np.zeros((1, 3)), np.asarray(bulk("Cu", "fcc", a=3.6).cell[:])),
    "bcc-ties-8+6": (np.zeros((1, 3)), np.asarray(bulk("Fe", "bcc", a=2.87).cell[:])),
    "hcp": (bulk("Mg", "hcp", a=3.2).positions, np.asarray(bulk("Mg", "hcp", a=3.2).cell[:])),
    "rattled-alloy-outside-cell": (rattled_alloy()[0] + [5.0, -7.0, 11.0], rattled_alloy()[1]),
    "skewed-triclinic": (np.array([[0.1, 0.2, 0.3], [1.5, 0.7, 1.1]]),
                         np.array([[3.0, 0.0, 0.0], [2.6, 1.4, 0.0], [1.1, 0.9, 2.5]])),
    "sparse-needle": (np.array([[0.0, 0.0, 0.0], [0.9, 1.0, 4.0]]), np.diag([1.9, 2.1, 14.0])),
}


@pytest.mark.parametrize("name", CELLS)
def test_neighbour_edges_match_brute_force(name):
    pos, cell = CELLS[name]
    g = periodic_graph(pos, cell, K, EPS)
    assert edge_set(g) == brute_force_edges(pos, cell)
    assert len(edge_set(g)) == (~g.is_pattern).sum(), "each directed edge appears once"
    vec = pos[g.src] + g.image @ cell - pos[g.dst]
    np.testing.assert_allclose(g.distance, np.linalg.norm(vec, axis=1), rtol=1e-12)


def test_counts_on_perfect_lattices():
    # fcc: 12 nearest neighbours, all images of the single atom; bcc: 8 + 6 tied second shell
    fcc = periodic_graph(*CELLS["fcc-primitive-1-atom"])
    assert (~fcc.is_pattern).sum() == 12 and (fcc.src == fcc.dst).all()
    bcc = periodic_graph(*CELLS["bcc-ties-8+6"])
    assert (~bcc.is_pattern).sum() == 14
    # simple cubic, a = 1: 6 at 1, then 12 tied at sqrt(2): a 13-th neighbour drags in all 12
    sc = periodic_graph(np.zeros((1, 3)), np.eye(3))
    assert np.bincount(np.round(sc.distance[~sc.is_pattern] ** 2).astype(int)).tolist() == [0, 6, 12]


def test_graph_is_symmetric_with_twelve_pattern_loops_per_atom():
    pos, cell = CELLS["skewed-triclinic"]
    g = periodic_graph(pos, cell)
    edges = edge_set(g)
    assert {(s, d, -a, -b, -c) for d, s, a, b, c in edges} == edges
    loops = edge_set(g, pattern=True)
    assert g.is_pattern.sum() == 12 * len(pos) == len(loops)
    signed = np.concatenate([PATTERN_IMAGES, -PATTERN_IMAGES])
    for i in range(len(pos)):
        assert {e[2:] for e in loops if e[0] == i} == {tuple(map(int, n)) for n in signed}
    lengths = np.sort(np.linalg.norm(signed @ cell, axis=1))
    np.testing.assert_allclose(np.sort(g.distance[g.is_pattern & (g.dst == 0)]), lengths)
    without = periodic_graph(pos, cell, pattern_edges=False)
    assert edge_set(without) == edges and not without.is_pattern.any()


def test_result_does_not_depend_on_the_first_search_radius():
    pos, cell = CELLS["sparse-needle"]
    small = periodic_graph(pos, cell, radius=0.3)  # forces several enlargements
    big = periodic_graph(pos, cell, radius=40.0)
    assert small.radius > 0.3
    assert edge_set(small) == edge_set(big) == edge_set(periodic_graph(pos, cell))


def multiset(g, perm=None):
    """{(dst, src): sorted lengths}, atoms relabelled by perm (old index -> new index)."""
    out = {}
    for d, s, dist in zip(g.dst, g.src, g.distance):
        key = (int(d), int(s)) if perm is None else (int(perm[d]), int(perm[s]))
        out.setdefault(key, []).append(dist)
    return {k: np.sort(v) for k, v in out.items()}


def assert_same_multiset(a, b):
    assert a.keys() == b.keys()
    for key in a:  # float64 round-off of a rotation is ~1e-15 A; 1e-9 A is far below any real gap
        np.testing.assert_allclose(a[key], b[key], atol=1e-9, rtol=0, err_msg=str(key))


def random_orthogonal(rng, reflect):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if (np.linalg.det(q) < 0) != reflect:
        q[:, 0] *= -1
    return q


@pytest.mark.parametrize("name", ["rattled-alloy-outside-cell", "skewed-triclinic", "bcc-ties-8+6"])
def test_edge_multiset_is_invariant(name):
    pos, cell = CELLS[name]
    rng = np.random.default_rng(1)
    ref = multiset(periodic_graph(pos, cell))
    for reflect in (False, True):
        q = random_orthogonal(rng, reflect)
        assert_same_multiset(multiset(periodic_graph(pos @ q.T, cell @ q.T)), ref)
    shifted = pos + rng.normal(size=3) * 7.0
    frac = shifted @ np.linalg.inv(cell)
    wrapped = (frac - np.floor(frac)) @ cell
    assert_same_multiset(multiset(periodic_graph(wrapped, cell)), ref)
    perm = rng.permutation(len(pos))  # new atom perm[i] is old atom i
    new_pos = np.empty_like(pos)
    new_pos[perm] = pos
    assert_same_multiset(multiset(periodic_graph(new_pos, cell)), multiset(periodic_graph(pos, cell), perm))


def test_tie_tolerance_keeps_counts_under_rotation():
    # a perfect fcc crystal has 12 exact ties at the 12th distance and 6 more at the 13th: a
    # rotation moves lengths by ~1e-16 relative, the epsilon keeps the count at exactly 12
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    rng = np.random.default_rng(2)
    for _ in range(5):
        q = random_orthogonal(rng, reflect=False)
        g = periodic_graph(atoms.positions @ q.T, atoms.cell[:] @ q.T)
        assert np.bincount(g.dst[~g.is_pattern]).tolist() == [12] * 4


@pytest.mark.parametrize("pos,cell,k,match", [
    (np.zeros((1, 3)), np.zeros((3, 3)), 12, "cell"),
    (np.zeros((1, 3)), np.eye(2), 12, "cell"),
    (np.zeros((0, 3)), np.eye(3), 12, "positions"),
    (np.full((1, 3), np.nan), np.eye(3), 12, "positions"),
    (np.zeros((1, 3)), np.eye(3), 0, "k"),
])
def test_bad_input_names_the_argument(pos, cell, k, match):
    with pytest.raises(ValueError, match=match):
        periodic_graph(pos, cell, k)
