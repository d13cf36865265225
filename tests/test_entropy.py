import pytest
import torch

from bdcodec.entropy import (SCALE_TABLE, GlobalContext, LaplacianBias, LaplacianEntropyModel, anchor_mask,
                             scale_indexes)


def test_checkerboard_parity():
    m = anchor_mask(4, 5)
    assert m[0, 0] and not m[0, 1] and not m[1, 0] and m[1, 1]
    assert m.sum() == 10
    # the local context conv sees only the opposite parity: anchors feed non-anchors
    ent = LaplacianEntropyModel(8, [4, 4], hyper_ch=6)
    w = ent.g_ls[0].mask[0, 0]
    assert w[2, 2] == 0 and w[2, 1] == 1 and w[1, 1] == 0


def test_laplacian_bias_shape_and_learnable():
    bias = LaplacianBias(window=8, heads=4)
    b = bias()
    assert b.shape == (4, 64, 64)
    assert torch.allclose(b[:, 0, 0], torch.ones(4))  # A^2 at distance 0
    # token 0 = (0, 0), token 2 = (0, 2): L1 distance 2
    assert torch.allclose(b[0, 0, 2], torch.exp(torch.tensor(-2.0 / 2)))
    assert torch.all(b[0, 0, 1] > b[0, 0, 2])  # decays with distance
    b.sum().backward()
    assert bias.A.grad.abs().sum() > 0 and bias.B.grad.abs().sum() > 0


def test_non_anchor_never_sees_a_non_anchor():
    torch.manual_seed(0)
    g = GlobalContext(4, 8, dim=16, heads=4, depth=2, window=8).eval()
    h, w = 11, 13
    anchors = anchor_mask(h, w)
    x = torch.randn(1, 4, h, w) * anchors
    out = g(x)
    x2 = x.clone()
    x2[:, :, 3, 4] = 5.0  # a non-anchor position gets a value (3 + 4 odd)
    assert not anchors[3, 4]
    out2 = g(x2)
    diff = (out2 - out).abs().sum(1)[0]
    assert diff[~anchors].max() < 1e-6  # no non-anchor output moved
    x3 = x.clone()
    x3[:, :, 4, 4] += 1.0  # an anchor change reaches non-anchors in its window
    assert (g(x3) - out).abs().sum(1)[0][~anchors].max() > 1e-4


def test_entropy_model_pass_structure_is_causal():
    torch.manual_seed(0)
    ent = LaplacianEntropyModel(16, [4, 4, 8], hyper_ch=6).eval()
    psi = torch.randn(1, 6, 8, 8)
    y = torch.randn(1, 16, 8, 8) * 3
    y_hat, mu, sigma = ent(y, psi)
    # anchor params of chunk 0 depend only on psi
    mu_a, _ = ent.chunk_params(0, psi, None, None)
    anchors = anchor_mask(8, 8)
    assert torch.allclose(mu[0, :4][:, anchors], mu_a[0][:, anchors])
    # y_hat is an integer offset from mu
    r = y_hat - mu
    assert torch.allclose(r, r.round(), atol=1e-5)


def test_scale_indexes_pick_first_scale_not_below():
    s = torch.tensor([0.0, 0.11, 0.12, 1.0, 300.0])
    idx = scale_indexes(s)
    assert idx.tolist()[0] == 0 and idx.tolist()[-1] == len(SCALE_TABLE) - 1
    assert torch.all(SCALE_TABLE[idx[1:4]] >= s[1:4] - 1e-6)
    assert torch.all(SCALE_TABLE[(idx[2:4] - 1)] < s[2:4])


@pytest.mark.parametrize("size", [(8, 12), (7, 5), (1, 1), (1, 6), (5, 1)])
def test_fixed_hyper_terms_give_the_models_numbers(size):
    """The fit's form of the model (psi's part taken once, each pass only where it codes) gives the
    values and gradients of the plain one, with straight-through and annealed rounding, checkpointed."""
    from bdcodec.effort import _sga_rounding

    torch.manual_seed(0)
    ent = LaplacianEntropyModel(M=24, chunks=[8, 16], hyper_ch=20).eval()
    y = (torch.randn(1, 24, *size) * 3).requires_grad_(True)
    psi = torch.randn(1, 20, *size)
    terms = ent.hyper_terms(psi)
    for sga, checkpoint in ((False, False), (True, False), (False, True)):
        outs = []
        for given in (psi, terms):
            rounding = _sga_rounding(0.3, torch.Generator().manual_seed(1)) if sga else None
            out = ent(y, given, rounding, checkpoint=checkpoint)
            loss = sum((o * (k + 1)).square().sum() for k, o in enumerate(out))
            outs.append(list(out) + list(torch.autograd.grad(loss, y)))
        for a, b in zip(*outs):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
        assert outs[0][-1].abs().sum() > 0
