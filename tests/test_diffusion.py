import math

import pytest
import torch

from bdcodec.diffusion import BlurSchedule, Denoiser, Denoiser2, dct2, dct_matrix, idct2
from bdcodec.model import ModelConfig


def test_dct_is_orthonormal_and_inverts_exactly():
    for n in (1, 7, 64):
        c = dct_matrix(n, torch.float64)
        assert torch.allclose(c @ c.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(2, 3, 24, 40, dtype=torch.float64)
    assert torch.allclose(idct2(dct2(x)), x, atol=1e-12)
    ref = dct_matrix(24, torch.float64) @ x @ dct_matrix(40, torch.float64).T
    assert torch.allclose(dct2(x), ref, atol=1e-12)  # the FFT algorithm equals the matrix definition
    for n in (1, 2, 5):  # odd and tiny sizes
        v = torch.randn(3, n, n + 1, dtype=torch.float64)
        assert torch.allclose(idct2(dct2(v)), v, atol=1e-12)
    # DC coefficient of an orthonormal DCT is mean * sqrt(H W)
    assert torch.allclose(dct2(x)[..., 0, 0], x.mean((-2, -1)) * math.sqrt(24 * 40))


def test_forward_process_damps_high_frequencies_first():
    sched = BlurSchedule(sigma_blur_max=16.0)
    d = sched.damping(torch.tensor([0.3, 0.6, 1.0]), 64, 64)
    assert torch.all(d[:, 0, 0] == 1.0)  # DC is never blurred
    assert torch.all(d[:, 0, 1] > d[:, 10, 10])  # low frequencies survive longer
    assert torch.all(d[0] >= d[1]) and torch.all(d[1] >= d[2])  # monotone in t
    assert d.min() >= sched.min_damping


@pytest.mark.parametrize("t,s", [(0.9, 0.7), (0.5, 0.45), (0.2, 0.05)])
def test_posterior_matches_direct_gaussian_conditioning(t, s):
    sched = BlurSchedule(sigma_blur_max=12.0)
    h, w = 8, 8
    c_t, c_x, var = sched.posterior(t, s, h, w)
    alpha, sigma = sched.marginal(torch.tensor([t, s], dtype=torch.float64), h, w)
    a_t, a_s, s2_t, s2_s = alpha[0], alpha[1], sigma[0] ** 2, sigma[1] ** 2
    a_ts = a_t / a_s
    # joint of (u_s, u_t) given u_x: u_t = a_ts u_s + noise; condition u_s on u_t
    cov = a_ts * s2_s
    var_direct = s2_s - cov**2 / s2_t
    assert torch.allclose(var, var_direct, rtol=1e-6, atol=1e-12)
    u_x, u_t = torch.randn(h, w, dtype=torch.float64), torch.randn(h, w, dtype=torch.float64)
    mean_direct = a_s * u_x + cov / s2_t * (u_t - a_t * u_x)
    assert torch.allclose(c_t * u_t + c_x * u_x, mean_direct, rtol=1e-6, atol=1e-9)


def _nets():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    v1 = (Denoiser(ch=16, blocks=1, cond_ch=8).eval(), BlurSchedule(), torch.randn(1, 8, 16, 16))
    v2 = (Denoiser2(ch=16, blocks=1, cond_ch=8).eval(), BlurSchedule.for_config(ModelConfig()),
          (torch.randn(1, 8, 16, 16), torch.randn(1, 8, 8, 8)))
    return x, {"decoder 1": v1, "decoder 2": v2}


@pytest.mark.parametrize("design", ["decoder 1", "decoder 2"])
def test_sampler_is_reproducible_and_temperature_zero_is_deterministic(design):
    x, nets = _nets()
    net, sched, texture = nets[design]
    cond = {"texture": texture, "x_bar": x}
    d0 = sched.sample(net, cond, x, 3, 0.0, torch.Generator().manual_seed(1))
    # a zero-initialised denoiser without noise returns its conditioning image
    assert torch.allclose(d0, x.clamp(-1, 1), atol=1e-5)
    torch.nn.init.normal_(net.out.weight, std=0.05)
    a = sched.sample(net, cond, x, 3, 0.7, torch.Generator().manual_seed(5))
    b = sched.sample(net, cond, x, 3, 0.7, torch.Generator().manual_seed(5))
    c = sched.sample(net, cond, x, 3, 0.7, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    d0 = sched.sample(net, cond, x, 3, 0.0, torch.Generator().manual_seed(1))
    d1 = sched.sample(net, cond, x, 3, 0.0, torch.Generator().manual_seed(2))
    assert torch.equal(d0, d1)


def test_decoder2_follows_z_where_the_noise_is_small_and_x_bar_where_it_is_large():
    """EDM preconditioning on the innovation z_t - alpha_t x_bar: even before training the estimate
    is x_bar plus the part of z_t the noise does not hide, so the sampler's last steps keep what its
    noise drew (decoder 1 returned the same image for every seed)."""
    x, nets = _nets()
    net, sched, texture = nets["decoder 2"]
    x_bar = x
    detail = torch.nn.functional.interpolate(torch.randn(1, 3, 16, 16), size=64, mode="bilinear")
    target = (x_bar + 0.1 * detail).clamp(-1, 1)  # a residual of 4-px features
    err = (x_bar - target).abs().mean()
    for t, most in ((0.0, 0.1), (0.25, 0.35)):
        tb = torch.full((1,), t)
        z = sched.diffuse(target, tb, torch.randn_like(x))
        x0, c_out = sched.denoise(net, z, tb, texture, x_bar)
        assert (x0 - target).abs().mean() < most * err, t
    tb = torch.ones(1)
    z = sched.diffuse(target, tb, torch.randn_like(x))
    x0, _ = sched.denoise(net, z, tb, texture, x_bar)
    assert (x0 - x_bar).abs().mean() < 0.05 * (z - x_bar).abs().mean()  # at t = 1 the noise is ignored


def test_weights_without_the_new_fields_keep_their_schedule():
    old = ModelConfig.from_json('{"N": 64, "M": 128, "sigma_blur_max": 16.0}')
    assert (old.decoder, old.sigma_blur_max, old.logsnr_min) == (1, 16.0, -10.0)
    sched = BlurSchedule.for_config(old)
    assert sched.data_std is None and sched.shape == "cosine"
    new = BlurSchedule.for_config(ModelConfig())
    a, s = new.noise(torch.tensor([0.0, 1.0]))
    assert s[0] < 0.01 and 0.4 < s[1] < 0.6  # noise from below a grey level to about x_bar's error scale


def test_decoder2_full_resolution_strips_equal_the_whole_image():
    torch.manual_seed(0)
    net = Denoiser2(ch=16, blocks=1, cond_ch=8).eval()
    torch.nn.init.normal_(net.out.weight, std=0.1)
    h, w = 704, 192  # three strips of 256 rows, the last one short
    r, x_bar = torch.randn(1, 3, h, w), torch.randn(1, 3, h, w)
    texture = (torch.randn(1, 8, h // 4, w // 4), torch.randn(1, 8, h // 8, w // 8))
    with torch.no_grad():
        strips = net(r, torch.tensor([0.4]), texture, x_bar)
        net.STRIP = 10**6
        whole = net(r, torch.tensor([0.4]), texture, x_bar)
    assert torch.allclose(strips, whole, atol=1e-6) and strips.abs().mean() > 0.01


def _design1(**kw):
    from bdcodec.model import BDCodecModel

    torch.manual_seed(0)
    cfg = ModelConfig(decoder=1, sigma_blur_max=16.0, logsnr_min=-10.0, logsnr_max=10.0, **kw)
    return BDCodecModel(cfg, trainable=True).eval()


def test_resized_decoder_is_the_phase_mean_of_the_shuffled_one():
    from bdcodec.train import SUBPEL, _resized_decoder

    m = _design1()
    with torch.no_grad():  # make each sub-pixel convolution's four phase kernels one: then both compute the same
        for name in SUBPEL:
            conv = m.get_submodule(name)
            for p in (conv.weight, conv.bias):
                q = p.reshape(p.shape[0] // 4, 4, *p.shape[1:])[:, :1]
                p.copy_(q.expand(-1, 4, *q.shape[2:]).reshape(p.shape))
        torch.nn.init.normal_(m.denoiser.out.weight, std=0.05)  # zero at initialisation: the U-Net would not show
    r, cfg = _resized_decoder(m)
    assert cfg.den_resize and '"den_resize": true' in cfg.to_json()
    assert "den_resize" not in m.cfg.to_json()  # weights without it are read by earlier versions
    y = torch.randn(1, 128, 6, 5)
    z, x_bar, t = torch.randn(1, 3, 96, 80), torch.rand(1, 3, 96, 80), torch.tensor([0.4])
    with torch.no_grad():
        assert torch.allclose(m.texture(y), r.texture(y), atol=1e-5)
        f = r.texture(y)
        out = r.denoiser(z, t, f, x_bar)
        assert torch.allclose(m.denoiser(z, t, f, x_bar), out, atol=1e-5) and (out - x_bar).abs().max() > 1e-2


def test_resized_texture_branch_draws_no_phase_pattern_on_a_flat_latent():
    y = torch.full((1, 128, 16, 16), 0.7)
    spread = {}
    for resize in (False, True):
        with torch.no_grad():
            f = _design1(den_resize=resize).texture(y)[..., 24:-24, 24:-24]  # away from the padding
        spread[resize] = (f - f.mean((2, 3), keepdim=True)).abs().max().item()
    assert spread[True] < 1e-5 < spread[False], spread
