"""Small models shared by the tests: a nonlinear MLP with biases and a tiny causal token model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from torch import nn

# The tests' models are tiny: thread hand-offs cost more than they save, and on a loaded 2-core
# machine they slow tiny-model steps by orders of magnitude.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    tiny models gain nothing from threads, and on a busy machine their spin-waits cost; the
    module's caller setting is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class SmallMLP(nn.Module):
    def __init__(self, n_in: int = 4, n_hidden: int = 6, n_out: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n_in, n_hidden)
        self.fc2 = nn.Linear(n_hidden, n_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class TinyTokenModel(nn.Module):
    """(batch, seq) token ids -> (batch, seq, vocab) logits; positions mix causally (a running
    mean), so each token's divergence reaches the parameters through every earlier position."""

    def __init__(self, vocab: int = 7, dim: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        counts = torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[None, :, None]
        h = torch.tanh(self.mix(h.cumsum(1) / counts))
        return self.head(h)


@pytest.fixture
def mlp() -> SmallMLP:
    torch.manual_seed(0)
    return SmallMLP()


@pytest.fixture
def token_model() -> TinyTokenModel:
    torch.manual_seed(0)
    return TinyTokenModel()


@contextlib.contextmanager
def stopped_after_epoch(epoch: int) -> Iterator[None]:
    """Inside, a CLI run stops as on SIGTERM once `epoch` epochs are done (its checkpoint saved),
    so that a test can resume it."""
    import signal

    from l3d import runs
    from l3d.runs import execution

    original = execution._EpochLog.__call__

    def stop(self, trainer, record):
        original(self, trainer, record)
        if trainer.epoch == epoch:
            raise runs.Interrupted(signal.SIGTERM)

    execution._EpochLog.__call__ = stop  # type: ignore[method-assign]
    try:
        yield
    finally:
        execution._EpochLog.__call__ = original  # type: ignore[method-assign]
