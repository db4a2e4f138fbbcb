"""The pure-PyTorch oracle: its Philox against Random123's known answers, and its pieces."""
import pytest
import torch

from gumbel_kernels import reference

# Random123 kat_vectors, philox4x32_10: (counter, key) -> output.
PHILOX_KATS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", PHILOX_KATS)
def test_philox_known_answers(counter, key, expected):
    words = reference.philox4x32_10(tuple(torch.tensor([c], dtype=torch.int64) for c in counter), key)
    assert tuple(int(w) for w in words) == expected


def test_philox_uniform_layout():
    # Element e uses word e & 3 of call e >> 2 with counter (lo32(g), hi32(g), offset words).
    seed, offset = 0x0123456789ABCDEF, (5 << 32) | 7
    u = reference.philox_uniform(3, 7, seed, offset)
    for e in (0, 3, 4, 13, 20):
        g = e >> 2
        counter = tuple(torch.tensor([v], dtype=torch.int64)
                        for v in (g & 0xFFFFFFFF, g >> 32, 7, 5))
        word = int(reference.philox4x32_10(counter, (seed & 0xFFFFFFFF, seed >> 32))[e & 3])
        assert u.view(-1)[e].item() == (word >> 8) * 2.0 ** -24
    assert u.dtype == torch.float32 and bool((u >= 0).all() and (u < 1).all())


def test_drop_ratio_is_float32_division_and_nan_without_foreground():
    ratio = reference.drop_ratio(torch.tensor(3), torch.tensor(1))
    assert ratio.dtype == torch.float32 and ratio.item() == pytest.approx(1 / 3)
    assert torch.isnan(reference.drop_ratio(torch.tensor(0), torch.tensor(0)))


def test_gumbel_losses_match_closed_forms():
    q = torch.tensor([[-5.0, -4.0, 0.0, 3.0, 12.0]], dtype=torch.float64)
    y = torch.zeros_like(q)
    loss, grad = reference.element_loss_and_grad(q, y, "gumbel", -4.0, 10.0, "exact")
    qc = q.clamp(-4, 10)
    p = torch.exp(-torch.exp(-qc))
    torch.testing.assert_close(loss, -torch.log1p(-p))
    inside = (q > -4) & (q < 10)
    torch.testing.assert_close(grad, torch.where(inside, p * torch.exp(-qc) / (1 - p), 0.0))
    loss, grad = reference.element_loss_and_grad(q, torch.ones_like(q), "gumbel", -4.0, 10.0, "exact")
    torch.testing.assert_close(loss, torch.exp(-qc))
    torch.testing.assert_close(grad, torch.where(inside, -torch.exp(-qc), 0.0))


def test_reference_grad_mode_is_bce_backward():
    # GOL trains with F.binary_cross_entropy(p, y): the reference mode must be its autograd.
    q = torch.linspace(-3.9, 9.9, 41, dtype=torch.float64)[None].repeat(2, 1)
    y = torch.zeros_like(q)
    y[0] = 1
    leaf = q.clone().requires_grad_()
    p = torch.exp(-torch.exp(-leaf.clamp(-4, 10)))
    torch.nn.functional.binary_cross_entropy(p, y, reduction="sum").backward()
    _, grad = reference.element_loss_and_grad(q, y, "gumbel", -4.0, 10.0, "reference")
    torch.testing.assert_close(grad, leaf.grad)


def test_check_labels_names_the_bad_label():
    with pytest.raises(ValueError, match=r"labels\[2\] = 9"):
        reference.check_labels(torch.tensor([0, 5, 9, -100]), 5, -100)
