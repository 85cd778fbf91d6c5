"""The reference `nequip-allegro` timed on the structures `allegro_scaling.py` hands it.

Run by `allegro_scaling.py` with the python of its own environment (`.venv-ref`: torch 2.13.0 CPU,
nequip 0.19.1, nequip-allegro 0.8.3, e3nn 0.6.0), never imported by Shipyard:

    .venv-ref/bin/python benchmarks/allegro_reference.py STRUCTURES.npz --config JSON --repeats 3 --threads 1

The environment (what `make bench` does; the constraints keep pip from pulling another torch):

    .venv/bin/python -m venv .venv-ref
    .venv-ref/bin/pip install torch==2.13.0
    printf 'torch==2.13.0\ne3nn==0.6.0\n' > .venv-ref/constraints.txt
    .venv-ref/bin/pip install -c .venv-ref/constraints.txt nequip-allegro==0.8.3

STRUCTURES.npz holds, for k = 0, 1, ..., `positions_k` [N, 3], `numbers_k` [N] and `cell_k` [3, 3]
(periodic in all three directions). It prints one JSON object: for every structure the atom count,
the best wall and CPU (process) times over `--repeats` evaluations after one warm-up, the energy
and the edge count.

What is timed is the path the reference's users take from ASE: `NequIPCalculator` around the eager
model built by `allegro.model.AllegroModel`, with the transforms its `from_compiled_model` sets up
(species -> type mapping, then `NeighborListTransform` with nequip's default backend, matscipy), so
each evaluation is `from_ase` + neighbour list + energy + forces (+ stress, which the reference
always derives through its strain path on periodic cells). The hyperparameters mirror
`allegro_scaling.CFG`; `build` lists how each maps and where no exact match exists.
"""
from __future__ import annotations

import argparse
import json
import time


def build(cfg: dict):
    """An eager reference Allegro with Shipyard's hyperparameters (`cfg`, the fields of
    `shipyard_models.allegro.model.Config`).

    Mapping (ours -> reference):
    * species -> type_names; r_max -> r_max; l_max -> l_max, with parity=False (ours carries only
      the natural-parity irreps 0e, 1o, 2e, ..., which is what parity=False keeps);
    * num_layers -> num_layers; latent_dim -> num_scalar_features and every MLP hidden width
      (two-body, latent, readout), one hidden layer each as ours; num_channels -> num_tensor_features;
    * num_bessel -> TwoBodyBesselScalarEmbed(num_bessels, bessel_trainable=True as ours), cutoff_p ->
      polynomial_cutoff_p; avg_num_neighbors -> avg_num_neighbors; per-type scale 1, shift 0 (our
      untrained buffers); tp_path_channel_coupling=True (ours mixes paths and channels jointly).
    No exact match: the two-body embedding (ours: an MLP on [embed(Z_i), embed(Z_j), Bessel]; the
    reference: a product of per-type embeddings with a linear projection of the Bessel basis, width
    2 * embed_dim, then its MLP); the reference's MLPs have no biases; its readout reads the
    concatenated scalars of every layer (3 x latent_dim wide) where ours reads the last latent;
    residual_alpha has no counterpart (the reference learns its own residual mixing).
    """
    from allegro.model import AllegroModel
    return AllegroModel(
        seed=0, model_dtype="float32", type_names=list(cfg["species"]), r_max=cfg["r_max"],
        l_max=cfg["l_max"], parity=False,
        radial_chemical_embed={"_target_": "allegro.nn.TwoBodyBesselScalarEmbed", "num_bessels": cfg["num_bessel"],
                               "bessel_trainable": True, "polynomial_cutoff_p": cfg["cutoff_p"]},
        radial_chemical_embed_dim=2 * cfg["embed_dim"],
        scalar_embed_mlp_hidden_layers_depth=1, scalar_embed_mlp_hidden_layers_width=cfg["latent_dim"],
        num_layers=cfg["num_layers"], num_scalar_features=cfg["latent_dim"], num_tensor_features=cfg["num_channels"],
        allegro_mlp_hidden_layers_depth=1, allegro_mlp_hidden_layers_width=cfg["latent_dim"],
        readout_mlp_hidden_layers_depth=1, readout_mlp_hidden_layers_width=cfg["latent_dim"],
        avg_num_neighbors=cfg["avg_num_neighbors"], tp_path_channel_coupling=True,
        per_type_energy_scales=1.0, per_type_energy_shifts=0.0).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("structures", help=".npz with positions_k, numbers_k, cell_k")
    parser.add_argument("--config", required=True, help="JSON of Shipyard's Allegro Config fields")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import numpy as np
    import torch
    torch.set_num_threads(args.threads)
    from ase import Atoms
    from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper, NeighborListTransform
    from nequip.integrations.ase import NequIPCalculator
    from nequip.utils.global_state import set_global_state

    set_global_state()
    cfg = json.loads(args.config)
    model = build(cfg)
    calc = NequIPCalculator(model, "cpu", transforms=[ChemicalSpeciesToAtomTypeMapper(list(cfg["species"])),
                                                     NeighborListTransform(r_max=cfg["r_max"])])
    rows = []
    with np.load(args.structures, allow_pickle=False) as f:
        k = 0
        while f"positions_{k}" in f:
            atoms = Atoms(numbers=f[f"numbers_{k}"], positions=f[f"positions_{k}"], cell=f[f"cell_{k}"], pbc=True)
            calc.calculate(atoms, ["energy", "forces"])  # warm-up
            best, best_cpu = float("inf"), float("inf")
            for _ in range(args.repeats):
                t, c = time.perf_counter(), time.process_time()
                calc.calculate(atoms, ["energy", "forces"])
                best, best_cpu = min(best, time.perf_counter() - t), min(best_cpu, time.process_time() - c)
            data = calc.atoms_to_data(atoms)
            rows.append({"atoms": len(atoms), "seconds": best, "cpu_seconds": best_cpu,
                         "energy": float(calc.results["energy"]),
                         "edges": int(data["edge_index"].shape[1]),
                         "max_force": float(np.abs(calc.results["forces"]).max())})
            k += 1
    import allegro
    import nequip
    print(json.dumps({"nequip": nequip.__version__, "nequip_allegro": allegro.__version__, "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "parameters": sum(p.numel() for p in model.parameters()),
                      "path": "NequIPCalculator(eager AllegroModel), NeighborListTransform (matscipy)",
                      "rows": rows}))


if __name__ == "__main__":
    main()
