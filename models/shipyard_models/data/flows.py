"""Two-dimensional transient flows on the periodic unit square, generated here.

* `NavierStokes`: a pseudo-spectral solver of the incompressible Navier-Stokes equations in
  vorticity form (the setting of the FNO paper, Li et al., 2021, arXiv:2010.08895, Sec. 5.3),

      d(omega)/dt + (u + U) . grad(omega) = nu * lap(omega) + f(x, y),
      u = (d psi/dy, -d psi/dx),   -lap(psi) = omega,   div u = 0,

  with viscosity `nu`, an optional uniform background velocity U, and FNO's forcing
  f = amplitude * (sin(2 pi (x + y)) + cos(2 pi (x + y))). The linear part (diffusion and the
  background advection) is integrated exactly by an integrating factor, the nonlinear part by
  classical RK4 (Lawson's integrating-factor RK4); products are dealiased by the 2/3 rule, so the
  discrete system is a Galerkin truncation that conserves energy and enstrophy when nu = f = 0
  (what the tests check, up to the time-stepping error).
* `advection_diffusion`: the analytic case. A band-limited scalar field moved by a uniform
  velocity U and diffused with diffusivity kappa is known exactly at any point and time:
  c(x, t) = sum_k c_k exp(-kappa |k|^2 t) exp(i k . (x - U t)).

Any snapshot is a truncated Fourier series, so `evaluate_at` gives its exact value at arbitrary
points: inputs and queries of a model can be irregular point clouds of any size and density,
sampled by `sample_points`. `load_trajectories` simulates a dataset once and caches it as
safetensors under the given folder (the platform passes `.shipyard/data`).

Conventions: grids are indexed [..., iy, ix] with x = ix / G, y = iy / G; points are (x, y)
pairs in [0, 1)^2. Shapes: B trajectories, T snapshots, G grid size, N points.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
KINDS = ("navier-stokes", "advection-diffusion")


def wavenumbers(grid: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Angular wavenumbers (kx [1, G//2+1], ky [G, 1]) of an rfft2 over the unit square."""
    kx = 2 * math.pi * torch.fft.rfftfreq(grid, 1.0 / grid, dtype=dtype)
    ky = 2 * math.pi * torch.fft.fftfreq(grid, 1.0 / grid, dtype=dtype)
    return kx[None, :], ky[:, None]


def dealias_mask(grid: int) -> torch.Tensor:
    """The 2/3 rule on an rfft2 layout: keep integer frequencies |m| < G/3 in both directions."""
    mx = torch.fft.rfftfreq(grid, 1.0 / grid).abs()[None, :]
    my = torch.fft.fftfreq(grid, 1.0 / grid).abs()[:, None]
    return (mx < grid / 3) & (my < grid / 3)


def grid_points(grid: int, dtype=torch.float64) -> torch.Tensor:
    """The G*G grid nodes as points [G*G, 2], in the grids' row-major [iy, ix] order."""
    s = torch.arange(grid, dtype=dtype) / grid
    y, x = torch.meshgrid(s, s, indexing="ij")
    return torch.stack([x.flatten(), y.flatten()], dim=-1)


def kolmogorov_forcing(grid: int, amplitude: torch.Tensor) -> torch.Tensor:
    """FNO's forcing amplitude * (sin(2 pi (x+y)) + cos(2 pi (x+y))): [B, G, G] for amplitude [B]."""
    xy = grid_points(grid, amplitude.dtype).sum(-1).reshape(grid, grid)
    shape = (torch.sin(2 * math.pi * xy) + torch.cos(2 * math.pi * xy))
    return amplitude[:, None, None] * shape


class NavierStokes:
    """Vorticity-form Navier-Stokes on a G x G periodic grid, a batch of B flows at once.

    Args:
        grid: G, grid points per side.
        viscosity: nu per flow, [B].
        forcing: f(x, y) per flow on the grid, [B, G, G] (or None: unforced).
        background: uniform background velocity (U, V) per flow, [B, 2] (or None: at rest).
        dt: time step of the integrator.
        nonlinear: False drops u . grad(omega): the solver then integrates linear
            advection-diffusion of a passive scalar, whose exact solution the tests compare to.
    """

    def __init__(self, grid: int, viscosity: torch.Tensor, forcing: torch.Tensor | None = None,
                 background: torch.Tensor | None = None, dt: float = 1e-2, nonlinear: bool = True):
        if grid < 4 or grid % 2:
            raise ValueError(f"grid must be an even number >= 4, got {grid}")
        if not dt > 0:
            raise ValueError(f"dt must be positive, got {dt}")
        dtype = viscosity.dtype
        self.grid, self.dt, self.nonlinear = grid, dt, nonlinear
        self.kx, self.ky = wavenumbers(grid, dtype)
        k2 = self.kx ** 2 + self.ky ** 2
        self.inv_k2 = torch.where(k2 > 0, 1.0 / k2.clamp_min(1e-30), torch.zeros_like(k2))
        self.mask = dealias_mask(grid)
        linear = -viscosity[:, None, None] * k2  # [B, G, G//2+1]
        if background is not None:
            linear = linear - 1j * (background[:, 0, None, None] * self.kx
                                    + background[:, 1, None, None] * self.ky)
        self.linear = linear
        self.forcing_hat = None if forcing is None else torch.fft.rfft2(forcing) * self.mask
        self._e_half = torch.exp(linear * (dt / 2))
        self._e_full = torch.exp(linear * dt)

    def velocity(self, w_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fourier coefficients of the velocity (u, v) = (d psi/dy, -d psi/dx) of a vorticity."""
        psi_hat = w_hat * self.inv_k2
        return 1j * self.ky * psi_hat, -1j * self.kx * psi_hat

    def _tendency(self, w_hat: torch.Tensor) -> torch.Tensor:
        """The non-stiff part: -u . grad(omega) (dealiased) + f, in Fourier space."""
        out = torch.zeros_like(w_hat) if self.forcing_hat is None else self.forcing_hat.expand_as(w_hat)
        if not self.nonlinear:
            return out
        g = self.grid
        u_hat, v_hat = self.velocity(w_hat)
        u, v = torch.fft.irfft2(u_hat, s=(g, g)), torch.fft.irfft2(v_hat, s=(g, g))
        wx = torch.fft.irfft2(1j * self.kx * w_hat, s=(g, g))
        wy = torch.fft.irfft2(1j * self.ky * w_hat, s=(g, g))
        return out - torch.fft.rfft2(u * wx + v * wy) * self.mask

    def step(self, w_hat: torch.Tensor) -> torch.Tensor:
        """One integrating-factor RK4 step of size dt (exact for the linear part)."""
        h, e2, e = self.dt, self._e_half, self._e_full
        a1 = self._tendency(w_hat)
        a2 = self._tendency(e2 * (w_hat + h / 2 * a1))
        a3 = self._tendency(e2 * w_hat + h / 2 * a2)
        a4 = self._tendency(e * w_hat + h * e2 * a3)
        return e * w_hat + h / 6 * (e * a1 + 2 * e2 * (a2 + a3) + a4)

    def run(self, w0: torch.Tensor, n_snapshots: int, every: float) -> torch.Tensor:
        """Snapshots of the vorticity at t = 0, every, ..., n_snapshots * every: [B, T+1, G, G].

        `every` must be a whole number of steps dt (checked), so snapshot times are exact."""
        steps = every / self.dt
        if abs(steps - round(steps)) > 1e-9 * max(1.0, steps) or round(steps) < 1:
            raise ValueError(f"snapshot interval {every} is not a positive multiple of dt={self.dt}")
        g = self.grid
        w_hat = torch.fft.rfft2(w0) * self.mask
        out = [torch.fft.irfft2(w_hat, s=(g, g))]
        for _ in range(n_snapshots):
            for _ in range(round(steps)):
                w_hat = self.step(w_hat)
            out.append(torch.fft.irfft2(w_hat, s=(g, g)))
        return torch.stack(out, dim=1)


def random_field(batch: int, grid: int, max_mode: int, alpha: float = 2.5, tau: float = 3.0,
                 generator: torch.Generator | None = None, dtype=torch.float64) -> torch.Tensor:
    """Zero-mean Gaussian random fields [B, G, G] of unit RMS, band-limited to integer
    frequencies |m| <= max_mode per axis, with FNO's spectrum (|m|^2 + tau^2)^(-alpha/2)."""
    if not 1 <= max_mode < grid / 3:
        raise ValueError(f"max_mode must be in [1, grid/3) = [1, {grid / 3:.1f}) so the field is "
                         f"resolved after dealiasing, got {max_mode}")
    mx = torch.fft.rfftfreq(grid, 1.0 / grid, dtype=dtype)[None, :]
    my = torch.fft.fftfreq(grid, 1.0 / grid, dtype=dtype)[:, None]
    keep = (mx.abs() <= max_mode) & (my.abs() <= max_mode) & ((mx != 0) | (my != 0))
    amplitude = (mx ** 2 + my ** 2 + tau ** 2) ** (-alpha / 2) * keep
    noise = torch.randn(batch, grid, grid // 2 + 1, 2, generator=generator, dtype=dtype)
    field = torch.fft.irfft2(torch.view_as_complex(noise) * amplitude, s=(grid, grid))
    return field / field.pow(2).mean(dim=(-2, -1), keepdim=True).sqrt()


def fourier_coefficients(grid_values: torch.Tensor) -> torch.Tensor:
    """Coefficients c_m [..., ky, kx] of the trigonometric interpolant of grid values [..., G, G]."""
    g = grid_values.shape[-1]
    return torch.fft.fft2(grid_values) / (g * g)


def fourier_basis(points: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """exp(2 pi i m x) and exp(2 pi i m y) at points [..., N, 2] for the G integer frequencies
    m of a G-point DFT: ([..., N, G], [..., N, G]). Reusable for every field on the same points."""
    freqs = torch.fft.fftfreq(grid, 1.0 / grid, dtype=points.dtype)
    return (torch.exp(2j * math.pi * points[..., 0, None] * freqs),
            torch.exp(2j * math.pi * points[..., 1, None] * freqs))


def evaluate_series(coeffs: torch.Tensor, basis: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Real part of sum_m c_m exp(2 pi i m . x) at the points of `basis`: [..., N]."""
    ex, ey = basis
    partial = ex.to(coeffs.dtype) @ coeffs.transpose(-1, -2)  # [..., N, ky]
    return (partial * ey.to(coeffs.dtype)).sum(-1).real


def evaluate_at(grid_values: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """The trigonometric interpolant of grid values, evaluated exactly at arbitrary points.

    Args:
        grid_values: [..., G, G] real values at the grid nodes.
        points: [..., N, 2] (x, y) positions (any real values; the field is 1-periodic).
    Returns:
        [..., N]: sum over the G x G discrete Fourier modes of c_m exp(2 pi i m . x), real part.
        At the grid nodes this is the inverse FFT, i.e. the grid values themselves. For the
        solver's dealiased fields (no energy at the Nyquist frequency) it is the truncated
        Fourier series the solver represents, exactly.
    """
    g = grid_values.shape[-1]
    return evaluate_series(fourier_coefficients(grid_values), fourier_basis(points, g))


def advection_diffusion(initial: torch.Tensor, velocity: torch.Tensor, diffusivity: torch.Tensor,
                        times: torch.Tensor, points: torch.Tensor | None = None) -> torch.Tensor:
    """The exact solution of c_t + U . grad(c) = kappa lap(c) from band-limited grid values.

    Args:
        initial: [B, G, G] initial values on the grid (their trigonometric interpolant is c(., 0)).
        velocity: [B, 2] uniform velocity (U, V); diffusivity: [B] kappa; times: [T].
        points: [B, N, 2] where to evaluate, or None for the grid nodes.
    Returns:
        [B, T, N] at the points, or [B, T, G, G] on the grid.
    """
    g = initial.shape[-1]
    kx, ky = wavenumbers(g, initial.dtype)
    ky_full = ky.expand(g, g)
    kx_full = 2 * math.pi * torch.fft.fftfreq(g, 1.0 / g, dtype=initial.dtype)[None, :].expand(g, g)
    decay = torch.exp(-diffusivity[:, None, None, None] * (kx_full ** 2 + ky_full ** 2)
                      * times[None, :, None, None])  # [B, T, G, G]
    coeffs = torch.fft.fft2(initial)[:, None] * decay
    shifted_initial = torch.fft.ifft2(coeffs).real  # diffused, not yet moved: [B, T, G, G]
    shift = velocity[:, None, :] * times[None, :, None]  # [B, T, 2]
    if points is None:
        nodes = grid_points(g, initial.dtype)[None, None] - shift[:, :, None]
        return evaluate_at(shifted_initial, nodes).unflatten(-1, (g, g))
    return evaluate_at(shifted_initial, points[:, None] - shift[:, :, None])


def sample_points(batch: int, n: int, generator: torch.Generator | None = None,
                  density: str = "uniform", dtype=torch.float32) -> torch.Tensor:
    """Random point clouds [B, N, 2] in [0, 1)^2 of any size.

    density "uniform", or "clustered": x and y each drawn from a wrapped normal around 0.5
    (sd 0.2), so the cloud is dense in the middle of the domain and sparse at its edges; the
    model must not depend on how the points are spread.
    """
    if n < 1:
        raise ValueError(f"number of points must be positive, got {n}")
    if density == "uniform":
        return torch.rand(batch, n, 2, generator=generator, dtype=dtype)
    if density == "clustered":
        return (0.5 + 0.2 * torch.randn(batch, n, 2, generator=generator, dtype=dtype)) % 1.0
    raise ValueError(f"density must be 'uniform' or 'clustered', got {density!r}")


@dataclass(frozen=True)
class FlowSpec:
    """Everything that determines a generated set of trajectories (and its cache key).

    Per-trajectory parameters are drawn uniformly from the given ranges: for navier-stokes the
    viscosity log-uniformly in [nu_min, nu_max] and the forcing amplitude in
    [forcing_min, forcing_max]; for advection-diffusion a velocity of magnitude in
    [speed_min, speed_max] in a uniformly random direction and a diffusivity log-uniformly in
    [nu_min, nu_max].
    """

    kind: str = "navier-stokes"
    grid: int = 32
    trajectories: int = 16
    snapshots: int = 20
    every: float = 1.0
    dt: float = 0.05
    max_mode: int = 4
    nu_min: float = 1e-3
    nu_max: float = 1e-2
    forcing_min: float = 0.0
    forcing_max: float = 0.2
    speed_min: float = 0.05
    speed_max: float = 0.15
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {self.kind!r}")
        for name in ("trajectories", "snapshots"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.nu_min <= self.nu_max:
            raise ValueError(f"need 0 < nu_min <= nu_max, got {self.nu_min}, {self.nu_max}")
        steps = self.every / self.dt if self.dt > 0 else 0.0
        if not (self.every > 0 and self.dt > 0 and round(steps) >= 1
                and abs(steps - round(steps)) <= 1e-9 * steps):
            raise ValueError(f"every ({self.every}) must be a positive whole multiple of dt ({self.dt})")
        if self.grid < 4 or self.grid % 2:
            raise ValueError(f"grid must be an even number >= 4, got {self.grid}")
        if self.forcing_min > self.forcing_max or self.speed_min > self.speed_max:
            raise ValueError("forcing_min/speed_min must not exceed forcing_max/speed_max")

    def key(self) -> str:
        options = {**asdict(self), "format": FORMAT_VERSION}
        return hashlib.sha1(json.dumps(options, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def param_names(self) -> tuple[str, ...]:
        if self.kind == "navier-stokes":
            return ("log10_viscosity", "forcing")
        return ("velocity_x", "velocity_y", "log10_diffusivity")


def simulate(spec: FlowSpec) -> dict[str, torch.Tensor]:
    """Generate the trajectories of `spec` (float64 throughout, returned as float32).

    Returns {"fields": [B, T+1, G, G], "params": [B, P]} with P = len(spec.param_names).
    """
    gen = torch.Generator().manual_seed(spec.seed)
    b = spec.trajectories
    w0 = random_field(b, spec.grid, spec.max_mode, generator=gen)
    log_nu = math.log10(spec.nu_min) + torch.rand(b, generator=gen, dtype=torch.float64) * (
        math.log10(spec.nu_max) - math.log10(spec.nu_min))
    if spec.kind == "navier-stokes":
        amp = spec.forcing_min + torch.rand(b, generator=gen, dtype=torch.float64) * (
            spec.forcing_max - spec.forcing_min)
        solver = NavierStokes(spec.grid, 10 ** log_nu, kolmogorov_forcing(spec.grid, amp), dt=spec.dt)
        fields = solver.run(w0, spec.snapshots, spec.every)
        params = torch.stack([log_nu, amp], dim=-1)
    else:
        speed = spec.speed_min + torch.rand(b, generator=gen, dtype=torch.float64) * (
            spec.speed_max - spec.speed_min)
        angle = 2 * math.pi * torch.rand(b, generator=gen, dtype=torch.float64)
        velocity = torch.stack([speed * torch.cos(angle), speed * torch.sin(angle)], dim=-1)
        times = spec.every * torch.arange(spec.snapshots + 1, dtype=torch.float64)
        fields = advection_diffusion(w0, velocity, 10 ** log_nu, times)
        params = torch.cat([velocity, log_nu[:, None]], dim=-1)
    if not torch.isfinite(fields).all():
        raise FloatingPointError(f"the simulation of {spec} blew up; lower dt")
    return {"fields": fields.float().contiguous(), "params": params.float().contiguous()}


def load_trajectories(spec: FlowSpec, cache_dir: Path) -> dict[str, torch.Tensor]:
    """`simulate(spec)`, computed once and cached as `flows-<kind>-<key>.safetensors`."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"flows-{spec.kind}-{spec.key()}.safetensors"
    if not path.exists():
        data = simulate(spec)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
        os.close(fd)
        save_file(data, tmp, metadata={"spec": json.dumps(asdict(spec), sort_keys=True)})
        os.replace(tmp, path)  # atomic: concurrent workers never read half a file
    return load_file(path)
