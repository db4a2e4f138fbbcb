"""Federated Loss and EQLv2 (gumbel_kernels.losses): class sampling, reweighting, statistics."""
import math

import pytest
import torch

import gumbel_kernels as gk
from gumbel_kernels import reference
from gumbel_kernels.losses import (LOSS_NAMES, EQLv2Loss, FederatedLoss,
                                   build_classification_loss)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ----------------------------------------------------------------------------------------------
# Federated Loss
# ----------------------------------------------------------------------------------------------

def test_federated_gt_always_selected_and_exactly_num_sampled():
    num_classes = 120
    generator = torch.Generator().manual_seed(0)
    loss = FederatedLoss(torch.randint(1, 500, (num_classes,)).tolist(), 1000, generator=generator)
    for trial in range(20):
        labels = torch.randint(0, num_classes + 1, (32,))
        selected = loss.select_classes(labels)
        gt = set(labels[labels < num_classes].tolist())
        assert gt <= set(selected.tolist())
        assert selected.numel() == 50 and len(set(selected.tolist())) == 50
        assert bool((selected[1:] > selected[:-1]).all())


def test_federated_many_gt_classes_keeps_just_the_gt():
    num_classes = 120
    loss = FederatedLoss([10] * num_classes, generator=torch.Generator().manual_seed(1))
    labels = torch.cat([torch.arange(60), torch.full((5,), num_classes)])
    assert loss.select_classes(labels).tolist() == list(range(60))


def test_federated_fewer_classes_than_num_sampled_takes_all():
    loss = FederatedLoss([3, 0, 5, 1], generator=torch.Generator().manual_seed(2))
    assert loss.select_classes(torch.tensor([4, 4])).tolist() == [0, 1, 2, 3]
    # A zero-count class is only drawn once every positive-count class is taken.
    small = FederatedLoss([3, 0, 5, 1], num_sampled=3, generator=torch.Generator().manual_seed(3))
    for _ in range(20):
        assert small.select_classes(torch.tensor([4])).tolist() == [0, 2, 3]


@pytest.mark.parametrize("activation", ["sigmoid", "gumbel"])
def test_federated_unselected_columns_get_no_gradient(activation):
    torch.manual_seed(0)
    num_classes = 80
    loss_fn = FederatedLoss(torch.randint(1, 100, (num_classes,)).tolist(), activation=activation,
                            generator=torch.Generator().manual_seed(4))
    logits = torch.randn(16, num_classes, requires_grad=True)
    labels = torch.randint(0, num_classes + 1, (16,))
    loss = loss_fn(logits, labels)
    loss.backward()
    selected = loss_fn.last_selected
    mask = torch.zeros(num_classes, dtype=torch.bool)
    mask[selected] = True
    assert bool((logits.grad[:, ~mask] == 0).all())
    assert bool((logits.grad[:, mask] != 0).any(dim=0).all())
    # The same as the plain BCE loss on the selected columns, divided by all N rows.
    q = logits.detach()[:, mask].clone().requires_grad_(True)
    remap = torch.full((num_classes + 1,), mask.sum().item(), dtype=torch.int64)
    remap[selected] = torch.arange(selected.numel())
    expected = gk.gol_loss(q, remap[labels], mode="bce", activation=activation)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logits.grad[:, mask], q.grad)


def test_federated_sampling_proportional_to_sqrt_count():
    counts = [1, 4, 9, 16]  # weights 1, 2, 3, 4
    p = torch.tensor([1.0, 2.0, 3.0, 4.0]) / 10.0
    background = torch.tensor([4, 4, 4])
    draws = 6000

    one = FederatedLoss(counts, num_sampled=1, generator=torch.Generator().manual_seed(5))
    hits = torch.zeros(4)
    for _ in range(draws):
        hits[one.select_classes(background)] += 1
    torch.testing.assert_close(hits / draws, p, atol=0.025, rtol=0)

    # Two draws without replacement: P(i in S) = p_i + sum_{j != i} p_j p_i / (1 - p_j).
    two = FederatedLoss(counts, num_sampled=2, generator=torch.Generator().manual_seed(6))
    hits = torch.zeros(4)
    for _ in range(draws):
        selected = two.select_classes(background)
        assert selected.numel() == 2
        hits[selected] += 1
    expected = torch.tensor([p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(4) if j != i)
                             for i in range(4)])
    torch.testing.assert_close(hits / draws, expected, atol=0.03, rtol=0)


def test_federated_global_generator_is_reproducible():
    loss = FederatedLoss(list(range(1, 201)))
    labels = torch.tensor([5, 200])
    torch.manual_seed(7)
    first = loss.select_classes(labels)
    torch.manual_seed(7)
    assert torch.equal(first, loss.select_classes(labels))


# ----------------------------------------------------------------------------------------------
# EQLv2
# ----------------------------------------------------------------------------------------------

def test_eqlv2_hand_computed_2x3():
    """logits 0 (sigmoid 0.5, |grad| 0.5 everywhere), labels [0, background]."""
    loss_fn = EQLv2Loss(3)
    labels = torch.tensor([0, 3])
    ln2 = math.log(2.0)

    # Call 1: no statistics yet, every weight is 1 (as in the published EQLv2).
    logits = torch.zeros(2, 3, requires_grad=True)
    loss = loss_fn(logits, labels)
    assert loss.item() == pytest.approx(6 * ln2 / 2)
    loss.backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[-0.25, 0.25, 0.25], [0.25, 0.25, 0.25]]))
    assert loss_fn.pos_grad.tolist() == [0.5, 0.0, 0.0]
    assert loss_fn.neg_grad.tolist() == [0.5, 1.0, 1.0]
    assert int(loss_fn.num_updates) == 1

    # Call 2: ratio = [0.5 / (0.5 + 1e-10), 0, 0].
    ratio0 = 0.5 / (0.5 + 1e-10)
    neg_w = [_sigmoid(12.0 * (ratio0 - 0.8)), _sigmoid(-12.0 * 0.8), _sigmoid(-12.0 * 0.8)]
    assert neg_w[0] == pytest.approx(0.9168273, abs=1e-6)
    assert neg_w[1] == pytest.approx(6.7724e-5, rel=1e-4)
    pos_w = [1.0 + 4.0 * (1.0 - w) for w in neg_w]
    got_pos_w, got_neg_w = loss_fn.class_weights()
    assert got_pos_w.tolist() == pytest.approx(pos_w, rel=1e-12)
    assert got_neg_w.tolist() == pytest.approx(neg_w, rel=1e-12)

    logits = torch.zeros(2, 3, requires_grad=True)
    loss = loss_fn(logits, labels)
    expected_loss = ln2 * (pos_w[0] + neg_w[1] + neg_w[2] + neg_w[0] + neg_w[1] + neg_w[2]) / 2
    assert loss.item() == pytest.approx(expected_loss, rel=1e-6)
    loss.backward()
    expected_grad = torch.tensor([[-0.5 * pos_w[0], 0.5 * neg_w[1], 0.5 * neg_w[2]],
                                  [0.5 * neg_w[0], 0.5 * neg_w[1], 0.5 * neg_w[2]]]) / 2
    torch.testing.assert_close(logits.grad, expected_grad)
    # Statistics: |w * grad| of the summed loss, accumulated on top of call 1.
    assert loss_fn.pos_grad.tolist() == pytest.approx([0.5 + 0.5 * pos_w[0], 0.0, 0.0], rel=1e-6)
    assert loss_fn.neg_grad.tolist() == pytest.approx(
        [0.5 + 0.5 * neg_w[0], 1.0 + 2 * 0.5 * neg_w[1], 1.0 + 2 * 0.5 * neg_w[2]], rel=1e-6)
    assert int(loss_fn.num_updates) == 2


def test_eqlv2_weights_follow_preloaded_statistics():
    loss_fn = EQLv2Loss(3, gamma=12.0, mu=0.8, alpha=4.0)
    loss_fn.pos_grad.copy_(torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64))
    loss_fn.neg_grad.copy_(torch.tensor([2.0, 4.0, 3.0], dtype=torch.float64))
    loss_fn.num_updates.fill_(1)
    pos_w, neg_w = loss_fn.class_weights()
    ratios = [2.0 / (2.0 + 1e-10), 0.25, 0.0]
    expected_neg = [_sigmoid(12.0 * (r - 0.8)) for r in ratios]
    assert neg_w.tolist() == pytest.approx(expected_neg, rel=1e-12)
    assert pos_w.tolist() == pytest.approx([1 + 4 * (1 - w) for w in expected_neg], rel=1e-12)


@pytest.mark.parametrize("activation", ["sigmoid", "gumbel"])
def test_eqlv2_gradient_is_the_weighted_analytical_gradient(activation):
    torch.manual_seed(1)
    num_classes, n = 7, 12
    loss_fn = EQLv2Loss(num_classes, activation=activation)
    loss_fn.pos_grad.uniform_(0.0, 2.0)
    loss_fn.neg_grad.uniform_(0.5, 3.0)
    loss_fn.num_updates.fill_(5)
    before_pos, before_neg = loss_fn.pos_grad.clone(), loss_fn.neg_grad.clone()
    logits = (torch.randn(n, num_classes, dtype=torch.float64) * 3).requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 7, 7, 3, -100, 6, 6, 7, 4, 5])
    pos_w, neg_w = loss_fn.class_weights()
    loss = loss_fn(logits, labels)
    loss.backward()

    y = reference.one_hot_targets(labels, num_classes, -100, torch.float64)
    clamp = (-4.0, 10.0) if activation == "gumbel" else (None, None)
    element_loss, element_grad = reference.element_loss_and_grad(
        logits.detach(), y, activation, clamp[0], clamp[1], "reference")
    w = y * pos_w[None] + (1 - y) * neg_w[None]
    w[labels == -100] = 0
    valid_rows = int((labels != -100).sum())
    torch.testing.assert_close(loss, (w * element_loss).sum() / valid_rows)
    torch.testing.assert_close(logits.grad, w * element_grad / valid_rows)

    # And the statistics just added are the one-hot split of |w * grad| (summed loss).
    magnitude = (w * element_grad).abs()
    torch.testing.assert_close(loss_fn.pos_grad - before_pos, (magnitude * y).sum(0))
    torch.testing.assert_close(loss_fn.neg_grad - before_neg, (magnitude * (1 - y)).sum(0))


def test_eqlv2_first_call_equals_plain_bce():
    torch.manual_seed(2)
    logits = torch.randn(9, 5, requires_grad=True)
    labels = torch.tensor([0, 1, 5, 5, 2, 4, 4, 5, 3])
    for activation in ("sigmoid", "gumbel"):
        loss = EQLv2Loss(5, activation=activation)(logits, labels)
        (grad,) = torch.autograd.grad(loss, logits)
        expected = gk.gol_loss(logits, labels, mode="bce", activation=activation)
        (expected_grad,) = torch.autograd.grad(expected, logits)
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(grad, expected_grad)


def test_eqlv2_statistics_accumulate_across_calls():
    torch.manual_seed(3)
    num_classes = 6
    loss_fn = EQLv2Loss(num_classes)
    total_pos = torch.zeros(num_classes, dtype=torch.float64)
    total_neg = torch.zeros(num_classes, dtype=torch.float64)
    for step in range(4):
        logits = torch.randn(10, num_classes, requires_grad=True)
        labels = torch.randint(0, num_classes + 1, (10,))
        pos_w, neg_w = loss_fn.class_weights()
        loss_fn(logits, labels).backward()
        y = reference.one_hot_targets(labels, num_classes, -100, torch.float64)
        g = (torch.sigmoid(logits.detach().double()) - y) * (y * pos_w + (1 - y) * neg_w)
        total_pos += (g.abs() * y).sum(0)
        total_neg += (g.abs() * (1 - y)).sum(0)
        torch.testing.assert_close(loss_fn.pos_grad, total_pos, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(loss_fn.neg_grad, total_neg, rtol=1e-6, atol=1e-7)
        assert int(loss_fn.num_updates) == step + 1
    # Evaluation mode does not touch the statistics; neither do non-finite logits.
    loss_fn.eval()
    loss_fn(torch.randn(4, num_classes), torch.tensor([0, 1, 2, 6]))
    assert int(loss_fn.num_updates) == 4
    loss_fn.train()
    bad = torch.zeros(2, num_classes)
    bad[0, 1] = float("nan")
    assert not torch.isfinite(loss_fn(bad, torch.tensor([0, 6])))
    assert bool(torch.isfinite(loss_fn.pos_grad).all() and torch.isfinite(loss_fn.neg_grad).all())
    # The buffers travel in the state dict.
    assert {"pos_grad", "neg_grad", "num_updates"} <= set(loss_fn.state_dict())


def test_eqlv2_rejects_bad_input():
    loss_fn = EQLv2Loss(3)
    with pytest.raises(ValueError, match="logits"):
        loss_fn(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="out of range"):
        loss_fn(torch.zeros(2, 3), torch.tensor([0, 4]))


def test_registered_names():
    counts = [5, 50, 500]
    for name, cls, activation in [("federated", FederatedLoss, "sigmoid"),
                                  ("federated_gumbel", FederatedLoss, "gumbel"),
                                  ("eqlv2", EQLv2Loss, "sigmoid"),
                                  ("eqlv2_gumbel", EQLv2Loss, "gumbel")]:
        assert name in LOSS_NAMES
        module = build_classification_loss(name, counts, 600)
        assert isinstance(module, cls) and module.activation == activation
        assert module.num_logits(3) == 3
        loss = module(torch.zeros(2, 3, requires_grad=True), torch.tensor([1, 3]))
        assert torch.isfinite(loss)
    assert build_classification_loss("eqlv2", num_classes=11).num_classes == 11
