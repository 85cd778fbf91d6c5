"""`shipyard.serve.lm.StepBatcher` on a real minRNN, without a server: a lone request steps in its
own thread, concurrent requests share batches and get the unbatched answers, a failing step fails
only its caller's request and the batcher goes on."""
import threading
import time

import pytest
import torch

from shipyard.serve.lm import StepBatcher
from shipyard_models.minrnn import Config, MinRNNLM


def model():
    torch.manual_seed(0)
    return MinRNNLM(Config(vocab_size=64, dim=16, depth=2)).double().eval()


class Slow:
    """The same model, each step 20 ms longer (a larger model's step), so that concurrent
    requests' steps certainly queue up behind a running batch."""

    def __init__(self, inner):
        self.inner, self.threads = inner, set()

    def step(self, tokens, state):
        self.threads.add(threading.current_thread().name)
        time.sleep(0.02)
        return self.inner.step(tokens, state)


def decode(step, m, token: int, n: int) -> list[torch.Tensor]:
    """n greedy steps from a fresh state through `step`, the logits of each."""
    state, out = m.init_state(1).double(), []
    for _ in range(n):
        logits, state = step(token, state)
        out.append(logits)
        token = int(logits.argmax())
    return out


def unbatched(m, token, n):
    return decode(lambda t, s: (lambda lg, st: (lg[0], st))(*m.step(torch.tensor([t]), s)), m, token, n)


def test_a_lone_request_steps_in_its_own_thread_with_the_unbatched_answers():
    m = model()
    slow = Slow(m)
    batcher = StepBatcher(slow, max_batch=16)
    with torch.no_grad():
        got, want = decode(batcher.step, m, 5, 6), unbatched(m, 5, 6)
    assert slow.threads == {threading.current_thread().name}  # no hand-off to another thread
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert batcher.stats() == {"max_batch": 16, "steps": 6, "largest_batch": 1, "mean_batch": 1.0}


@pytest.mark.parametrize("max_batch", [16, 3])
def test_concurrent_requests_share_batches_and_get_the_unbatched_answers(max_batch):
    m = model()
    batcher = StepBatcher(Slow(m), max_batch=max_batch)
    results: dict[int, list[torch.Tensor]] = {}

    def client(i):
        with torch.no_grad():
            results[i] = decode(batcher.step, m, i, 8)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a request never got its turn"
    for i in range(7):
        want = unbatched(m, i, 8)
        assert len(results[i]) == 8
        for a, b in zip(results[i], want):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    stats = batcher.stats()
    assert 1 < stats["largest_batch"] <= max_batch and stats["steps"] < 7 * 8, stats


def test_a_failing_step_fails_its_request_and_the_batcher_goes_on():
    m = model()
    batcher = StepBatcher(m, max_batch=4)
    with pytest.raises(RuntimeError):
        batcher.step(1, torch.zeros(5, 1, 3, dtype=torch.float64))  # a state of the wrong shape
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(decode(batcher.step, m, 2, 3), unbatched(m, 2, 3)))
