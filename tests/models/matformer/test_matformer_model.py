"""Matformer's promises as properties (model in eval mode, float64): the prediction does not change
under rotation/reflection, translation (inside or outside the cell), a shift of the cell origin
with wrapping, relabelling the atoms, or batching with other crystals.

Cell choices. The neighbour edges describe the infinite crystal; the 12 pattern self-loops carry
|a|, |b|, |c|, |a+b|, |a+c|, |b+c| of the cell as given. Hence, on the raw cell:
  * invariant: cell changes that keep that set of lengths (cyclic permutation of a, b, c; a, b, c
    -> -a, -b, -c), and, without pattern edges, every supercell and every basis of the lattice;
  * not invariant: supercells and other bases (e.g. a' = a + b) when pattern edges are on.
`canonical_cell=True` (primitive cell + Niggli reduction) makes all of them give one prediction.

Tolerance: float64 throughout; the only differences are round-off in positions (~1e-15 A) passed
through a few layers, so 1e-9 absolute on outputs of order 1. "Differs" means by more than 1e-4.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms

from shipyard_models.data.crystals import generate
from shipyard_models.matformer import Config, Matformer, MatformerConv, predict

torch.set_num_threads(1)
TINY = dict(hidden=16, layers=2, heads=2, fc_hidden=16, rbf_bins=32)
ATOL = 1e-9


def make_model(**overrides) -> Matformer:
    torch.manual_seed(0)
    model = Matformer(Config(**{**TINY, **overrides})).double()
    with torch.no_grad():  # give BatchNorm non-trivial running statistics, then freeze them
        model.train()
        predict_train_mode(model, STRUCTURES)
    return model.eval()


def predict_train_mode(model, structures):
    from shipyard_models.matformer import crystal_graph, flat_batch
    model(flat_batch([crystal_graph(a, model.cfg) for a in structures], torch.float64))


STRUCTURES = generate(4, seed=3, max_atoms=8)  # alloys and pure cells, strained and rattled


def one(model, atoms) -> float:
    return float(predict(model, [atoms])[0])


def rotated(atoms, reflect: bool, seed=0) -> Atoms:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if (np.linalg.det(q) < 0) != reflect:
        q[:, 0] *= -1
    return Atoms(atoms.numbers, positions=atoms.positions @ q.T, cell=atoms.cell[:] @ q.T, pbc=True)


def with_cell(atoms, cell) -> Atoms:
    """The same crystal described by another cell of the same lattice (positions unchanged)."""
    out = Atoms(atoms.numbers, positions=atoms.positions, cell=cell, pbc=True)
    out.wrap()
    return out


@pytest.fixture(scope="module", params=[True, False], ids=["canonical", "raw-cell"])
def model(request):
    return make_model(canonical_cell=request.param)


def test_rotation_reflection_translation_origin_and_permutation(model):
    for atoms in STRUCTURES:
        ref = one(model, atoms)
        assert abs(one(model, rotated(atoms, reflect=False)) - ref) < ATOL
        assert abs(one(model, rotated(atoms, reflect=True, seed=1)) - ref) < ATOL
        moved = atoms.copy()
        moved.positions += [13.1, -4.2, 7.7]  # atoms leave the cell
        assert abs(one(model, moved) - ref) < ATOL
        origin = atoms.copy()
        origin.positions -= origin.cell.cartesian_positions([0.37, 0.81, 0.05])
        origin.wrap()  # the same crystal with the cell's origin somewhere else
        assert abs(one(model, origin) - ref) < ATOL
        perm = np.random.default_rng(0).permutation(len(atoms))
        assert abs(one(model, atoms[perm]) - ref) < ATOL


def test_alone_equals_inside_a_batch(model):
    alone = torch.tensor([one(model, a) for a in STRUCTURES], dtype=torch.float64)
    together = predict(model, STRUCTURES)
    torch.testing.assert_close(together, alone, atol=ATOL, rtol=0)
    reordered = predict(model, STRUCTURES[::-1])
    torch.testing.assert_close(reordered, alone.flip(0), atol=ATOL, rtol=0)


def other_basis(atoms) -> np.ndarray:
    a, b, c = atoms.cell[:]
    return np.array([a + b, b, c - 2 * a])  # unimodular: the same lattice


def test_cell_choices_on_the_raw_cell():
    raw = make_model(canonical_cell=False)
    atoms = STRUCTURES[0]
    ref = one(raw, atoms)
    a, b, c = atoms.cell[:]
    # the pattern lengths |a|, |b|, |c|, |a+b|, |a+c|, |b+c| are unchanged -> same prediction
    assert abs(one(raw, with_cell(atoms, [b, c, a])) - ref) < ATOL
    assert abs(one(raw, with_cell(atoms, [-a, -b, -c])) - ref) < ATOL
    # the pattern lengths change -> a different prediction, as the paper's encoding intends
    assert abs(one(raw, atoms.repeat((2, 1, 1))) - ref) > 1e-4
    assert abs(one(raw, with_cell(atoms, other_basis(atoms))) - ref) > 1e-4

    # the neighbour graph alone describes the infinite crystal: every cell choice agrees
    plain = make_model(canonical_cell=False, pattern_edges=False)
    ref = one(plain, atoms)
    assert abs(one(plain, atoms.repeat((2, 1, 3))) - ref) < ATOL
    assert abs(one(plain, with_cell(atoms, other_basis(atoms))) - ref) < ATOL


def test_canonical_cell_makes_every_cell_choice_agree():
    model = make_model(canonical_cell=True)
    for atoms in STRUCTURES:
        ref = one(model, atoms)
        for variant in (atoms.repeat((2, 1, 1)), atoms.repeat((1, 3, 2)),
                        with_cell(atoms, other_basis(atoms)),
                        rotated(with_cell(atoms.repeat((1, 2, 1)), other_basis(atoms.repeat((1, 2, 1)))),
                                reflect=True)):
            assert abs(one(model, variant) - ref) < ATOL


def test_conv_matches_the_per_edge_formula():
    """MatformerConv against the paper's equations evaluated edge by edge in a Python loop."""
    torch.manual_seed(0)
    C, H, N, E = 4, 2, 3, 7
    conv = MatformerConv(C, H).double().eval()
    with torch.no_grad():
        conv.bn.running_mean.normal_()
        conv.bn.running_var.uniform_(0.5, 2.0)
    h = torch.randn(N, C, dtype=torch.float64)
    e = torch.randn(E, C, dtype=torch.float64)
    src = torch.tensor([0, 1, 2, 2, 0, 1, 1])
    dst = torch.tensor([1, 0, 0, 1, 2, 2, 1])
    got = conv(h, e, src, dst)

    agg = torch.zeros(N, H, C, dtype=torch.float64)
    for n in range(E):
        i, j = int(dst[n]), int(src[n])
        q, k, v = (lin(h).view(N, H, C) for lin in (conv.query, conv.key, conv.value))
        ee = conv.edge(e[n]).view(H, C)
        for head in range(H):
            alpha = torch.cat([q[i, head]] * 3) * torch.cat([k[i, head], k[j, head], ee[head]]) / np.sqrt(3 * C)
            gate = torch.sigmoid(conv.alpha_norm(alpha))
            msg = conv.msg_out(conv.msg_update(torch.cat([v[i, head], v[j, head], ee[head]])) * gate)
            agg[i, head] += msg
    want = torch.nn.functional.silu(conv.bn(conv.concat(agg.reshape(N, H * C)))) + conv.skip(h)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("layers", [1, 3, 7])
def test_any_depth(layers):
    model = make_model(layers=layers, canonical_cell=False)
    assert len(model.blocks) == layers
    out = predict(model, STRUCTURES)
    assert out.shape == (len(STRUCTURES),) and torch.isfinite(out).all()


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="layers"):
        Config(layers=0)
    with pytest.raises(ValueError, match="loss"):
        Config(loss="huber")
    model = make_model(canonical_cell=False)
    with pytest.raises(ValueError, match="max_z"):
        predict(model, [Atoms("Og", positions=[[0, 0, 0]], cell=np.eye(3) * 3, pbc=True)])
    with pytest.raises(ValueError, match="pbc"):
        predict(model, [Atoms("Cu", positions=[[0, 0, 0]], cell=np.eye(3) * 3, pbc=False)])
