"""Crystal data for Matformer: generated EMT crystals are labelled consistently, user crystals
round-trip through CIF / POSCAR / extxyz (ASE) with their targets, the npz cache returns the same
samples, and padding + `unpad` is lossless (the flat graph equals the unpadded one)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.calculators.emt import EMT
from ase.io import write

from shipyard.train.data import collate
from shipyard_models.data import crystals
from shipyard_models.matformer import FAMILY, Config, DataConfig, crystal_graph, flat_batch, unpad

CFG = Config(hidden=8, layers=1, heads=1, fc_hidden=8, rbf_bins=8)
STRUCTURES = crystals.generate(6, seed=5, max_atoms=8)


def test_generated_labels_are_emt_energies():
    refs = crystals.reference_energies(crystals.EMT_METALS)
    for atoms in STRUCTURES:
        a = atoms.copy()
        a.calc = EMT()
        e = a.get_potential_energy() / len(a)
        assert atoms.info["energy_per_atom"] == pytest.approx(e, abs=1e-12)
        ref = np.mean([refs[s] for s in a.get_chemical_symbols()])
        assert atoms.info["formation_energy_per_atom"] == pytest.approx(e - ref, abs=1e-12)
    again = crystals.generate(6, seed=5, max_atoms=8)
    assert all(np.array_equal(a.positions, b.positions) for a, b in zip(STRUCTURES, again))
    assert max(len(a) for a in STRUCTURES) <= 8


def same_graph(g1, g2, atol):
    """Same atoms and the same (dst, src) -> sorted lengths."""
    assert np.array_equal(g1["species"], g2["species"])
    def table(g):
        out = {}
        for d, s, x in zip(g["edge_dst"], g["edge_src"], g["edge_dist"]):
            out.setdefault((int(d), int(s)), []).append(x)
        return {k: np.sort(v) for k, v in out.items()}
    t1, t2 = table(g1), table(g2)
    assert t1.keys() == t2.keys()
    for k in t1:
        np.testing.assert_allclose(t1[k], t2[k], atol=atol, rtol=0)


def test_cif_poscar_and_extxyz_round_trip_with_targets(tmp_path):
    folder = tmp_path / "crystals"
    folder.mkdir()
    names = []
    for i, atoms in enumerate(STRUCTURES[:3]):
        name, fmt = [(f"s{i}.cif", "cif"), (f"POSCAR_{i}", "vasp"), (f"s{i}.extxyz", "extxyz")][i]
        write(folder / name, atoms, format=fmt)
        names.append(name)
    (folder / "targets.csv").write_text("file,target\n" + "".join(
        f"{n},{a.info['energy_per_atom']}\n" for n, a in zip(names[:2], STRUCTURES)))
    got, targets = crystals.read(folder, "energy_per_atom")  # the extxyz carries its own target
    by_name = dict(zip(sorted(names), zip(got, targets)))
    for name, atoms in zip(names, STRUCTURES):
        read_atoms, target = by_name[name]
        assert target == pytest.approx(atoms.info["energy_per_atom"], rel=1e-9)
        # CIF and POSCAR store ~6-8 significant digits; graphs agree to that precision
        same_graph(crystal_graph(read_atoms, CFG), crystal_graph(atoms, CFG), atol=1e-4)

    one_file = tmp_path / "all.extxyz"
    write(one_file, STRUCTURES, format="extxyz")
    frames, targets = crystals.read(one_file, "formation_energy_per_atom")
    assert len(frames) == len(STRUCTURES)
    np.testing.assert_allclose(targets, [a.info["formation_energy_per_atom"] for a in STRUCTURES])

    train, val = FAMILY.datasets(CFG, DataConfig(source=str(one_file), val_fraction=0.5), tmp_path)
    assert len(train) + len(val) == len(STRUCTURES)


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(ValueError, match="data.source"):
        crystals.read(tmp_path / "missing", "energy")
    with pytest.raises(ValueError, match="data.source"):
        crystals.read(tmp_path, "energy")  # empty folder
    write(tmp_path / "x.cif", STRUCTURES[0], format="cif")
    with pytest.raises(ValueError, match="target_key"):
        crystals.read(tmp_path, "band_gap")


def test_cache_padding_and_unpad_are_lossless(tmp_path):
    data_cfg = DataConfig(num_structures=10, max_atoms=8, val_fraction=0.3)
    train, val = FAMILY.datasets(CFG, data_cfg, tmp_path)
    assert len(list(tmp_path.glob("matformer-*.npz"))) == 1
    train2, _ = FAMILY.datasets(CFG, data_cfg, tmp_path)  # from the cache
    for i in range(len(train)):
        for k, v in train[i].items():
            assert torch.equal(v, train2[i][k]), k
    assert train.y_std > 0 and val.y_mean == train.y_mean  # val standardised with train stats

    batch = collate([train[i] for i in range(len(train))])
    flat = unpad(batch)
    want = flat_batch(train.graphs)
    for k in want:
        assert torch.equal(flat[k], want[k]), k
