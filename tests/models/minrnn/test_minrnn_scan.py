"""The scans of minGRU / minLSTM agree with the plain recurrence (Feng et al. 2024, Appendix B)."""
import pytest
import torch
import torch.nn.functional as F

from shipyard_models.minrnn.model import MinRNN
from shipyard_models.minrnn.scan import (
    log_g,
    log_scan,
    mingru_coefficients,
    mingru_scan,
    sequential_scan,
)

CELLS = ["mingru", "minlstm"]


def _pair(cell, expansion, scan, dim=6, seed=0):
    """A fast layer and a sequential-loop layer with the same float64 weights."""
    torch.manual_seed(seed)
    fast = MinRNN(dim, cell, expansion, scan=scan).double()
    slow = MinRNN(dim, cell, expansion, scan="sequential").double()
    slow.load_state_dict(fast.state_dict())
    return fast, slow


def _outputs_and_grads(layer, x, h0, w_y, w_h):
    x = x.clone().requires_grad_()
    h0 = h0.clone().requires_grad_()
    y, h_last = layer(x, h0)
    ((y * w_y).sum() + (h_last * w_h).sum()).backward()
    return [y, h_last, x.grad, h0.grad] + [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("scan", ["chunked", "log"])
@pytest.mark.parametrize("T,expansion", [(1, 1.0), (37, 1.5), (64, 1.0)])
def test_parallel_equals_sequential_float64(cell, scan, T, expansion):
    fast, slow = _pair(cell, expansion, scan)
    torch.manual_seed(1)
    x = torch.randn(3, T, 6, dtype=torch.double) * 2
    h0 = torch.randn(3, fast.inner, dtype=torch.double) * 3  # non-zero, both signs
    w_y = torch.randn(3, T, 6, dtype=torch.double)
    w_h = torch.randn(3, fast.inner, dtype=torch.double)
    got = _outputs_and_grads(fast, x, h0, w_y, w_h)
    want = _outputs_and_grads(slow, x, h0, w_y, w_h)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10)


@pytest.mark.parametrize("chunk", [1, 2, 5, 8, 100])
def test_chunk_size_does_not_change_the_result(chunk):
    torch.manual_seed(0)
    k, u = torch.randn(2, 2, 29, 4, dtype=torch.double).unbind(0)
    h0 = torch.randn(2, 4, dtype=torch.double)
    want = sequential_scan(*mingru_coefficients(k, u), h0)
    torch.testing.assert_close(mingru_scan(k, u, h0, chunk), want, rtol=0, atol=1e-12)


def test_hand_written_backward_passes_gradcheck():
    torch.manual_seed(0)
    k, u = (torch.randn(2, 11, 3, dtype=torch.double, requires_grad=True) for _ in range(2))
    h0 = torch.randn(2, 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda k, u, h0: mingru_scan(k, u, h0, 4), (k, u, h0))


@pytest.mark.parametrize("cell", CELLS)
def test_chunked_continuation_equals_one_pass(cell):
    layer, _ = _pair(cell, 1.5, "chunked")
    torch.manual_seed(2)
    x = torch.randn(2, 40, 6, dtype=torch.double)
    h0 = torch.randn(2, layer.inner, dtype=torch.double)
    y, h_end = layer(x, h0)
    y1, h_mid = layer(x[:, :20], h0)
    y2, h_end2 = layer(x[:, 20:], h_mid)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y, rtol=0, atol=1e-12)
    torch.testing.assert_close(h_end2, h_end, rtol=0, atol=1e-12)


def test_saturated_gates_stay_finite_and_accurate_where_a_naive_cumprod_underflows():
    torch.manual_seed(0)
    B, T, D = 2, 2048, 16
    sign = torch.randint(0, 2, (B, T, D)) * 2.0 - 1.0
    k = sign * (12 + 0.5 * torch.rand(B, T, D))  # gates saturated shut or open
    u = torch.randn(B, T, D) * 3
    h0 = torch.randn(B, D) * 3
    dh = torch.randn(B, T, D)

    # float64 reference, sequential
    k64, u64, h064 = (t.double().requires_grad_() for t in (k, u, h0))
    ref = sequential_scan(*mingru_coefficients(k64, u64), h064)
    ref_grads = torch.autograd.grad((ref * dh.double()).sum(), [k64, u64, h064])

    # naive: h_t = A_t * (h0 + cumsum(b / A)_t) with A = cumprod(a) underflows to 0 -> inf / nan
    a, b = mingru_coefficients(k, u)
    A = torch.cumprod(a, dim=1)
    naive = A * (h0[:, None] + torch.cumsum(b / A, dim=1))
    assert (A == 0).any()
    assert not torch.isfinite(naive).all()

    # the fast float32 path: finite, and as accurate as float32 allows: outputs within 1e-6 and
    # gradients within 1e-5 of the largest reference value
    k32, u32, h032 = (t.clone().requires_grad_() for t in (k, u, h0))
    out = mingru_scan(k32, u32, h032)
    grads = torch.autograd.grad((out * dh).sum(), [k32, u32, h032])
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    scale = ref.abs().max().item()
    assert (out.double() - ref).abs().max().item() < 1e-6 * scale
    for g, r in zip(grads, ref_grads):
        assert (g.double() - r).abs().max().item() < 1e-5 * r.abs().max().item()

    # the paper's log-space scan is finite too; chunking bounds its float32 cancellation error
    log_a, log_b = F.logsigmoid(-k), F.logsigmoid(k) + log_g(u)
    err_log = (log_scan(log_a, log_b, h0).double() - ref).abs().max().item() / scale
    err_log_chunked = (log_scan(log_a, log_b, h0, 64).double() - ref).abs().max().item() / scale
    err = (out.double() - ref).abs().max().item() / scale
    print(f"max relative error vs float64: chunked {err:.1e}, log-space {err_log:.1e}, "
          f"log-space chunked by 64 {err_log_chunked:.1e}")
    assert err_log_chunked < err_log
