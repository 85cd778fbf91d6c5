"""The flow generators: the solver against exact solutions and invariants, exact Fourier
evaluation, point clouds, and the on-disk cache. Float64 wherever exactness is asserted."""
import math

import pytest
import torch

from shipyard_models.data.flows import (
    FlowSpec,
    NavierStokes,
    advection_diffusion,
    evaluate_at,
    grid_points,
    kolmogorov_forcing,
    load_trajectories,
    random_field,
    sample_points,
)

G = 32



def _xy():
    p = grid_points(G)
    return p[:, 0].reshape(G, G), p[:, 1].reshape(G, G)


def test_decaying_taylor_green_vortex_matches_the_exact_solution():
    # omega = sin(2 pi m x) sin(2 pi n y) is an eigenfunction of the Laplacian, so u . grad(omega)
    # vanishes and omega(t) = omega(0) exp(-nu |k|^2 t) exactly; moved by a uniform background
    # velocity U it is the same field translated by U t. The integrating factor makes the linear
    # part exact, so only rounding remains (1e-12: ~100 steps of float64 FFTs).
    x, y = _xy()
    w0 = torch.stack([torch.sin(2 * math.pi * 2 * x) * torch.sin(2 * math.pi * y),
                      torch.cos(2 * math.pi * 3 * x) * torch.cos(2 * math.pi * 3 * y)])
    nu = torch.tensor([0.01, 0.002], dtype=torch.float64)
    background = torch.tensor([[0.0, 0.0], [0.13, -0.07]], dtype=torch.float64)
    out = NavierStokes(G, nu, background=background, dt=0.05).run(w0, 4, 0.5)
    k2 = (2 * math.pi) ** 2 * torch.tensor([5.0, 18.0], dtype=torch.float64)
    times = 0.5 * torch.arange(5, dtype=torch.float64)
    pts = grid_points(G)[None].expand(2, -1, -1)
    for i, t in enumerate(times):
        moved = evaluate_at(w0, pts - background[:, None] * t).reshape(2, G, G)
        exact = moved * torch.exp(-nu * k2 * t)[:, None, None]
        torch.testing.assert_close(out[:, i], exact, rtol=0, atol=1e-12)
    assert out[0, -1].abs().max() < 0.9 * w0[0].abs().max()  # it did decay


def test_linear_solver_matches_the_analytic_advection_diffusion_off_the_grid():
    # Two independent computations of c_t + U . grad(c) = kappa lap(c): the time-stepping solver
    # (nonlinear term off) and the closed form, compared at random off-grid points through the
    # exact Fourier evaluation. Both are exact for band-limited data: rounding only (1e-11).
    gen = torch.Generator().manual_seed(0)
    c0 = random_field(3, G, 6, generator=gen)
    kappa = torch.tensor([1e-3, 3e-3, 0.0], dtype=torch.float64)
    velocity = torch.tensor([[0.1, 0.0], [-0.05, 0.2], [0.3, 0.3]], dtype=torch.float64)
    solver = NavierStokes(G, kappa, background=velocity, dt=0.1, nonlinear=False)
    stepped = solver.run(c0, 3, 1.0)
    points = sample_points(3, 200, gen, dtype=torch.float64)
    times = torch.arange(4, dtype=torch.float64)
    exact = advection_diffusion(c0, velocity, kappa, times, points)
    torch.testing.assert_close(evaluate_at(stepped, points[:, None]), exact, rtol=0, atol=1e-11)
    # and the grid form of the closed solution, interpolated, is its point form
    on_grid = advection_diffusion(c0, velocity, kappa, times)
    torch.testing.assert_close(evaluate_at(on_grid, points[:, None]), exact, rtol=0, atol=1e-11)
    assert (exact[:, -1] - exact[:, 0]).abs().max() > 0.1  # the field really moved


def test_inviscid_unforced_flow_conserves_energy_and_enstrophy():
    # With nu = f = 0 the 2/3-dealiased Galerkin system conserves energy and enstrophy exactly in
    # continuous time; RK4 with dt = 0.01 over 2 time units leaves ~1e-9 relative drift here
    # (1e-7 allows for other seeds). A wrong sign or a missing dealias breaks it by >1e-3.
    w = random_field(2, G, 6, generator=torch.Generator().manual_seed(0))
    solver = NavierStokes(G, torch.zeros(2, dtype=torch.float64), dt=0.01)

    def invariants(w_grid):
        w_hat = torch.fft.rfft2(w_grid)
        u_hat, v_hat = solver.velocity(w_hat)
        u, v = torch.fft.irfft2(u_hat, s=(G, G)), torch.fft.irfft2(v_hat, s=(G, G))
        return (u ** 2 + v ** 2).mean((-2, -1)), (w_grid ** 2).mean((-2, -1))

    out = solver.run(w, 1, 2.0)
    for before, after in zip(invariants(out[:, 0]), invariants(out[:, 1])):
        assert ((after - before) / before).abs().max() < 1e-7
    assert (out[:, 1] - out[:, 0]).pow(2).mean().sqrt() > 0.5  # while the flow itself changed a lot


def test_velocity_is_divergence_free():
    # Spectrally, div u = i kx u_hat + i ky v_hat; and off the grid, a central difference of the
    # exact Fourier interpolant (h = 1e-4: truncation error ~h^2 |k|^3 ~ 1e-4 relative).
    w = random_field(1, G, 8, generator=torch.Generator().manual_seed(1))
    solver = NavierStokes(G, torch.full((1,), 1e-3, dtype=torch.float64),
                          kolmogorov_forcing(G, torch.tensor([0.1], dtype=torch.float64)), dt=0.02)
    w_hat = torch.fft.rfft2(solver.run(w, 1, 0.5)[:, -1])
    u_hat, v_hat = solver.velocity(w_hat)
    div_hat = 1j * solver.kx * u_hat + 1j * solver.ky * v_hat
    assert div_hat.abs().max() < 1e-12 * u_hat.abs().max()
    u, v = torch.fft.irfft2(u_hat, s=(G, G)), torch.fft.irfft2(v_hat, s=(G, G))
    p = sample_points(1, 100, torch.Generator().manual_seed(2), dtype=torch.float64)
    h = 1e-4
    dx, dy = torch.tensor([h, 0.0], dtype=torch.float64), torch.tensor([0.0, h], dtype=torch.float64)
    du = (evaluate_at(u, p + dx) - evaluate_at(u, p - dx)) / (2 * h)
    dv = (evaluate_at(v, p + dy) - evaluate_at(v, p - dy)) / (2 * h)
    scale = du.abs().max()
    assert (du + dv).abs().max() < 1e-4 * scale and scale > 0.1


def test_fourier_evaluation_at_the_grid_points_equals_the_grid_values():
    # Any real grid, Nyquist mode included: the interpolant reproduces the nodes (rounding only).
    grid = torch.randn(3, 2, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    values = evaluate_at(grid, grid_points(16)).reshape(3, 2, 16, 16)
    torch.testing.assert_close(values, grid, rtol=0, atol=1e-12)
    # periodic, and smooth in between: shifting every point by a whole period changes nothing
    p = sample_points(3, 50, torch.Generator().manual_seed(1), dtype=torch.float64)[:, None]
    torch.testing.assert_close(evaluate_at(grid, p + torch.tensor([1.0, -2.0], dtype=torch.float64)),
                               evaluate_at(grid, p), rtol=0, atol=1e-10)


@pytest.mark.parametrize("density", ["uniform", "clustered"])
def test_point_clouds_of_any_size_lie_in_the_unit_square(density):
    for n in (1, 7, 5000):
        p = sample_points(2, n, torch.Generator().manual_seed(n), density)
        assert p.shape == (2, n, 2) and (p >= 0).all() and (p < 1).all()
    p = sample_points(1, 20000, torch.Generator().manual_seed(0), density)[0]
    middle = ((p - 0.5).abs() < 0.25).all(-1).float().mean()
    # uniform: a quarter of the points in the middle square (+-0.02: 5 sigma at n = 20000);
    # clustered (wrapped normal, sd 0.2): P(|z| < 1.25)^2 = 0.62
    assert abs(middle - (0.25 if density == "uniform" else 0.62)) < 0.02
    with pytest.raises(ValueError, match="density"):
        sample_points(1, 5, density="gaussian")


def test_trajectories_are_simulated_once_and_read_back_from_the_cache(tmp_path):
    spec = FlowSpec(grid=16, trajectories=2, snapshots=3, every=0.5, dt=0.05, max_mode=2)
    first = load_trajectories(spec, tmp_path)
    files = list(tmp_path.glob("flows-navier-stokes-*.safetensors"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    again = load_trajectories(spec, tmp_path)
    assert files[0].stat().st_mtime_ns == mtime  # read, not rewritten
    for key in ("fields", "params"):
        assert torch.equal(first[key], again[key])
    assert first["fields"].shape == (2, 4, 16, 16) and first["params"].shape == (2, 2)
    other = load_trajectories(FlowSpec(kind="advection-diffusion", grid=16, trajectories=2, snapshots=3,
                                       max_mode=2), tmp_path)
    assert other["params"].shape == (2, 3) and len(list(tmp_path.glob("*.safetensors"))) == 2
    with pytest.raises(ValueError, match="kind"):
        FlowSpec(kind="burgers")
