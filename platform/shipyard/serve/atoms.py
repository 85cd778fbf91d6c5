"""Endpoints of the atomistic families: `/v1/energy` (Allegro) and `/v1/properties` (Matformer).

POST /v1/energy (an Allegro interatomic potential)
    request   exactly one of
                structures  1 .. 64 objects {species: ["Cu", ...], positions: [[x, y, z], ...] (A),
                            cell: 3x3 rows (A) or null, pbc: bool or [bool, bool, bool] (default:
                            periodic in 3D when a cell is given, else not periodic)}
                extxyz      an extended-XYZ text, one structure per frame (read with ASE from the
                            string; `Lattice` and `pbc` from the comment line)
              and model (optional: the served id).
    response  {object: "list", model, units: {energy: "eV", forces: "eV/A", stress: "eV/A^3"},
              data: [{index, n_atoms, pbc, energy, forces: [[fx, fy, fz], ...] per atom, stress:
              3x3 (ASE's sign: -virial / volume) or null unless periodic in all three directions}]}

POST /v1/properties (a Matformer crystal-property model)
    request   exactly one of
                crystals    1 .. 64 objects {species, cell: 3x3 rows (A), and exactly one of
                            positions (Cartesian, A) or fractional (in cell coordinates)}
                cif         a CIF text (every data block is a crystal)
                poscar      a VASP POSCAR / CONTCAR text (one crystal)
                extxyz      an extended-XYZ text whose frames carry a Lattice, periodic in 3D
              and model (optional).
    response  {object: "list", model, property: the job's data.target_key, units: "eV/atom" for
              the EMT targets (else null: whatever the training targets were in), data: [{index,
              n_atoms, formula, value}]}

How a structure becomes an answer (the family's own code, so a reply equals the model called
in-process: the tests compare them over HTTP):
* Allegro: `shipyard_models.allegro.predict`, what `AllegroCalculator` runs: Allegro's neighbour
  list (periodic images within r_max), then `energy_forces_virial` (forces = -dE/dx and the
  virial by autograd). The replica runs it in float64, as `AllegroCalculator` does: the float32
  weights of a checkpoint are upcast exactly, once.
* Matformer: the steps of `shipyard_models.matformer.predict`, one crystal at a time up to the
  graph (so an error names its crystal): `crystal_graph` (canonical primitive Niggli cell, then
  the periodic multigraph the model was trained with), `flat_batch`, the model, and
  `denormalise` (the training split's target mean / std, stored in the checkpoint).

Checks, each a 422 naming the field (`param` is the top-level field; the message gives the path,
e.g. `structures.2.species`) and what is allowed:
* the species must be ones the model knows: Allegro's `species`; Matformer's training elements
  (`data.elements`) when it was trained on generated crystals, else atomic numbers 1 .. max_z;
* species and positions of equal length, at least one atom and at most the server's
  `max_atoms` (`ServeOptions.max_atoms`), at most 64 structures a request;
* coordinates and cell entries finite and within +-1e4 A;
* a periodic structure needs a non-singular cell whose lattice planes along each periodic
  direction are at least 0.5 A apart (a degenerate cell would have every atom next to its own
  images, and the neighbour search cost grows without bound as the planes close up);
* no two atoms (periodic images included) closer than 0.5 A (shorter than any chemical bond: the
  radial bases diverge at 0, and overlapping atoms mean a malformed structure);
* at most 2e7 atom pairs x periodic images for the distance census that checks the above (a
  brute-force count over the images that can be that close: bounded work whatever the cell);
* Allegro: at most 256 neighbours per atom on average within r_max (counted by the same census
  before the model's neighbour list runs; bounds one request's memory); Matformer: crystals
  periodic in 3D;
* texts that ASE cannot read (the reader's message is quoted); a CIF whose symmetry expansion
  must exceed max_atoms is refused before ASE expands it.
"""
from __future__ import annotations

import io
from typing import Annotated, Callable

import numpy as np
import torch
from ase import Atoms
from ase.data import atomic_numbers, chemical_symbols
from pydantic import Field

from .protocol import ApiError, Strict

MAX_STRUCTURES = 64
"""Structures (crystals) one request may carry."""
MIN_DISTANCE = 0.5
"""A: the closest two atoms (or an atom and an image) may be, and the smallest spacing of lattice
planes along a periodic direction."""
MAX_COORDINATE = 1e4
"""A: the largest absolute value of a coordinate or a cell entry."""
MAX_NEIGHBORS_PER_ATOM = 256
"""Allegro: the most edges per atom, on average, within r_max."""
MAX_PAIR_CHECKS = 20_000_000
"""Atom pairs times periodic images the neighbour census may look at for one structure."""
CELL_VOLUME_EPS = 1e-6
"""A cell is singular when |det| < CELL_VOLUME_EPS * (largest entry)^3."""
ENERGY_SUMMARY = "Energy, forces and stress of structures (JSON or extxyz)"
PROPERTIES_SUMMARY = "The model's property of crystals (JSON, CIF, POSCAR or extxyz)"

Vec3 = Annotated[list[float], Field(min_length=3, max_length=3)]
Cell = Annotated[list[Vec3], Field(min_length=3, max_length=3)]
Symbols = Annotated[list[str], Field(min_length=1)]
Text = Annotated[str, Field(min_length=1)]


class Structure(Strict):
    """One structure for /v1/energy."""

    species: Symbols = Field(description="chemical symbols, one per atom, among the model's "
                                         "species (/v1/models: config.species)")
    positions: list[Vec3] = Field(description="Cartesian positions [x, y, z] in A, one per atom")
    cell: Cell | None = Field(None, description="cell vectors as 3 rows [x, y, z] in A; needed "
                                                "when any direction is periodic")
    pbc: bool | Annotated[list[bool], Field(min_length=3, max_length=3)] | None = Field(
        None, description="periodic along each cell vector: a bool for all three or 3 bools; "
                          "default: periodic in 3D when a cell is given, else not periodic")


class EnergyRequest(Strict):
    """POST /v1/energy: energy, forces and stress of structures (exactly one of structures,
    extxyz)."""

    structures: Annotated[list[Structure], Field(min_length=1, max_length=MAX_STRUCTURES)] | None = Field(
        None, description=f"1 .. {MAX_STRUCTURES} structures as JSON")
    extxyz: Text | None = Field(None, description=f"an extended-XYZ text, 1 .. {MAX_STRUCTURES} "
                                                  "frames")
    model: str | None = Field(None, description="if given, the served model's id (/v1/models)")


class Crystal(Strict):
    """One crystal for /v1/properties (periodic in 3D)."""

    species: Symbols = Field(description="chemical symbols, one per atom")
    cell: Cell = Field(description="cell vectors as 3 rows [x, y, z] in A")
    positions: list[Vec3] | None = Field(None, description="Cartesian positions in A, one per "
                                                           "atom (or give fractional)")
    fractional: list[Vec3] | None = Field(None, description="positions in cell coordinates, one "
                                                            "per atom (or give positions)")


class PropertiesRequest(Strict):
    """POST /v1/properties: the model's property of crystals (exactly one of crystals, cif,
    poscar, extxyz)."""

    crystals: Annotated[list[Crystal], Field(min_length=1, max_length=MAX_STRUCTURES)] | None = Field(
        None, description=f"1 .. {MAX_STRUCTURES} crystals as JSON")
    cif: Text | None = Field(None, description="a CIF text; each data block is a crystal")
    poscar: Text | None = Field(None, description="a VASP POSCAR / CONTCAR text (one crystal)")
    extxyz: Text | None = Field(None, description="an extended-XYZ text; each frame a crystal "
                                                  "with a Lattice")
    model: str | None = Field(None, description="if given, the served model's id (/v1/models)")


# ---- /v1/energy ---------------------------------------------------------------------------

def energy(served, req: EnergyRequest) -> dict:
    """Energy (eV), forces (eV/A) and, for 3D-periodic structures, stress (eV/A^3) per structure."""
    from shipyard_models.allegro import predict

    known = [atomic_numbers[s] for s in served.spec.model.species]
    field_, structures = _structures(served, req, ("structures", "extxyz"), _from_structure, "extxyz", known)
    model, r_max = served.model, served.spec.model.r_max
    data = []
    for i, (where, atoms) in enumerate(structures):
        edges = _check(served, atoms, where, field_, known, cutoff=r_max)
        n = len(atoms)
        if edges > MAX_NEIGHBORS_PER_ATOM * n:
            raise ApiError(422, f"{where}: {edges} neighbour pairs within r_max = {r_max} A "
                                f"for {n} atoms; at most {MAX_NEIGHBORS_PER_ATOM} per atom on average "
                                f"(a structure this dense is outside what the model describes)", field_)
        out = predict(model, atoms.positions, atoms.numbers, atoms.cell.array, atoms.pbc, torch.float64)
        stress = None
        if atoms.pbc.all():
            stress = (-out["virial"] / atoms.get_volume()).tolist()
        values = [out["energy"], out["forces"], stress if stress is not None else 0.0]
        if not all(np.isfinite(v).all() for v in values):
            raise ApiError(422, f"{where}: the model's prediction is not finite for this structure",
                           field_)
        data.append({"index": i, "n_atoms": n, "pbc": atoms.pbc.tolist(), "energy": out["energy"],
                     "forces": out["forces"].tolist(), "stress": stress})
    return {"object": "list", "model": served.model_id,
            "units": {"energy": "eV", "forces": "eV/A", "stress": "eV/A^3"}, "data": data}


def prepare_energy(served) -> None:
    """At load: the served Allegro in float64, as `AllegroCalculator` runs it (float32 -> float64
    is exact)."""
    served.model.to(torch.float64)  # in place: the float32 copy is not kept


def describe_energy(served) -> dict:
    """What /v1/models adds for an Allegro: species, cutoff and the request limits."""
    cfg = served.spec.model
    return {"species": list(cfg.species), "r_max": cfg.r_max, "dtype": "float64",
            "max_atoms": served.options.max_atoms, "max_structures": MAX_STRUCTURES}


def _from_structure(s: Structure, where: str, field_: str, known: list[int]) -> Atoms:
    numbers = _numbers(s.species, where, field_, known)
    if len(s.positions) != len(numbers):
        raise ApiError(422, f"{where}: {len(numbers)} species but {len(s.positions)} positions "
                            "(one position per atom)", field_)
    pbc = [s.cell is not None] * 3 if s.pbc is None else [s.pbc] * 3 if isinstance(s.pbc, bool) else s.pbc
    if any(pbc) and s.cell is None:
        raise ApiError(422, f"{where}.cell: a structure periodic along {pbc} needs a cell", field_)
    return Atoms(numbers=numbers, positions=s.positions, pbc=pbc,
                 cell=s.cell if s.cell is not None else np.zeros((3, 3)))


# ---- /v1/properties -----------------------------------------------------------------------

TARGET_UNITS = {"formation_energy_per_atom": "eV/atom", "energy_per_atom": "eV/atom", "energy": "eV"}


def properties(served, req: PropertiesRequest) -> dict:
    """The model's target property per crystal, in the target's units."""
    from shipyard_models.matformer import crystal_graph, flat_batch

    known = _known_species(served)
    field_, crystals = _structures(served, req, ("crystals", "cif", "poscar", "extxyz"),
                                   _from_crystal, {"cif": "cif", "poscar": "vasp", "extxyz": "extxyz"},
                                   known)
    model, cfg, data_cfg = served.model, served.spec.model, served.spec.data
    graphs = []
    for where, atoms in crystals:
        if not atoms.pbc.all():
            raise ApiError(422, f"{where}: a crystal must be periodic along all three cell vectors "
                                f"(pbc {atoms.pbc.tolist()}; extxyz needs a Lattice)", field_)
        _check(served, atoms, where, field_, known)
        try:
            graphs.append(crystal_graph(atoms, cfg))
        except (ValueError, RuntimeError, AssertionError, np.linalg.LinAlgError) as e:
            # canonicalize / periodic_graph refuse cells and structures they cannot reduce
            raise ApiError(422, f"{where}: cannot build its crystal graph: {e}", field_) from None
    dtype = next(model.parameters()).dtype
    with torch.no_grad():  # `shipyard_models.matformer.predict`, with the graphs built above
        values = model.denormalise(model(flat_batch(graphs, dtype))).tolist()
    for (where, _), value in zip(crystals, values):
        if not np.isfinite(value):
            raise ApiError(422, f"{where}: the model's prediction is not finite", field_)
    key = data_cfg.target_key
    return {"object": "list", "model": served.model_id, "property": key,
            "units": TARGET_UNITS.get(key), "data": [
                {"index": i, "n_atoms": len(a), "formula": a.get_chemical_formula(), "value": v}
                for i, ((_, a), v) in enumerate(zip(crystals, values))]}


def describe_properties(served) -> dict:
    """What /v1/models adds for a Matformer: the property, its units, the species and limits."""
    key = served.spec.data.target_key
    return {"property": key, "units": TARGET_UNITS.get(key),
            "species": [chemical_symbols[z] for z in _known_species(served)],
            "max_atoms": served.options.max_atoms, "max_structures": MAX_STRUCTURES}


def _known_species(served) -> list[int]:
    """Matformer's training elements for generated data; else every number its embedding takes."""
    if served.spec.data.source == "generated":
        return [atomic_numbers[s] for s in served.spec.data.elements]
    return list(range(1, served.spec.model.max_z + 1))


def _from_crystal(c: Crystal, where: str, field_: str, known: list[int]) -> Atoms:
    numbers = _numbers(c.species, where, field_, known)
    if (c.positions is None) == (c.fractional is None):
        raise ApiError(422, f"{where}: give exactly one of positions (Cartesian, A) or fractional "
                            "(cell coordinates)", field_)
    coords = c.positions if c.positions is not None else c.fractional
    name = "positions" if c.positions is not None else "fractional"
    if len(coords) != len(numbers):
        raise ApiError(422, f"{where}: {len(numbers)} species but {len(coords)} {name} (one per "
                            "atom)", field_)
    _check_cell(np.asarray(c.cell, dtype=np.float64), [True] * 3, where, field_)
    if c.positions is not None:
        return Atoms(numbers=numbers, positions=coords, cell=c.cell, pbc=True)
    return Atoms(numbers=numbers, scaled_positions=coords, cell=c.cell, pbc=True)


# ---- shared -------------------------------------------------------------------------------

def _structures(served, req, fields: tuple[str, ...], from_json: Callable, formats,
                known: list[int]) -> tuple[str, list]:
    """(the field used, [(where, Atoms)]) from exactly one of the request's input fields."""
    given = [f for f in fields if getattr(req, f) is not None]
    if len(given) != 1:
        raise ApiError(422, f"give exactly one of {', '.join(fields)} (got "
                            f"{', '.join(given) if given else 'none'})", given[1] if given else fields[0])
    field_ = given[0]
    value = getattr(req, field_)
    if field_ == fields[0]:
        return field_, [(f"{field_}.{i}", from_json(s, f"{field_}.{i}", field_, known))
                        for i, s in enumerate(value)]
    fmt = formats if isinstance(formats, str) else formats[field_]
    from ase.io import read
    try:  # a text from the network: any failure of the reader is the text's
        if fmt == "cif":
            _cif_size_guard(value, served.options.max_atoms, field_)
        frames = read(io.StringIO(value), format=fmt, index=":")
    except ApiError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ApiError(422, f"{field_}: cannot read it as {fmt}: {type(e).__name__}: "
                            f"{str(e)[:200]}", field_) from None
    if not frames:
        raise ApiError(422, f"{field_}: no structure in the text", field_)
    if len(frames) > MAX_STRUCTURES:
        raise ApiError(422, f"{field_}: {len(frames)} structures; at most {MAX_STRUCTURES} a "
                            "request", field_)
    return field_, [(f"{field_}.{i}", a) for i, a in enumerate(frames)]  # .i: the i-th frame


def _cif_size_guard(text: str, max_atoms: int, field_: str) -> None:
    """Refuse a CIF whose symmetry expansion must exceed `max_atoms`, before ASE expands it (a
    64 kB CIF of general positions in a cubic group expands to ~1e5 atoms, for tens of seconds).
    A site's orbit has at least (operations / 48) atoms: 48 is the largest site-symmetry order."""
    from ase.io.cif import parse_cif
    for k, block in enumerate(parse_cif(io.StringIO(text))):
        if not block.has_structure():
            continue
        sites = len(block.get_symbols())
        operations = len(block.get_spacegroup(True).get_symop())
        if sites * operations / 48 > max_atoms:
            raise ApiError(422, f"{field_}.{k}: {sites} sites under {operations} symmetry operations "
                                f"expand to more than this server's limit of {max_atoms} atoms "
                                "(max_atoms)", field_)


def _numbers(symbols: list[str], where: str, field_: str, known: list[int]) -> list[int]:
    unknown = [s for s in symbols if s not in atomic_numbers or atomic_numbers[s] == 0]
    if unknown:
        raise ApiError(422, f"{where}.species: {unknown[0]!r} is not a chemical symbol; allowed: "
                            f"{_allowed(known)}", field_)
    return [atomic_numbers[s] for s in symbols]


def _allowed(known: list[int]) -> str:
    allowed = [chemical_symbols[z] for z in known]
    if len(allowed) <= 20:
        return ", ".join(allowed)
    return f"{allowed[0]} .. {allowed[-1]} (atomic numbers {known[0]} .. {known[-1]})"


def _check(served, atoms: Atoms, where: str, field_: str, known: list[int],
           cutoff: float = MIN_DISTANCE) -> int:
    """What every structure must satisfy before it reaches the model (see the module docstring);
    returns the number of ordered atom pairs (images included) closer than `cutoff`."""
    n, limit = len(atoms), served.options.max_atoms
    if n == 0:
        raise ApiError(422, f"{where}: an empty structure (at least one atom)", field_)
    if n > limit:
        raise ApiError(422, f"{where}: {n} atoms; this server's limit is {limit} (max_atoms)", field_)
    foreign = sorted(set(atoms.numbers.tolist()) - set(known))
    if foreign:
        names = [chemical_symbols[z] if 0 <= z < len(chemical_symbols) else str(z) for z in foreign]
        raise ApiError(422, f"{where}.species: {', '.join(names)} unknown to this model; allowed: "
                            f"{_allowed(known)}", field_)
    positions = atoms.positions
    if not np.isfinite(positions).all() or np.abs(positions).max() > MAX_COORDINATE:
        raise ApiError(422, f"{where}.positions: coordinates must be finite and within "
                            f"+-{MAX_COORDINATE:g} A", field_)
    pbc, cell = atoms.pbc.tolist(), atoms.cell.array
    if any(pbc):
        _check_cell(cell, pbc, where, field_)
    elif not np.isfinite(cell).all() or np.abs(cell).max() > MAX_COORDINATE:  # unused, still checked
        raise ApiError(422, f"{where}.cell: entries must be finite and within +-{MAX_COORDINATE:g} A",
                       field_)
    pairs, (d, i, j) = _pair_census(atoms, max(cutoff, MIN_DISTANCE), where, field_)
    if d < MIN_DISTANCE:
        raise ApiError(422, f"{where}.positions: atoms {i} and {j}{' (an image)' if i == j else ''} "
                            f"are {d:.3g} A apart; at least {MIN_DISTANCE} A allowed", field_)
    return pairs


def _pair_census(atoms: Atoms, cutoff: float, where: str, field_: str
                 ) -> tuple[int, tuple[float, int, int]]:
    """Ordered pairs i -> j (periodic images included, an atom and itself excluded) closer than
    `cutoff`, and the closest pair (distance, i, j), by brute force over the images that can be
    that close: numbers only, bounded work, whatever the structure (ASE's binned neighbour list
    can take seconds on small dense cells before any check could refuse them).

    With positions wrapped into the cell along periodic directions, a pair closer than `cutoff`
    has |image_k| <= ceil(cutoff / spacing_k) (spacing_k: of the lattice planes along cell vector
    k), so those images suffice."""
    pbc = atoms.pbc
    n = len(atoms)
    if pbc.any():
        cell = atoms.cell.array
        frac = atoms.positions @ np.linalg.inv(cell)
        frac[:, pbc] -= np.floor(frac[:, pbc])
        positions = frac @ cell
        spacing = 1.0 / np.linalg.norm(np.linalg.inv(cell), axis=0)
        reach = [int(np.ceil(cutoff / spacing[k])) if pbc[k] else 0 for k in range(3)]
        grid = np.stack(np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij"), -1)
        offsets = grid.reshape(-1, 3) @ cell
    else:
        positions, offsets = atoms.positions, np.zeros((1, 3))
    m = len(offsets)
    if n * n * m > MAX_PAIR_CHECKS:
        raise ApiError(422, f"{where}: {n} atoms with {m} periodic images each within {cutoff:g} A "
                            f"need {n * n * m:.3g} distance checks; at most {MAX_PAIR_CHECKS:.3g} "
                            "(fewer atoms or a larger cell)", field_)
    zero = int(np.flatnonzero((offsets == 0).all(1))[0])
    pairs, closest = 0, (np.inf, 0, 0)
    rows = max(1, 1_000_000 // (n * m))
    for start in range(0, n, rows):
        r = np.arange(start, min(start + rows, n))
        vec = positions[None, :, None, :] + offsets[None, None] - positions[r, None, None, :]
        dist = np.linalg.norm(vec, axis=-1)  # [rows, n, m]
        dist[np.arange(len(r)), r, zero] = np.inf  # not its own neighbour
        pairs += int((dist < cutoff).sum())
        k = int(np.argmin(dist))
        if dist.flat[k] < closest[0]:
            a, b, _ = np.unravel_index(k, dist.shape)
            closest = (float(dist.flat[k]), int(r[a]), int(b))
    return pairs, closest


def _check_cell(cell: np.ndarray, pbc: list[bool], where: str, field_: str) -> None:
    if not np.isfinite(cell).all() or np.abs(cell).max() > MAX_COORDINATE:
        raise ApiError(422, f"{where}.cell: entries must be finite and within +-{MAX_COORDINATE:g} A",
                       field_)
    scale = float(np.abs(cell).max())
    volume = abs(float(np.linalg.det(cell)))
    if scale == 0 or volume < CELL_VOLUME_EPS * scale ** 3:
        raise ApiError(422, f"{where}.cell: singular (volume {volume:.3g} A^3); the three cell "
                            "vectors must be linearly independent", field_)
    spacing = 1.0 / np.linalg.norm(np.linalg.inv(cell), axis=0)  # lattice-plane spacing per vector
    thin = [k for k in range(3) if pbc[k] and spacing[k] < MIN_DISTANCE]
    if thin:
        raise ApiError(422, f"{where}.cell: lattice planes along periodic cell vector {thin[0]} are "
                            f"{spacing[thin[0]]:.3g} A apart; at least {MIN_DISTANCE} A allowed "
                            "(a degenerate cell)", field_)
