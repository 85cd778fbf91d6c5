"""Allegro: a strictly local equivariant interatomic potential ("Learning Local Equivariant
Representations for Large-Scale Atomistic Dynamics", Musaelian et al., Nat. Commun. 14, 579, 2023).

What is implemented. Every quantity lives on an ordered edge i->j (r_ij < r_max, periodic images
included) and only ever sees the environment of its *center* i:
* two-body latent  x_ij = MLP(embed(Z_i) || embed(Z_j) || B(r_ij)) * u(r_ij), with a Bessel basis
  B (trainable frequencies) and the polynomial envelope u (p = 6, smooth to second order);
* initial tensor features V_ij[c, lm] = w_ij[c, l] Y_lm(r_hat_ij), w = Linear(x_ij);
* each layer builds the center's environment Gamma_i[c, lm] = sum_k w_ik[c, l] Y_lm(r_hat_ik) /
  sqrt(avg_num_neighbors) (w from the current latent), takes the channel-wise tensor product
  V_ij (x) Gamma_i over every (l1, l2 -> l3) path (Clebsch-Gordan coefficients from e3nn), feeds
  the scalar (l3 = 0) outputs with x_ij to the latent MLP, and updates the latent by the
  normalised residual x <- (x + alpha * MLP(...) * u(r_ij)) / sqrt(1 + alpha^2); the l3 > 0
  outputs, mixed linearly across paths and channels, become the next V_ij;
* edge energies E_ij = MLP(x_ij) * u(r_ij); atom energies e_i = scale[Z_i] * sum_j E_ij /
  sqrt(avg_num_neighbors) + shift[Z_i] for *owned* atoms (zero for ghosts); forces = -dE/dx and
  the virial W = -dE/d(strain) by autograd (`energy_forces_virial`).

Built for spatial partitioning: the model takes the per-atom `owned` mask and edges whose centers
are owned; the atoms at the other end may be ghosts (images owned by another domain). Because an
owned atom's energy depends only on atoms within r_max of it, a domain holding every atom within
r_max of its owned atoms computes their energies exactly (partition.py).

Deviations from the paper / the reference `nequip-allegro`, and why:
* Only irreps of natural parity (0e, 1o, 2e, ...) are carried: the energy is a proper scalar, so
  reflections need no pseudo-tensors at this size; the reference keeps both parities optionally.
* The tensor product is the outer product V_ij (x) Gamma_i (as two 0/1 "pick" matmuls and one
  product) and one matmul with every path's e3nn `wigner_3j` block (component normalisation)
  stacked side by side, rather than e3nn's `TensorProduct` codegen or per-path einsums: the
  channel-wise ("uuu") product needs no weights, and at l_max 1-2 dense matmuls are the fastest
  form on CPU (the per-path broadcast products cost twice as much).
* The environment weights have one value per channel and per l (the reference: per channel and
  per irrep of the environment embedding, the same thing at natural parity).
* The residual coefficient alpha is a fixed hyperparameter (`residual_alpha`), as the paper's.
* Per-species scale and shift are buffers set from training-set statistics (see `recipe.py`),
  not trainable; no per-species-pair edge-energy scales.
* No ZBL / pair potential term.

Shapes: N atoms (owned and ghost), E edges, C tensor channels, D = (l_max + 1)^2 spherical
harmonic components, H latent width, S species.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from e3nn import o3
from torch import nn


@dataclass
class Config:
    """Hyperparameters of `Allegro` (the job spec's `model:` block minus `family`)."""

    species: list[str] = field(default_factory=lambda: ["Cu"])
    """Chemical symbols the model knows, in type order."""
    r_max: float = 4.5
    """Cutoff radius in Angstrom: the model is strictly local within it."""
    l_max: int = 1
    """Largest spherical-harmonic degree of the tensor features."""
    num_layers: int = 2
    """Allegro layers (tensor products + latent updates)."""
    num_channels: int = 8
    """Tensor-feature channels C."""
    latent_dim: int = 32
    """Width H of the scalar edge latent and its MLPs."""
    num_bessel: int = 8
    """Bessel radial basis functions."""
    cutoff_p: int = 6
    """Exponent p of the polynomial envelope u(r)."""
    embed_dim: int = 16
    """Species embedding width."""
    residual_alpha: float = 1.0
    """alpha in the normalised residual latent update."""
    avg_num_neighbors: float = 20.0
    """Normalises the environment sums and the per-atom sum of edge energies."""

    def __post_init__(self) -> None:
        from ase.data import atomic_numbers
        if not self.species or len(set(self.species)) != len(self.species):
            raise ValueError(f"species must be a non-empty list of distinct symbols, got {self.species}")
        unknown = [s for s in self.species if s not in atomic_numbers]
        if unknown:
            raise ValueError(f"species: {unknown} are not chemical symbols (e.g. 'Cu', 'Ni')")
        for name in ("r_max", "avg_num_neighbors"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("num_layers", "num_channels", "latent_dim", "num_bessel", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.l_max <= 3:
            raise ValueError(f"l_max must be 0, 1, 2 or 3, got {self.l_max}")
        if self.cutoff_p < 2:
            raise ValueError(f"cutoff_p must be at least 2, got {self.cutoff_p}")


def polynomial_cutoff(r: torch.Tensor, r_max: float, p: int) -> torch.Tensor:
    """The envelope u(r) (Klicpera et al., 2020): 1 at 0, zero with two derivatives at r_max."""
    x = r / r_max
    u = (1 - (p + 1) * (p + 2) / 2 * x ** p + p * (p + 2) * x ** (p + 1) - p * (p + 1) / 2 * x ** (p + 2))
    return torch.where(x < 1, u, torch.zeros_like(u))


class BesselBasis(nn.Module):
    """sqrt(2 / r_max) sin(k_n r / r_max) / r with trainable k_n, initialised to n * pi."""

    def __init__(self, r_max: float, num: int):
        super().__init__()
        self.r_max = r_max
        self.freq = nn.Parameter(torch.arange(1, num + 1, dtype=torch.get_default_dtype()) * math.pi)

    def forward(self, r_E: torch.Tensor) -> torch.Tensor:
        r = r_E[:, None]
        return math.sqrt(2 / self.r_max) * torch.sin(self.freq * r / self.r_max) / r


def mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.SiLU()]
    return nn.Sequential(*layers[:-1])


def _paths(l_max: int) -> list[tuple[int, int, int]]:
    """(l1, l2, l3) with l3 in |l1 - l2|..l1 + l2, l3 <= l_max and natural parity kept."""
    return [(l1, l2, l3) for l1 in range(l_max + 1) for l2 in range(l_max + 1)
            for l3 in range(abs(l1 - l2), min(l1 + l2, l_max) + 1) if (l1 + l2 + l3) % 2 == 0]


class Layer(nn.Module):
    """One Allegro layer: center environment, channel-wise tensor product, latent update."""

    def __init__(self, cfg: Config, last: bool):
        super().__init__()
        C, L, H = cfg.num_channels, cfg.l_max, cfg.latent_dim
        self.l_max, self.last = L, last
        self.env_weights = nn.Linear(H, C * (L + 1))
        self.paths = _paths(L) if not last else [p for p in _paths(L) if p[2] == 0]
        # The whole channel-wise product as dense matmuls: the outer product V (x) Gamma is
        # (V @ pick_1) * (Gamma @ pick_2), with 0/1 matrices that pick the (l1 m1, l2 m2) pair of
        # each of its D * D columns (exact, and far faster on CPU than a broadcast [.., D, D]
        # product), and every path's Clebsch-Gordan block (e3nn `wigner_3j`, component
        # normalisation) is stacked into one [D * D, K] matrix, its columns grouped by l3, then by
        # path (in `self.paths` order), then by m3. Float64 constants kept outside the module's
        # buffers, so .float() / .double() round trips never round them; cast when used.
        D = (L + 1) ** 2
        eye = torch.eye(D, dtype=torch.float64)
        self.pick_1 = eye.repeat_interleave(D, dim=1)  # column (i, j) takes V[i]
        self.pick_2 = eye.repeat(1, D)  # column (i, j) takes Gamma[j]
        self.n_paths = [sum(1 for p in self.paths if p[2] == l3) for l3 in range(L + 1)]
        blocks = []
        for l3 in range(L + 1):
            for l1, l2, _ in (p for p in self.paths if p[2] == l3):
                block = torch.zeros(D, D, 2 * l3 + 1, dtype=torch.float64)
                block[l1 * l1:(l1 + 1) ** 2, l2 * l2:(l2 + 1) ** 2] = (
                    o3.wigner_3j(l1, l2, l3, dtype=torch.float64) * math.sqrt(2 * l3 + 1))
                blocks.append(block.reshape(D * D, 2 * l3 + 1))
        cg = torch.cat(blocks, dim=1)
        used = cg.abs().sum(dim=1) > 0  # (l1 m1, l2 m2) pairs no kept path reads are never formed
        self.pick_1, self.pick_2, self.cg = self.pick_1[:, used], self.pick_2[:, used], cg[used]
        n_scalar = sum(1 for p in self.paths if p[2] == 0)
        self.latent = mlp([H + C * n_scalar, H, H])
        if not last:  # per output l: mix (paths x channels) -> channels
            self.mix = nn.ParameterList()
            for l3 in range(L + 1):
                n = sum(1 for p in self.paths if p[2] == l3)
                self.mix.append(nn.Parameter(torch.randn(n * C, C) / math.sqrt(n * C)))

    def forward(self, x_EH, V_ECD, Y_ED, center_E, n_atoms, u_E, cfg: Config):
        C, L = cfg.num_channels, self.l_max
        w_ECL = self.env_weights(x_EH).view(-1, C, L + 1)
        env_ECD = _per_l(w_ECL, Y_ED, L)
        gamma_NCD = torch.zeros(n_atoms, C, env_ECD.shape[-1], dtype=x_EH.dtype, device=x_EH.device)
        gamma_NCD = gamma_NCD.index_add(0, center_E, env_ECD) / math.sqrt(cfg.avg_num_neighbors)
        gamma_ECD = gamma_NCD[center_E]

        E, D = V_ECD.shape[0], V_ECD.shape[2]
        const = [m.to(dtype=V_ECD.dtype, device=V_ECD.device) for m in (self.pick_1, self.pick_2, self.cg)]
        outer = (V_ECD.reshape(E * C, D) @ const[0]) * (gamma_ECD.reshape(E * C, D) @ const[1])  # [E C, <= D D]
        tp = (outer @ const[2]).view(E, C, self.cg.shape[1])  # [E, C, K]: by l3, then path, then m3
        groups = tp.split([n * (2 * l3 + 1) for l3, n in enumerate(self.n_paths)], dim=2)
        scalars = groups[0].transpose(1, 2).reshape(E, self.n_paths[0] * C)  # [E, paths * C], path-major
        x_new = self.latent(torch.cat([x_EH, scalars], dim=1)) * u_E[:, None]
        alpha = cfg.residual_alpha
        x_EH = (x_EH + alpha * x_new) / math.sqrt(1 + alpha * alpha)
        if self.last:
            return x_EH, None
        parts = []
        for l3, (n, group) in enumerate(zip(self.n_paths, groups)):  # mix (paths x channels) -> channels
            M = 2 * l3 + 1
            z = group.reshape(E, C, n, M).permute(0, 3, 2, 1).reshape(E * M, n * C)
            parts.append((z @ self.mix[l3]).view(E, M, C).transpose(1, 2))
        return x_EH, torch.cat(parts, dim=2)


def _per_l(w_ECL: torch.Tensor, Y_ED: torch.Tensor, l_max: int) -> torch.Tensor:
    """w[e, c, l] * Y[e, lm]: one weight per channel and degree, broadcast over m."""
    reps = torch.tensor([2 * l + 1 for l in range(l_max + 1)], device=w_ECL.device)
    return w_ECL.repeat_interleave(reps, dim=2) * Y_ED[:, None, :]


class Allegro(nn.Module):
    """Per-atom energies of owned atoms from edges centred on them (see the module docstring)."""

    def __init__(self, cfg: Config):
        super().__init__()
        from ase.data import atomic_numbers
        self.cfg = cfg
        S, H, C, L = len(cfg.species), cfg.latent_dim, cfg.num_channels, cfg.l_max
        type_of_z = torch.full((119,), -1, dtype=torch.long)
        for t, s in enumerate(cfg.species):
            type_of_z[atomic_numbers[s]] = t
        self.register_buffer("type_of_z", type_of_z, persistent=False)
        self.embed = nn.Embedding(S, cfg.embed_dim)
        self.bessel = BesselBasis(cfg.r_max, cfg.num_bessel)
        self.two_body = mlp([2 * cfg.embed_dim + cfg.num_bessel, H, H])
        self.initial_weights = nn.Linear(H, C * (L + 1))
        self.layers = nn.ModuleList(Layer(cfg, last=(k == cfg.num_layers - 1)) for k in range(cfg.num_layers))
        self.edge_energy = mlp([H, H, 1])
        self.register_buffer("species_shift", torch.zeros(S))
        self.register_buffer("species_scale", torch.ones(S))

    def types(self, numbers_N: torch.Tensor) -> torch.Tensor:
        """Type indices of atomic numbers; a clear error for an element the model does not know."""
        t = self.type_of_z[numbers_N]
        if bool((t < 0).any()):
            bad = sorted(set(numbers_N[t < 0].tolist()))
            raise ValueError(f"atomic numbers {bad} are not among the model's species {self.cfg.species}")
        return t

    def forward(self, numbers_N: torch.Tensor, edge_index_2E: torch.Tensor, edge_vec_E3: torch.Tensor,
                owned_N: torch.Tensor) -> torch.Tensor:
        """Energies [N] of owned atoms (0 for ghosts). Every edge's center (row 0) must be owned."""
        cfg = self.cfg
        n_atoms = numbers_N.shape[0]
        t_N = self.types(numbers_N)
        center_E, neighbor_E = edge_index_2E[0], edge_index_2E[1]
        r_E = edge_vec_E3.norm(dim=1)
        u_E = polynomial_cutoff(r_E, cfg.r_max, cfg.cutoff_p)
        Y_ED = o3.spherical_harmonics(list(range(cfg.l_max + 1)), edge_vec_E3, normalize=True,
                                      normalization="component")
        emb = self.embed(t_N)
        x_EH = self.two_body(torch.cat([emb[center_E], emb[neighbor_E], self.bessel(r_E)], dim=1)) * u_E[:, None]
        w_ECL = self.initial_weights(x_EH).view(-1, cfg.num_channels, cfg.l_max + 1)
        V_ECD = _per_l(w_ECL, Y_ED, cfg.l_max)
        for layer in self.layers:
            x_EH, V_ECD = layer(x_EH, V_ECD, Y_ED, center_E, n_atoms, u_E, cfg)
        e_E = self.edge_energy(x_EH).squeeze(1) * u_E / math.sqrt(cfg.avg_num_neighbors)
        e_N = torch.zeros(n_atoms, dtype=e_E.dtype, device=e_E.device).index_add(0, center_E, e_E)
        owned = owned_N.to(e_N.dtype)
        return (self.species_scale[t_N].to(e_N.dtype) * e_N + self.species_shift[t_N].to(e_N.dtype)) * owned


def energy_forces_virial(model: Allegro, numbers_N, positions_N3, edge_index_2E, edge_shift_E3, owned_N,
                         graph_of_N=None, n_graphs: int = 1, training: bool = False,
                         max_edges: int | None = None) -> dict[str, torch.Tensor]:
    """Energies, forces on every atom (owned and ghost) and the virial by autograd.

    `edge_shift_E3` is the periodic image offset S_ij @ cell of each edge, so the edge vector is
    r_ij = x_j - x_i + shift. Everything comes from g_ij = dE/dr_ij: forces F_i = sum_j g_ij -
    sum_j g_ji (= -dE/dx_i), and the virial W = -sum_ij r_ij (x) g_ij per structure, which is
    -dE/d(strain) at zero strain (the stress in ASE's convention is -W / volume). `graph_of_N`
    assigns atoms to the `n_graphs` structures of a batch (default: one structure).

    Because an atom's energy depends only on its own edges, the centers are evaluated in blocks
    of about `max_edges` edges (default 8192 at inference; one block while `training`, which needs
    a single forward through a DDP wrapper and forces that keep their graph): each block's
    forward and backward stay in cache and the peak memory stays bounded, which is what keeps the
    time per atom flat from 10^2 to 10^4+ atoms. Blocking changes only the summation order.
    Returns atom_energy [N], energy [G], forces [N, 3], virial [G, 3, 3].
    """
    dtype, device = positions_N3.dtype, positions_N3.device
    n_atoms = numbers_N.shape[0]
    if graph_of_N is None:
        graph_of_N = torch.zeros(n_atoms, dtype=torch.long, device=device)
    center, neighbor = edge_index_2E[0], edge_index_2E[1]
    if center.numel() and bool((center[1:] < center[:-1]).any()):  # blocks need edges grouped by center
        order = torch.argsort(center, stable=True)
        center, neighbor, edge_shift_E3 = center[order], neighbor[order], edge_shift_E3[order]
    first_edge = torch.searchsorted(center, torch.arange(n_atoms + 1, device=device))  # [N + 1]
    if training:
        bounds = [0, n_atoms]
    else:
        size = 8192 if max_edges is None else max_edges
        if size < 1:
            raise ValueError(f"max_edges must be at least 1, got {max_edges}")
        block = (first_edge[:-1] // size).cpu()
        bounds = [0, *(torch.nonzero(block[1:] != block[:-1]).flatten() + 1).tolist(), n_atoms]
    energies, forces = [], torch.zeros(n_atoms, 3, dtype=dtype, device=device)
    virial = torch.zeros(n_graphs, 3, 3, dtype=dtype, device=device)
    for a, b in zip(bounds[:-1], bounds[1:]):
        if a == b:
            continue
        e0, e1 = int(first_edge[a]), int(first_edge[b])
        c_E, n_E = center[e0:e1], neighbor[e0:e1]
        # the block as a graph of its own: centers a..b-1 first, then each distinct neighbour once
        # as a ghost (the model reads only its species), so its size does not grow with N
        ghosts, local_n_E = torch.unique(n_E, return_inverse=True)
        numbers = torch.cat([numbers_N[a:b], numbers_N[ghosts]])
        owned = torch.cat([owned_N[a:b], torch.zeros(len(ghosts), dtype=owned_N.dtype, device=device)])
        local_edges = torch.stack([c_E - a, local_n_E + (b - a)])
        vec = positions_N3[n_E] - positions_N3[c_E] + edge_shift_E3[e0:e1]
        if not vec.requires_grad:
            vec.requires_grad_(True)
        e_local = model(numbers, local_edges, vec, owned)[:b - a]
        energies.append(e_local if training else e_local.detach())
        if e1 == e0:
            continue
        (g_E3,) = torch.autograd.grad(e_local.sum(), vec, create_graph=training)
        w_E33 = -vec[:, :, None] * g_E3[:, None, :]
        if training:  # out of place, so the loss differentiates through forces and virial
            forces = forces.index_add(0, c_E, g_E3).index_add(0, n_E, -g_E3)
            virial = virial.index_add(0, graph_of_N[c_E], w_E33)
        else:
            forces.index_add_(0, c_E, g_E3.detach())
            forces.index_add_(0, n_E, -g_E3.detach())
            virial.index_add_(0, graph_of_N[c_E], w_E33.detach())
    atom_energy = torch.cat(energies) if energies else torch.zeros(0, dtype=dtype, device=device)
    energy = torch.zeros(n_graphs, dtype=dtype, device=device).index_add(0, graph_of_N, atom_energy)
    return {"atom_energy": atom_energy, "energy": energy, "forces": forces, "virial": virial}
