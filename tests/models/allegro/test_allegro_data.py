"""EMT data: generated once and cached as extxyz (read back with its labels), padded to equal
shapes with a mask for variable atom counts, per-species statistics, the family's loss and
metrics on a batch, and clear errors for bad data settings."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.io import write

from shipyard.train.data import collate
from shipyard_models.allegro import FAMILY, DataConfig
from shipyard_models.data.atoms import EMTRecipe, emt_file, read_structures, species_statistics


def test_emt_file_is_cached_extxyz_with_labels(tmp_path):
    recipe = EMTRecipe(n_structures=8, supercell=1, vacancy_fraction=0.5, md_fraction=0.25, seed=3)
    path = emt_file(tmp_path, recipe)
    stamp = path.stat().st_mtime_ns
    assert emt_file(tmp_path, recipe) == path and path.stat().st_mtime_ns == stamp  # cached
    frames = read_structures(path)
    assert len(frames) == 8 and {len(a) for a in frames} == {3, 4}  # vacancies: variable counts
    for a in frames:
        assert a.calc.results["forces"].shape == (len(a), 3) and a.calc.results["stress"].shape == (6,)
    from ase.calculators.emt import EMT
    again = frames[0].copy()
    again.calc = EMT()
    assert again.get_potential_energy() == pytest.approx(frames[0].calc.results["energy"], abs=1e-6)

    shift, scale = species_statistics(frames, ["Cu"])
    per_atom = np.mean([a.calc.results["energy"] / len(a) for a in frames])
    assert shift[0] == pytest.approx(per_atom, abs=0.05) and scale[0] > 0


def test_datasets_pad_with_a_mask_and_the_loss_runs(tmp_path):
    cfg = FAMILY.Config(species=["Cu"], r_max=3.0, num_layers=1, num_channels=2, latent_dim=8, num_bessel=4,
                        embed_dim=4, stress_weight=1.0)
    path = tmp_path / "mine.extxyz"
    write(str(path), read_structures(emt_file(tmp_path, EMTRecipe(n_structures=6, supercell=1,
                                                                    vacancy_fraction=0.5))), format="extxyz")
    train, val = FAMILY.datasets(cfg, DataConfig(path=str(path), val_fraction=0.34), tmp_path)
    assert (len(train), len(val)) == (4, 2)
    batch = collate([train[i] for i in range(len(train))])
    assert batch["positions"].shape == (4, 4, 3) and batch["mask"].sum() < 16  # one padded row or more
    torch.manual_seed(0)
    model = FAMILY.build(cfg).double()
    loss, metrics = FAMILY.loss(model, batch, 0, 10)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())
    assert set(metrics) == {"loss", "energy_mae_per_atom", "force_mae", "force_rmse", "stress_mae"}
    torch.testing.assert_close(model.species_shift, train.shift)  # training statistics installed
    with torch.no_grad():
        val_metrics = FAMILY.evaluate(model, collate([val[0], val[1]]))
    assert val_metrics["force_rmse"] >= val_metrics["force_mae"] > 0


def test_bad_data_settings_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="element"):
        EMTRecipe(element="Fe")
    with pytest.raises(ValueError, match="val_fraction"):
        DataConfig(val_fraction=1.5)
    with pytest.raises(ValueError, match="md.grid"):
        DataConfig().md.__class__(grid=[2, 0, 1])
    with pytest.raises(ValueError, match="data.element 'Ni' is not in model.species"):
        FAMILY.datasets(FAMILY.Config(species=["Cu"]), DataConfig(element="Ni"), tmp_path)
    with pytest.raises(FileNotFoundError, match="no such structure file"):
        read_structures(tmp_path / "missing.extxyz")
