"""`/v1/energy` (Allegro) and `/v1/properties` (Matformer) end to end: one real Ray Serve instance
on 127.0.0.1 with both apps (Allegro at /allegro, Matformer at /matformer), each built from a real
checkpoint of a tiny randomly initialised model exactly as a Serve config file builds it, and
queried over HTTP. Answers are compared with the family's own code called in-process."""
from __future__ import annotations

import io
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from ase import Atoms
from ase.build import bulk
from ase.io import read, write
from ase.neighborlist import primitive_neighbor_list
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from s3_server import free_port
from serve_checkpoints import write_checkpoints
from serve_fuzz import bodies
from shipyard.export import load_model
from shipyard.serve import app as serving
from shipyard.serve.atoms import _pair_census
from shipyard_models.allegro import AllegroCalculator, load_checkpoint, predict
from shipyard_models.matformer import predict as matformer_predict

pytestmark = pytest.mark.slow  # one Serve instance with two apps: most of the time is its start

MAX_ATOMS = 32
JOBS = {  # tiny models; the data blocks are what the endpoints read (species, target)
    "allegro": {"model": {"species": ["Cu", "Ni"], "r_max": 4.0, "l_max": 1, "num_layers": 2,
                          "num_channels": 4, "latent_dim": 16, "num_bessel": 4, "embed_dim": 8},
                "data": {"element": "Cu"}},
    "matformer": {"model": {"hidden": 16, "layers": 2, "heads": 2, "fc_hidden": 16, "rbf_bins": 16},
                  "data": {"elements": ["Cu", "Ni", "Al"]}},
}
# The training-set statistics a trained checkpoint holds (a random init has shift 0, scale 1,
# mean 0, std 1, which would hide a server that forgot them).
STATISTICS = {"allegro": {"species_shift": [-3.7, -5.1], "species_scale": [0.6, 1.4]},
              "matformer": {"target_mean": -0.3, "target_std": 2.5}}


def _install_statistics(directory: Path, values: dict) -> None:
    """Rewrite the checkpoint's weights with `values` in place of those buffers (same metadata),
    and the manifest's size of the file, as training would have written them."""
    path = directory / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    weights = load_file(str(path))
    for name, value in values.items():
        weights[name] = torch.tensor(value, dtype=weights[name].dtype)
    save_file(weights, str(path), metadata=metadata)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"]["model.safetensors"] = path.stat().st_size
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1))


@pytest.fixture(scope="module")
def apps(ray_cluster, tmp_path_factory):
    from ray import serve
    checkpoints = write_checkpoints(tmp_path_factory.mktemp("serve-atoms"), families=tuple(JOBS),
                                    jobs=JOBS)
    for family, values in STATISTICS.items():
        _install_statistics(checkpoints[family], values)
    port = free_port()  # outside the ephemeral range (s3_server.free_port)

    def args(family):  # the args a `--config` file carries
        options = serving.ServeOptions(checkpoint=str(checkpoints[family]), run_name=f"serve-{family}",
                                       max_atoms=MAX_ATOMS, num_cpus=0.5)
        return serving.deploy_config(options)["applications"][0]["args"]

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run_many([
        serve.RunTarget(serving.build_app(args("allegro")), name="allegro", route_prefix="/allegro"),
        serve.RunTarget(serving.build_app(args("matformer")), name="matformer",
                        route_prefix="/matformer")])
    torch.set_num_threads(1)  # as the replicas: the same kernels, so answers agree to the bit
    url = f"http://127.0.0.1:{port}"
    yield {"allegro": url + "/allegro", "matformer": url + "/matformer", "checkpoints": checkpoints,
           "allegro_model": load_checkpoint(checkpoints["allegro"]),  # float64, as the calculator
           "matformer_model": load_model(checkpoints["matformer"])[0]}
    serve.shutdown()


def post(apps, family, body):
    path = "/v1/energy" if family == "allegro" else "/v1/properties"
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(apps[family] + path, data=data, headers={"Content-Type": "application/json"},
                         timeout=60)


def as_json(atoms: Atoms) -> dict:
    body = {"species": atoms.get_chemical_symbols(), "positions": atoms.positions.tolist()}
    if atoms.pbc.any():
        body.update(cell=atoms.cell.array.tolist(), pbc=atoms.pbc.tolist())
    return body


def as_crystal(atoms: Atoms) -> dict:
    return {"species": atoms.get_chemical_symbols(), "positions": atoms.positions.tolist(),
            "cell": atoms.cell.array.tolist()}


def as_text(structures: list[Atoms], fmt: str) -> str:
    buffer = io.StringIO() if fmt != "cif" else io.BytesIO()  # ASE's CIF writer wants bytes
    write(buffer, structures, format=fmt)
    text = buffer.getvalue()
    return text.decode() if isinstance(text, bytes) else text


def structures() -> list[Atoms]:
    """A periodic CuNi alloy, a non-periodic cluster and a slab (periodic in x, y)."""
    alloy = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
    alloy.numbers[[1, 6]] = 28
    alloy.rattle(0.05, seed=1)
    cluster = Atoms("Cu3Ni2", positions=[[0, 0, 0], [2.5, 0, 0], [0, 2.5, 0], [0, 0, 2.5], [1.4, 1.5, 1.3]])
    cluster.rattle(0.05, seed=2)
    slab = bulk("Ni", "fcc", a=3.5, cubic=True)
    slab.pbc = [True, True, False]
    slab.rattle(0.05, seed=3)
    return [alloy, cluster, slab]


def in_process(apps, atoms: Atoms) -> dict:
    """Allegro called directly: `predict`, what `AllegroCalculator` runs, in float64."""
    out = predict(apps["allegro_model"], atoms.positions, atoms.numbers, atoms.cell.array, atoms.pbc)
    stress = (-out["virial"] / atoms.get_volume()).tolist() if atoms.pbc.all() else None
    return {"energy": out["energy"], "forces": out["forces"].tolist(), "stress": stress}


def same(got: dict, want: dict) -> bool:
    return all(got[k] == want[k] for k in ("energy", "forces", "stress"))


def test_models_and_openapi(apps):
    allegro = requests.get(apps["allegro"] + "/v1/models", timeout=30).json()["data"][0]
    assert allegro["family"] == "allegro" and allegro["endpoints"] == ["/v1/energy"]
    assert allegro["allegro"]["species"] == ["Cu", "Ni"] and allegro["allegro"]["max_atoms"] == MAX_ATOMS
    matformer = requests.get(apps["matformer"] + "/v1/models", timeout=30).json()["data"][0]
    assert matformer["endpoints"] == ["/v1/properties"]
    assert matformer["matformer"]["species"] == ["Cu", "Ni", "Al"]
    assert matformer["matformer"]["units"] == "eV/atom"
    for family, path, fields in (("allegro", "/v1/energy", {"structures", "extxyz"}),
                                 ("matformer", "/v1/properties", {"crystals", "cif", "poscar", "extxyz"})):
        schema = requests.get(apps[family] + "/openapi.json", timeout=30).json()
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert fields | {"model"} == set(body["properties"])
        refs = re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(schema))
        assert refs and set(refs) <= set(schema["components"]["schemas"])  # nested models published


def test_energy_forces_stress_equal_the_model_in_process(apps):
    frames = structures()
    r = post(apps, "allegro", {"structures": [as_json(a) for a in frames]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["units"] == {"energy": "eV", "forces": "eV/A", "stress": "eV/A^3"}
    for atoms, got in zip(frames, body["data"]):
        want = in_process(apps, atoms)
        # the same float64 code on the same kernels: equal to the bit (JSON round-trips floats)
        assert same(got, want)
        assert got["n_atoms"] == len(atoms) and got["pbc"] == atoms.pbc.tolist()
    assert [d["stress"] is None for d in body["data"]] == [False, True, True]  # only 3D-periodic
    calc = AllegroCalculator(checkpoint=apps["checkpoints"]["allegro"])  # the user-facing path
    frames[0].calc = calc
    assert body["data"][0]["energy"] == frames[0].get_potential_energy()
    np.testing.assert_array_equal(body["data"][0]["forces"], frames[0].get_forces())
    # the model compared with holds the checkpoint's species statistics (so the server does too)
    model = apps["allegro_model"]
    assert (model.species_shift.tolist(), model.species_scale.tolist()) == \
        (pytest.approx([-3.7, -5.1]), pytest.approx([0.6, 1.4]))


def test_extxyz_gives_the_same_answers(apps):
    frames = structures()
    text = as_text(frames, "extxyz")
    r = post(apps, "allegro", {"extxyz": text})
    assert r.status_code == 200, r.text
    by_json = post(apps, "allegro", {"structures": [as_json(a) for a in frames]}).json()["data"]
    parsed = read(io.StringIO(text), format="extxyz", index=":")
    for atoms, got, other in zip(parsed, r.json()["data"], by_json):
        want = in_process(apps, atoms)
        assert same(got, want)
        # extxyz prints positions to 1e-8 A: the JSON answers differ by at most that times the
        # force constants (O(10) eV/A^2 here)
        assert got["energy"] == pytest.approx(other["energy"], abs=1e-6)
        np.testing.assert_allclose(got["forces"], other["forces"], atol=1e-6)


def test_forces_are_minus_the_energy_gradient_and_rotate_with_the_structure(apps):
    cluster = structures()[1]
    h = 1e-4
    displaced = []
    for atom, axis in ((0, 0), (4, 1), (2, 2)):
        for sign in (1, -1):
            a = cluster.copy()
            a.positions[atom, axis] += sign * h
            displaced.append(as_json(a))
    r = post(apps, "allegro", {"structures": [as_json(cluster), *displaced]})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    forces = np.array(data[0]["forces"])
    for k, (atom, axis) in enumerate(((0, 0), (4, 1), (2, 2))):
        slope = (data[1 + 2 * k]["energy"] - data[2 + 2 * k]["energy"]) / (2 * h)
        # central differences in float64: O(h^2 * E''') ~ 1e-8 plus round-off 1e-16 / h ~ 1e-12
        assert forces[atom, axis] == pytest.approx(-slope, abs=1e-6)
    rotation = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    rotated = cluster.copy()
    rotated.positions = cluster.positions @ rotation.T
    turned = post(apps, "allegro", {"structures": [as_json(rotated)]}).json()["data"][0]
    # an equivariant model: same energy, rotated forces, up to float64 round-off
    assert turned["energy"] == pytest.approx(data[0]["energy"], abs=1e-9)
    np.testing.assert_allclose(turned["forces"], forces @ rotation.T, atol=1e-9)


def test_atoms_without_neighbours_have_their_species_energy_and_no_force(apps):
    """Atoms farther apart than r_max: no edges at all, so each has energy shift[Z] (the species
    statistics of the checkpoint) and zero force; the model in-process says the same."""
    dimer = Atoms("CuNi", positions=[[0, 0, 0], [10, 0, 0]])
    r = post(apps, "allegro", {"structures": [as_json(dimer)]})
    assert r.status_code == 200, r.text
    got = r.json()["data"][0]
    assert same(got, in_process(apps, dimer))
    assert got["energy"] == pytest.approx(-3.7 + -5.1, abs=1e-6)  # float32-stored shifts
    assert got["forces"] == [[0.0, 0.0, 0.0]] * 2


def test_stress_is_the_strain_derivative_of_the_energy(apps):
    """sigma = (1 / V) dE/d(strain) (ASE's sign), checked by straining the periodic alloy."""
    alloy, h = structures()[0], 1e-5
    strained = []
    for a, b in ((0, 0), (1, 2)):
        eps = np.zeros((3, 3))
        eps[a, b] = eps[b, a] = 1.0  # a symmetric strain: a shear moves both off-diagonal entries
        for sign in (1, -1):
            s = alloy.copy()
            s.set_cell(alloy.cell.array @ (np.eye(3) + sign * h * eps), scale_atoms=True)
            strained.append(as_json(s))
    r = post(apps, "allegro", {"structures": [as_json(alloy), *strained]})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    stress, volume = np.array(data[0]["stress"]), alloy.get_volume()
    for k, (a, b) in enumerate(((0, 0), (1, 2))):
        slope = (data[1 + 2 * k]["energy"] - data[2 + 2 * k]["energy"]) / (2 * h) / volume
        # a shear strain h moves two entries: dE/dh = V (sigma_ab + sigma_ba). Central
        # differences in float64: O(h^2) truncation, round-off ~1e-16 * |E| / (h V) ~ 1e-13
        assert stress[a, b] * (1 if a == b else 2) == pytest.approx(slope, abs=1e-7)
    assert np.abs(stress).max() > 1e-4  # a strained random potential: a non-trivial stress


def crystals() -> list[Atoms]:
    alloy = bulk("Cu", "fcc", a=3.6, cubic=True)
    alloy.numbers[1] = 13
    alloy.rattle(0.03, seed=4)
    return [alloy, bulk("Ni", "hcp", a=2.5, c=4.1), bulk("Al", "bcc", a=3.2)]


def test_properties_equal_the_model_in_process(apps):
    frames = crystals()
    model = apps["matformer_model"]
    assert (float(model.target_mean), float(model.target_std)) == pytest.approx((-0.3, 2.5))
    want = matformer_predict(model, frames).tolist()
    r = post(apps, "matformer", {"crystals": [as_crystal(a) for a in frames]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["property"] == "formation_energy_per_atom" and body["units"] == "eV/atom"
    assert [d["value"] for d in body["data"]] == want  # float32 on the same kernels: to the bit
    assert [d["formula"] for d in body["data"]] == [a.get_chemical_formula() for a in frames]
    fractional = [{"species": a.get_chemical_symbols(), "cell": a.cell.array.tolist(),
                   "fractional": a.get_scaled_positions(wrap=False).tolist()} for a in frames]
    by_fractional = [d["value"] for d in post(apps, "matformer", {"crystals": fractional}).json()["data"]]
    # fractional -> Cartesian rounds in the last bit: float32 outputs agree to ~1e-6 relative
    np.testing.assert_allclose(by_fractional, want, rtol=1e-5, atol=1e-6)
    # the canonical cell: a supercell is the same crystal
    supercell = post(apps, "matformer", {"crystals": [as_crystal(frames[1].repeat((2, 1, 1)))]}).json()
    assert supercell["data"][0]["value"] == pytest.approx(want[1], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("field,fmt", [("cif", "cif"), ("poscar", "vasp"), ("extxyz", "extxyz")])
def test_properties_from_text_equal_the_model_in_process(apps, field, fmt):
    frames = crystals() if field != "poscar" else crystals()[:1]  # a POSCAR holds one crystal
    text = as_text(frames, fmt)
    r = post(apps, "matformer", {field: text})
    assert r.status_code == 200, r.text
    parsed = read(io.StringIO(text), format=fmt, index=":")
    values = [d["value"] for d in r.json()["data"]]
    assert values == matformer_predict(apps["matformer_model"], parsed).tolist()
    # the text rounds coordinates (CIF to 1e-6 of the cell): close to the JSON answers
    np.testing.assert_allclose(values, matformer_predict(apps["matformer_model"], frames).tolist(),
                               rtol=1e-4, atol=1e-4)


def _cu(n=4, **extra) -> dict:
    a = bulk("Cu", "fcc", a=3.6, cubic=True)
    return {**as_json(a if n == 4 else a.repeat((n // 4, 1, 1))), **extra}


EXTXYZ = as_text([bulk("Cu", "fcc", a=3.6, cubic=True)], "extxyz")
CELL = [[3.6, 0, 0], [0, 3.6, 0], [0, 0, 3.6]]
ALLEGRO_BAD = [  # (body, status, param, words in the message)
    (b'{"structures": [', 400, None, "malformed JSON"),
    (b"[]", 422, None, "object"),
    ({}, 422, "structures", "exactly one of structures, extxyz"),
    ({"structures": [_cu()], "extxyz": EXTXYZ}, 422, "extxyz", "exactly one"),
    ({"structures": []}, 422, "structures", "at least 1"),
    ({"structures": [_cu()] * 65}, 422, "structures", "at most 64"),
    ({"structures": "Cu"}, 422, "structures", "structures"),
    ({"structures": [{**_cu(), "species": []}]}, 422, "structures", "structures.0.species"),
    ({"structures": [{**_cu(), "species": ["Fe"] * 4}]}, 422, "structures", "Fe unknown to this model; allowed: Cu, Ni"),
    ({"structures": [{**_cu(), "species": ["Qq"] * 4}]}, 422, "structures", "'Qq' is not a chemical symbol; allowed: Cu, Ni"),
    ({"structures": [{**_cu(), "species": [29] * 4}]}, 422, "structures", "valid string"),
    ({"structures": [{**_cu(), "positions": [[0, 0, 0]] * 3}]}, 422, "structures", "4 species but 3 positions"),
    ({"structures": [{**_cu(), "positions": [[0, 0]] * 4}]}, 422, "structures", "structures.0.positions.0"),
    ({"structures": [{**_cu(), "positions": [["0", 0, 0]] * 4}]}, 422, "structures", "number"),
    (b'{"structures": [{"species": ["Cu"], "positions": [[0, 0, NaN]]}]}', 422, "structures", "finite"),
    (b'{"structures": [{"species": ["Cu"], "positions": [[0, 0, 1e999]]}]}', 422, "structures", "finite"),
    ({"structures": [{"species": ["Cu"], "positions": [[0, 0, 1e300]]}]}, 422, "structures", "within"),
    ({"structures": [_cu(cell=[[3.6, 0, 0], [7.2, 0, 0], [0, 0, 3.6]])]}, 422, "structures", "singular"),
    ({"structures": [_cu(cell=[[3.6, 0, 0], [0, 3.6, 0], [0, 0, 0.1]])]}, 422, "structures", "degenerate"),
    ({"structures": [_cu(cell=None, pbc=True)]}, 422, "structures", "needs a cell"),
    ({"structures": [_cu(cell=[[3.6, 0, 0], [0, 3.6, 0]])]}, 422, "structures", "structures.0.cell"),
    ({"structures": [_cu(pbc=[True, False])]}, 422, "structures", "structures.0.pbc"),
    ({"structures": [{"species": ["Cu", "Cu"], "positions": [[0, 0, 0], [0, 0, 0.1]]}]}, 422, "structures", "0.1 A apart"),
    ({"structures": [_cu(n=36)]}, 422, "structures", f"36 atoms; this server's limit is {MAX_ATOMS} (max_atoms)"),
    ({"extxyz": "not an xyz file"}, 422, "extxyz", "cannot read it as extxyz"),
    ({"extxyz": "2\nPBC\nCu 0 0 0\n"}, 422, "extxyz", "cannot read it as extxyz"),
    ({"extxyz": EXTXYZ.replace("Cu ", "Fe ")}, 422, "extxyz", "Fe unknown to this model"),
    ({"extxyz": EXTXYZ.replace("0.00000000 ", "nan ", 1)}, 422, "extxyz", "finite"),
    ({"extxyz": ""}, 422, "extxyz", "at least 1"),
    ({"structures": [_cu()], "model": "other"}, 404, "model", "serve-allegro"),
    ({"structures": [_cu()], "temperature": 1}, 422, "temperature", "unknown field"),
    ({"structures": [_cu(charge=1)]}, 422, "structures", "structures.0.charge: unknown field"),
    ({"structures": [{"species": ["Cu"], "positions": [[0, 0, 0]], "cell": [[1e300, 0, 0], [0, 1, 0], [0, 0, 1]],
                      "pbc": False}]}, 422, "structures", "structures.0.cell: entries must be finite"),
]
CUBIC_CIF = "\n".join([  # 10 general sites under F m -3 m's 192 operations: >= 40 atoms
    "data_big", *[f"_cell_length_{x} 30" for x in "abc"], *[f"_cell_angle_{x} 90" for x in ("alpha", "beta", "gamma")],
    "_symmetry_space_group_name_H-M 'F m -3 m'", "loop_", "_atom_site_type_symbol", "_atom_site_label",
    *[f"_atom_site_fract_{x}" for x in "xyz"], *[f"Cu Cu{i} 0.0{i}1 0.1{i}3 0.2{i}7" for i in range(10)], ""])
MATFORMER_BAD = [
    ({}, 422, "crystals", "exactly one of crystals, cif, poscar, extxyz"),
    ({"cif": "x", "poscar": "y"}, 422, "poscar", "exactly one"),
    ({"crystals": [{"species": ["Cu"], "cell": CELL}]}, 422, "crystals", "exactly one of positions"),
    ({"crystals": [{"species": ["Cu"], "cell": CELL, "positions": [[0, 0, 0]], "fractional": [[0, 0, 0]]}]},
     422, "crystals", "exactly one of positions"),
    ({"crystals": [{"species": ["Cu"], "positions": [[0, 0, 0]]}]}, 422, "crystals", "crystals.0.cell"),
    ({"crystals": [{"species": ["Fe"], "cell": CELL, "positions": [[0, 0, 0]]}]}, 422, "crystals", "allowed: Cu, Ni, Al"),
    ({"crystals": [{"species": ["Cu", "Cu"], "cell": CELL, "fractional": [[0, 0, 0]]}]}, 422, "crystals", "2 species but 1 fractional"),
    ({"crystals": [{"species": ["Cu"], "cell": [[1, 0, 0], [0, 1, 0], [1, 1, 0]], "positions": [[0, 0, 0]]}]},
     422, "crystals", "singular"),
    ({"crystals": [{"species": ["Cu"], "cell": [[3.6, 0, 0], [0, 3.6, 0], [0, 0, 0.3]], "positions": [[0, 0, 0]]}]},
     422, "crystals", "degenerate"),
    ({"crystals": [{"species": ["Cu", "Cu"], "cell": CELL, "fractional": [[0, 0, 0], [0.999999, 0, 0]]}]},
     422, "crystals", "apart"),
    ({"crystals": [{"species": ["Cu"] * 33, "cell": [[36, 0, 0], [0, 36, 0], [0, 0, 36]],
                    "fractional": [[i / 33, 0, 0] for i in range(33)]}]}, 422, "crystals", "max_atoms"),
    ({"cif": "data_broken\n_cell_length_a 3.6\n"}, 422, "cif", "cif"),
    ({"cif": CUBIC_CIF}, 422, "cif", "cif.0: 10 sites under 192 symmetry operations expand to more than this "
                                     f"server's limit of {MAX_ATOMS} atoms"),
    ({"poscar": "not a poscar"}, 422, "poscar", "cannot read it as vasp"),
    ({"extxyz": "1\n\nCu 0 0 0\n"}, 422, "extxyz", "periodic along all three"),
    (b'{"crystals": [{"species": ["Cu"], "cell": [[Infinity, 0, 0], [0, 1, 0], [0, 0, 1]], '
     b'"positions": [[0, 0, 0]]}]}',
     422, "crystals", "finite"),
]


def test_bad_input_is_a_4xx_naming_the_field_and_the_server_keeps_serving(apps):
    failures = []
    for family, table in (("allegro", ALLEGRO_BAD), ("matformer", MATFORMER_BAD)):
        for body, status, param, words in table:
            r = post(apps, family, body)
            error = r.json().get("error", {}) if r.headers.get("content-type") == "application/json" else {}
            if ((r.status_code, error.get("param")) != (status, param)
                    or words not in error.get("message", "")):
                failures.append((family, str(body)[:80], r.status_code, r.text[:300]))
    assert not failures, failures
    assert post(apps, "allegro", {"structures": [_cu()]}).status_code == 200
    assert post(apps, "matformer", {"crystals": [as_crystal(bulk("Cu", "fcc", a=3.6))]}).status_code == 200


def test_pair_census_counts_what_ase_neighbour_lists_find():
    """The census that guards the endpoints (closest pair, pairs within r_max) agrees with ASE's
    neighbour list on random structures: skewed and small cells, partial periodicity."""
    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(1, 12))
        pbc = rng.random(3) < 0.7
        cell = np.diag(rng.uniform(2.0, 6.0, 3)) + rng.uniform(-1.5, 1.5, (3, 3)) * (trial % 2)
        atoms = Atoms(numbers=[29] * n, positions=rng.uniform(-2, 8, (n, 3)), cell=cell, pbc=pbc)
        i, j, d = primitive_neighbor_list("ijd", atoms.pbc, atoms.cell.array, atoms.positions, 4.0,
                                          self_interaction=False)
        pairs, (closest, a, b) = _pair_census(atoms, 4.0, "s", "s")
        assert pairs == len(d), (trial, pairs, len(d))
        if len(d):
            assert closest == pytest.approx(d.min(), abs=1e-9)  # the same pair, up to round-off
            assert np.isclose(d[(i == a) & (j == b)], closest, atol=1e-9).any()  # (ties: either order)


def random_structures(rng: random.Random, species: list[str], n: int, periodic: bool) -> list[dict]:
    """Structures that pass the schema but test the physics guards: random species, positions
    in a few A (some atoms overlap), random and sometimes nearly singular cells."""
    out = []
    for _ in range(n):
        atoms = rng.randint(1, 6)
        cell = [[rng.uniform(-4, 4) for _ in range(3)] for _ in range(3)]
        body = {"species": [rng.choice(species) for _ in range(atoms)],
                "positions": [[rng.uniform(-3, 3) for _ in range(3)] for _ in range(atoms)],
                "cell": cell}
        if not periodic:
            body["pbc"] = rng.choice([True, False, [True, False, True]])
        out.append(body)
    return out


def test_fuzz_from_the_openapi_schema_finds_no_5xx(apps):
    statuses: dict[int, int] = {}
    rng = random.Random(0)
    for family, field, species in (("allegro", "structures", ["Cu", "Ni"]),
                                   ("matformer", "crystals", ["Cu", "Ni", "Al"])):
        spec = requests.get(apps[family] + "/openapi.json", timeout=30).json()
        path = "/v1/energy" if family == "allegro" else "/v1/properties"
        request = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        raws = list(bodies(request, spec, n=100, seed=len(family)))
        raws += [json.dumps({field: random_structures(rng, species, 2, family == "matformer")}).encode()
                 for _ in range(30)]
        for raw in raws:
            r = requests.post(apps[family] + path, data=raw, headers={"Content-Type": "application/json"},
                              timeout=60)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (family, raw[:300], r.status_code, r.text[:300])
    print(f"\nfuzz: {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}")
    assert statuses.get(200, 0) > 5 and statuses.get(422, 0) > 50  # both answers and refusals ran
