"""Task losses: one value per task, equal to torch's loss on that task alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metafit import functional
from metafit.losses import LOSSES, cross_entropy_loss, mse_loss

T, N = 4, 6


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_cross_entropy_loss_per_task():
    out = torch.randn(T, N, 3, generator=_gen(), dtype=torch.float64)
    y = torch.randint(0, 3, (T, N), generator=_gen(1))
    want = torch.stack([nn.functional.cross_entropy(out[t], y[t]) for t in range(T)])
    torch.testing.assert_close(cross_entropy_loss(out, y), want)


@pytest.mark.parametrize("n_outputs", [1, 3])
def test_mse_loss_per_task_with_matching_targets(n_outputs):
    out = torch.randn(T, N, n_outputs, generator=_gen(), dtype=torch.float64)
    y = torch.randn(T, N, n_outputs, generator=_gen(1), dtype=torch.float64)
    want = torch.stack([nn.functional.mse_loss(out[t], y[t]) for t in range(T)])
    torch.testing.assert_close(mse_loss(out, y), want)


def test_mse_loss_with_1d_targets_compares_the_first_column():
    out = torch.randn(T, N, 2, generator=_gen(), dtype=torch.float64)
    y = torch.randn(T, N, generator=_gen(1), dtype=torch.float64)
    want = torch.stack([nn.functional.mse_loss(out[t, :, 0], y[t]) for t in range(T)])
    torch.testing.assert_close(mse_loss(out, y), want)
    # the second column never enters
    out2 = out.clone()
    out2[..., 1] += 100.0
    torch.testing.assert_close(mse_loss(out2, y), want)


def test_losses_registry_and_reexport():
    assert LOSSES == {"mse": mse_loss, "cross_entropy": cross_entropy_loss}
    # the "mlp" strategy recognises the losses by identity, so the re-exports must be them
    assert functional.mse_loss is mse_loss and functional.cross_entropy_loss is cross_entropy_loss
    assert functional.LOSSES is LOSSES


@pytest.mark.parametrize(("name", "two_d"), [("mse", False), ("mse", True),
                                             ("cross_entropy", False)])
def test_masked_losses_are_the_means_over_the_real_rows(name, two_d):
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64)
    if name == "mse":
        y = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64) if two_d else torch.randn(
            2, 5, generator=gen, dtype=torch.float64)
    else:
        y = torch.randint(0, 3, (2, 5), generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float64)
    loss = LOSSES[name]
    got = loss(out, y, mask)
    want = torch.stack([loss(out[:1, :3], y[:1, :3])[0], loss(out[1:], y[1:])[0]])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss(out, y, torch.ones(2, 5, dtype=torch.float64)), loss(out, y))
