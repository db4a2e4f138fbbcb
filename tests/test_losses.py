"""The classification-loss modules of the official baselines: GumbelCE's clamp of the reduced
loss to [0, 20] and the 1204-logit sigmoid head (background column trained as a positive)."""
import pytest
import torch
import torch.nn.functional as F

from gumbel_kernels import losses


def gumbel_ce_literal(logits, labels):
    """The official GumbelCE on a (N, C+1) head: clamp to [-4, 10], Gumbel CDF, BCE against the
    one-hot of the label (background = the last column), summed / N, clamped to [0, 20]."""
    q = logits.clamp(-4, 10)
    p = torch.exp(-torch.exp(-q))
    target = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    loss = F.binary_cross_entropy(p, target, reduction="sum") / logits.shape[0]
    return loss.clamp(0, 20)


def test_gumbel_ce_matches_the_official_loss_below_the_clamp():
    torch.manual_seed(0)
    logits = torch.randn(16, 6, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4] + [5] * 11)
    module = losses.GumbelCELoss(backend="reference")
    assert module.num_logits(5) == 6
    torch.testing.assert_close(module(logits, labels), gumbel_ce_literal(logits, labels))


def test_gumbel_ce_clamps_the_reduced_loss_at_20_with_zero_gradient():
    # Confident wrong logits: each row costs far more than 20 on average.
    logits = torch.full((4, 6), 9.0, requires_grad=True)
    labels = torch.tensor([5, 5, 5, 5])
    loss = losses.GumbelCELoss(backend="reference")(logits, labels)
    assert float(loss.detach()) == 20.0
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0
    unclamped = losses.GumbelCELoss(loss_clamp=None, backend="reference")(logits.detach(), labels)
    assert float(unclamped) > 20.0
    # Below the clamp the gradient flows.
    small = torch.zeros(4, 6, requires_grad=True)
    losses.GumbelCELoss(backend="reference")(small, labels).backward()
    assert small.grad.abs().sum() > 0


def test_gumbel_ce_rejects_a_bad_clamp():
    with pytest.raises(ValueError, match="loss_clamp"):
        losses.GumbelCELoss(loss_clamp=(20.0, 0.0))


def test_sigmoid_ce_trains_the_background_column_as_a_positive():
    torch.manual_seed(1)
    logits = torch.randn(8, 6, dtype=torch.float64)
    labels = torch.tensor([0, 2, 4, 5, 5, 5, 1, 5])
    module = losses.build_classification_loss("sigmoid_ce")
    assert module.num_logits(5) == 6 and module.activation == "sigmoid"
    # mmdetection's CrossEntropyLoss(use_sigmoid=True): one-hot over all C + 1 columns.
    target = F.one_hot(labels, 6).to(logits.dtype)
    expected = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / 8
    torch.testing.assert_close(module(logits, labels), expected)
    assert losses.build_classification_loss("sigmoid").num_logits(5) == 5
