"""Blur-dissipated diffusion decoder: DCT, schedule, posterior sampler, denoiser.

Forward process (Hoogeboom & Salimans, *Blurring Diffusion Models*, 2022), per
orthonormal DCT-II frequency (i, j) of an H x W image with values in [-1, 1]::

    lambda_ij = (pi i / H)^2 + (pi j / W)^2
    tau_t     = sigma_B(t)^2 / 2,   sigma_B(t) = sigma_B_max * sin^2(pi t / 2)
    d_t       = (1 - d_min) exp(-lambda tau_t) + d_min           (blur = damping)
    logSNR(t) = -2 log tan(a t + b)                              (cosine, [-10, 10]; decoder 1)
    logSNR(t) = l_max - (l_max - l_min) t                        (log-linear; decoder 2)
    a_t = sqrt(sigmoid(logSNR)),  sigma_t = sqrt(sigmoid(-logSNR))
    alpha_t   = a_t * d_t                                        (one per frequency)
    z_t       = IDCT(alpha_t * DCT(x0)) + sigma_t * eps

High frequencies are damped first, so the reverse process restores coarse
structure before fine detail.  The denoiser predicts x0 (not eps: dividing by
damping factors near 1e-3 would amplify its error a thousandfold), and each
reverse step samples the per-frequency Gaussian posterior q(u_s | u_t, u_x).
Schedules are computed in float64.  :class:`BlurSchedule` holds no weights;
the network is an argument of :meth:`BlurSchedule.sample`.

Decoder 2 (:class:`Denoiser2`) is conditioned on x_bar, a good reconstruction,
so only noise levels from about the size of its error down matter: logSNR runs
log-linearly over [1, 10] (sigma_t from 0.52 to 0.007, evenly spaced in log
sigma, so every step of the sampler covers the same ratio of noise) and the
blur reaches 3 px at t = 1, which removes what x_bar lacks at the lowest rates
and so makes the chain's start from x_bar's marginal nearly exact.  Frequencies
then leave the blur while the noise is still as large as their residual: the
noise decides the texture, which is what makes the decoder sample.  (Decoder 1's
range, [-10, 10] with a 16-px blur, spent almost all of t at noise levels that
drown x - x_bar; its denoiser learned to ignore z_t and the sampler returned the
same image for every seed and temperature.)  The network works on the
*innovation* r_t = z_t - IDCT(alpha_t * DCT(x_bar)) with EDM's preconditioning
(Karras et al. 2022) for a residual of scale ``data_std``:

    x0 = x_bar + c_skip r_t + c_out F(c_in r_t, t; x_bar, texture)
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["dct_matrix", "dct2", "idct2", "BlurSchedule", "Denoiser", "Denoiser2", "Texture2"]


@lru_cache(maxsize=16)
def _dct_matrix64(n: int) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64).view(-1, 1)
    i = torch.arange(n, dtype=torch.float64).view(1, -1)
    m = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m


def dct_matrix(n: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Orthonormal DCT-II matrix C (n x n): ``DCT(v) = C v`` and ``C^T C = I``."""
    return _dct_matrix64(n).to(device=device, dtype=dtype)


def _dct_last(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-II along the last dimension in O(N log N) (Makhoul's FFT algorithm)."""
    n = x.shape[-1]
    v = torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], -1)
    k = torch.arange(n, dtype=x.dtype, device=x.device)
    w = torch.polar(torch.ones_like(k), -math.pi * k / (2 * n))
    out = (torch.fft.fft(v, dim=-1) * w).real * math.sqrt(2.0 / n)
    out[..., 0] = out[..., 0] / math.sqrt(2.0)
    return out


def _idct_last(u: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_dct_last` (orthonormal DCT-III)."""
    n = u.shape[-1]
    c = u * math.sqrt(n / 2.0)
    c[..., 0] = c[..., 0] * math.sqrt(2.0)
    k = torch.arange(n, dtype=u.dtype, device=u.device)
    flipped = torch.cat([torch.zeros_like(c[..., :1]), c[..., 1:].flip(-1)], -1)  # c_{N-k}, c_N = 0
    spec = torch.complex(c, -flipped) * torch.polar(torch.ones_like(k), math.pi * k / (2 * n))
    v = torch.fft.ifft(spec, dim=-1).real
    x = torch.empty_like(v)
    half = (n + 1) // 2
    x[..., ::2] = v[..., :half]
    x[..., 1::2] = v[..., half:].flip(-1)
    return x


def dct2(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal 2-D DCT-II over the last two dimensions (equals ``C_H x C_W^T``)."""
    return _dct_last(_dct_last(x).transpose(-1, -2)).transpose(-1, -2)


def idct2(u: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dct2`."""
    return _idct_last(_idct_last(u).transpose(-1, -2)).transpose(-1, -2)


class BlurSchedule:
    """Blur-dissipated forward process and its posterior sampler (continuous t in [0, 1])."""

    def __init__(self, sigma_blur_max: float = 16.0, min_damping: float = 0.001,
                 logsnr_min: float = -10.0, logsnr_max: float = 10.0, shape: str = "cosine",
                 data_std: float | None = None):
        if shape not in ("cosine", "linear"):
            raise ValueError(f"unknown logSNR shape {shape!r}")
        self.sigma_blur_max = sigma_blur_max
        self.min_damping = min_damping
        self.logsnr_min, self.logsnr_max, self.shape = logsnr_min, logsnr_max, shape
        self.data_std = data_std  # None: the network predicts x0 directly from z_t (decoder 1)
        self._b = math.atan(math.exp(-logsnr_max / 2))
        self._a = math.atan(math.exp(-logsnr_min / 2)) - self._b

    @classmethod
    def for_config(cls, cfg) -> "BlurSchedule":
        """The schedule a model was trained with (:class:`~bdcodec.model.ModelConfig`)."""
        if cfg.decoder == 1:
            return cls(cfg.sigma_blur_max, cfg.min_damping)
        return cls(cfg.sigma_blur_max, cfg.min_damping, cfg.logsnr_min, cfg.logsnr_max, "linear", cfg.data_std)

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(torch.float64)
        if self.shape == "linear":
            return self.logsnr_max - (self.logsnr_max - self.logsnr_min) * t
        return -2.0 * torch.log(torch.tan(self._a * t + self._b))

    def noise(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, sigma_t), float64, same shape as ``t``."""
        logsnr = self.logsnr(t)
        return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()

    def damping(self, t: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """d_t per frequency: (*t.shape, h, w), float64."""
        t = t.to(torch.float64)
        fi = (math.pi * torch.arange(h, dtype=torch.float64, device=t.device) / h) ** 2
        fj = (math.pi * torch.arange(w, dtype=torch.float64, device=t.device) / w) ** 2
        lam = fi.view(-1, 1) + fj.view(1, -1)
        sigma_b = self.sigma_blur_max * torch.sin(math.pi * t / 2) ** 2
        tau = (sigma_b**2 / 2).reshape(*t.shape, 1, 1)
        return (1 - self.min_damping) * torch.exp(-lam * tau) + self.min_damping

    def marginal(self, t: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t per frequency (*t, h, w), sigma_t (*t, 1, 1)), float64."""
        a, s = self.noise(t)
        return a.reshape(*t.shape, 1, 1) * self.damping(t, h, w), s.reshape(*t.shape, 1, 1)

    def diffuse(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """z_t for a batch (B, C, H, W) with per-sample times ``t`` (B,)."""
        h, w = x0.shape[-2:]
        alpha, sigma = self.marginal(t, h, w)
        alpha = alpha.to(x0.dtype).unsqueeze(1)
        sigma = sigma.to(x0.dtype).unsqueeze(1)
        return idct2(alpha * dct2(x0)) + sigma * eps

    def posterior(self, t: float, s: float, h: int, w: int):
        """Coefficients of q(u_s | u_t, u_x) = N(c_t u_t + c_x u_x, var) per frequency (float64)."""
        tt = torch.tensor([t, s], dtype=torch.float64)
        alpha, sigma = self.marginal(tt, h, w)
        a_t, a_s = alpha[0], alpha[1]
        s2_t, s2_s = sigma[0] ** 2, sigma[1] ** 2
        a_ts = a_t / a_s
        s2_ts = (s2_t - a_ts**2 * s2_s).clamp(min=1e-20)
        var = 1.0 / (1.0 / s2_s + a_ts**2 / s2_ts)
        return var * a_ts / s2_ts, var * a_s / s2_s, var

    def denoise(self, net, z: torch.Tensor, t: torch.Tensor, texture, x_bar: torch.Tensor,
                x_bar_dct: torch.Tensor | None = None, z_dct: torch.Tensor | None = None):
        """x0 predicted from z_t; returns ``(x0, c_out)`` (c_out is None for decoder 1).

        ``t`` is (B,); ``x_bar_dct``/``z_dct`` save transforms the caller already has.
        """
        if self.data_std is None:
            return net(z, t, texture, x_bar), None
        h, w = z.shape[-2:]
        dtype = z.dtype
        a, sigma = self.noise(t)
        alpha = a.reshape(-1, 1, 1) * self.damping(t, h, w)
        xd = dct2(x_bar) if x_bar_dct is None else x_bar_dct
        zd = dct2(z) if z_dct is None else z_dct
        r = idct2(zd - alpha.to(device=z.device, dtype=dtype).unsqueeze(1) * xd)
        sd2 = self.data_std**2
        a, s2 = a.view(-1, 1, 1, 1), (sigma**2).view(-1, 1, 1, 1)
        norm = (a**2 * sd2 + s2).sqrt()
        c_in, c_skip, c_out = 1 / norm, a * sd2 / norm**2, s2.sqrt() * self.data_std / norm
        c_in, c_skip, c_out = (c.to(device=z.device, dtype=dtype) for c in (c_in, c_skip, c_out))
        return x_bar + c_skip * r + c_out * net(c_in * r, t, texture, x_bar), c_out

    @torch.no_grad()
    def sample(self, net, cond: dict, x_init: torch.Tensor, steps: int, temperature: float,
               generator: torch.Generator) -> torch.Tensor:
        """Reverse process from t = 1 to 0 in ``steps`` posterior steps; returns x0 in [-1, 1].

        ``net(z_t, t, **cond)`` predicts x0 (through :meth:`denoise`).  The chain starts at
        the forward marginal of ``x_init`` (the fidelity reconstruction) with
        ``temperature``-scaled noise; temperature 0 makes the decode deterministic
        without any noise.
        """
        b, c, h, w = x_init.shape
        dtype, device = x_init.dtype, x_init.device

        def randn():
            e = torch.randn((b, c, h, w), generator=generator, dtype=torch.float32)
            return e.to(device=device, dtype=dtype)

        alpha, sigma = self.marginal(torch.ones(()), h, w)
        # The chain lives in the DCT domain: z_t = IDCT(u_t).  White noise is white in any
        # orthonormal basis, so it is drawn there directly.
        x_dct = dct2(x_init)
        u = alpha.to(dtype=dtype, device=device) * x_dct
        if temperature > 0:
            u = u + temperature * float(sigma) * randn()
        times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
        x0 = x_init
        for t, s in zip(times[:-1], times[1:]):
            tb = torch.full((b,), t, dtype=dtype, device=device)
            x0 = self.denoise(net, idct2(u), tb, cond["texture"], cond["x_bar"], x_dct, u)[0].clamp(-1, 1)
            if s <= 0:
                break
            c_t, c_x, var = (v.to(dtype=dtype, device=device) for v in self.posterior(t, s, h, w))
            u = c_t * u + c_x * dct2(x0)
            if temperature > 0:
                u = u + temperature * var.sqrt() * randn()
        return x0


def _timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


class _GroupNorm(nn.GroupNorm):
    """GroupNorm with its statistics summed in fp64, so that they do not depend on the thread count.

    The CPU kernel splits each group's fp32 sums among the threads on channels-last input, so they change
    in the last bit with the thread count, and under bf16 autocast such changes survive the rounding: 1 and
    2 threads gave perceptual decodes a grey level apart in 4 % of the pixels.  In fp64 they vanish before
    the statistics are rounded to fp32.  The normalisation itself is one multiply-add per element."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        g = self.num_groups
        with torch.autocast(x.device.type, enabled=False):
            xf = x.float()
            s1 = xf.sum((2, 3), dtype=torch.float64).view(b, g, -1).sum(-1)
            s2 = (xf * xf).sum((2, 3), dtype=torch.float64).view(b, g, -1).sum(-1)
            n = h * w * (c // g)
            mean = s1 / n
            rstd = (s2 / n - mean * mean).clamp(min=0).add(self.eps).rsqrt()
            mean, rstd = mean.repeat_interleave(c // g, 1), rstd.repeat_interleave(c // g, 1)
            scale = rstd * self.weight.double()
            shift = self.bias.double() - mean * scale
            out = torch.addcmul(shift.float()[:, :, None, None], xf, scale.float()[:, :, None, None])
        return out.to(x.dtype)


class _ResBlock(nn.Module):
    """Two 3x3 convs with a time FiLM in between (GroupNorm, SiLU)."""

    def __init__(self, cin: int, cout: int, temb: int):
        super().__init__()
        self.norm1 = _GroupNorm(8, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(temb, 2 * cout)
        self.norm2 = _GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        inplace = not torch.is_grad_enabled()  # decoding: no copies of the activations (same values)
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        scale, shift = self.film(temb)[:, :, None, None].chunk(2, 1)
        h = self.norm2(h)
        h = h.mul_(1 + scale).add_(shift) if inplace else h * (1 + scale) + shift
        h = self.conv2(F.silu(h, inplace=inplace))
        return h.add_(self.skip(x)) if inplace else self.skip(x) + h


class Denoiser(nn.Module):
    """D(z_t, t; texture, x_bar) -> x0, a two-level U-Net at 1/4 resolution.

    Inputs are pixel-unshuffled by 4 (3 -> 48 channels), so every convolution runs
    on 1/16 of the pixels; the texture features from y_hat join at the first level
    and x_bar (the fidelity decode) both joins the input and is the residual base:
    ``x0 = x_bar + U-Net(...)``, with the last layer initialised to zero.
    """

    def __init__(self, ch: int = 64, blocks: int = 2, cond_ch: int = 64, resize: bool = False):
        super().__init__()
        temb = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.ch = ch
        self.inp = nn.Conv2d(48 + 48 + cond_ch, ch, 3, padding=1)
        self.down1 = nn.ModuleList(_ResBlock(ch, ch, temb) for _ in range(blocks))
        self.down = nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1)
        self.mid = nn.ModuleList(_ResBlock(2 * ch, 2 * ch, temb) for _ in range(blocks))
        # followed by PixelShuffle(2) -> ch, or (resize) by nearest-neighbour upsampling, which has no phases
        self.resize = resize
        self.up = nn.Conv2d(2 * ch, ch if resize else 4 * ch, 3, padding=1)
        self.up1 = nn.ModuleList(_ResBlock(2 * ch if i == 0 else ch, ch, temb) for i in range(blocks))
        self.out_norm = _GroupNorm(8, ch)
        self.out = nn.Conv2d(ch, 48, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z: torch.Tensor, t: torch.Tensor, texture: torch.Tensor, x_bar: torch.Tensor):
        emb = self.temb(_timestep_embedding(t, self.ch))
        h = self.inp(torch.cat([F.pixel_unshuffle(z, 4), F.pixel_unshuffle(x_bar, 4), texture], 1))
        for blk in self.down1:
            h = blk(h, emb)
        skip = h
        h = self.down(h)
        for blk in self.mid:
            h = blk(h, emb)
        h = F.interpolate(self.up(h), scale_factor=2) if self.resize else F.pixel_shuffle(self.up(h), 2)
        h = torch.cat([h, skip], 1)
        for blk in self.up1:
            h = blk(h, emb)
        return x_bar + F.pixel_shuffle(self.out(F.silu(self.out_norm(h))), 4)


def _blur_down(x: torch.Tensor) -> torch.Tensor:
    """Halve the resolution through a [1 2 1]^2 / 16 low-pass (BlurPool, Zhang 2019): no aliasing
    of content at the Nyquist rate into a lattice, as a strided convolution or unshuffle lets through."""
    c = x.shape[1]
    k = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device)
    k = (k[:, None] * k[None, :] / 16).expand(c, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, stride=2, groups=c)


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class Texture2(nn.Module):
    """Texture latents from y_hat (H/16): features at H/8 and H/4 (bilinear up + conv, no sub-pixel
    shuffles, whose per-phase kernels can print a lattice)."""

    def __init__(self, M: int, ch: int):
        super().__init__()
        from .layers import ResidualBlock

        self.base = ResidualBlock(M, ch)
        self.conv8 = nn.Conv2d(ch, ch, 3, padding=1)
        self.res8 = ResidualBlock(ch, ch)
        self.conv4 = nn.Conv2d(ch, ch, 3, padding=1)
        self.res4 = ResidualBlock(ch, ch)

    def forward(self, y_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f8 = self.res8(self.conv8(_up(self.base(y_hat))))
        f4 = self.res4(self.conv4(_up(f8)))
        return f4, f8


class Denoiser2(nn.Module):
    """F(r, t; texture, x_bar), a four-level U-Net (full, 1/2, 1/4, 1/8 resolution).

    Every level is reached by a blur-pooled downsample and left by a bilinear upsample
    and a convolution, and the full-resolution level keeps its own skip (two plain convolutions there, for
    speed), so output pixels share no phase-dependent kernels: nothing in the network repeats with a period (the
    4x pixel-unshuffle of :class:`Denoiser` drew an 8-px lattice).  Texture features join
    at 1/4 and 1/8; x_bar joins at full resolution.  Channels 16 / 32 / ch / 2 ch keep the
    full-resolution levels cheap.  The last layer starts at zero, so an untrained network
    returns the preconditioned estimate x_bar + c_skip r_t.
    """

    def __init__(self, ch: int = 64, blocks: int = 2, cond_ch: int = 64):
        super().__init__()
        c0, c1, c2, c3 = 16, 32, ch, 2 * ch
        temb = 4 * ch
        self.ch = ch
        self.temb = nn.Sequential(nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.inp = nn.Conv2d(6, c0, 3, padding=1)
        self.down1 = nn.Conv2d(c0, c1, 3, padding=1)
        self.enc1 = _ResBlock(c1, c1, temb)
        self.down2 = nn.Conv2d(c1 + cond_ch, c2, 3, padding=1)
        self.enc2 = nn.ModuleList(_ResBlock(c2, c2, temb) for _ in range(blocks))
        self.down3 = nn.Conv2d(c2 + cond_ch, c3, 3, padding=1)
        self.mid = nn.ModuleList(_ResBlock(c3, c3, temb) for _ in range(blocks))
        self.up2 = nn.Conv2d(c3, c2, 3, padding=1)
        self.dec2 = nn.ModuleList(_ResBlock(2 * c2 if i == 0 else c2, c2, temb) for i in range(blocks))
        self.up1 = nn.Conv2d(c2, c1, 3, padding=1)
        self.dec1 = _ResBlock(2 * c1, c1, temb)
        self.up0 = nn.Conv2d(c1, c0, 3, padding=1)
        self.dec0 = nn.Conv2d(2 * c0, c0, 3, padding=1)
        self.out = nn.Conv2d(c0, 3, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    STRIP = 256  # full-resolution rows per strip of the full-resolution layers on large images (no grad)
    MARGIN = 8  # rows on each side that cover those layers' reach (4 needed)

    def _stem(self, rx: torch.Tensor) -> torch.Tensor:
        return self.down1(_blur_down(F.silu(self.inp(rx))))

    def _head(self, h: torch.Tensor, rx: torch.Tensor) -> torch.Tensor:
        h = self.dec0(torch.cat([self.up0(_up(h)), F.silu(self.inp(rx))], 1))
        return self.out(F.silu(h))

    def _strips(self, rx: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`_stem` (``h`` None) or :meth:`_head` over strips of rows, each with MARGIN rows
        of context that are cut away after: the full-resolution layers are local and have no
        normalisation, so strips give the whole image's values at a fraction of its memory
        (the full-resolution activations of a 3000x2000 image take about 2 GB)."""
        full, m = rx.shape[-2], self.MARGIN
        out = []
        for a in range(0, full, self.STRIP):
            b = min(a + self.STRIP, full)
            lo, hi = max(a - m, 0), min(b + m, full)  # even: sizes are multiples of 64
            if h is None:
                part = self._stem(rx[..., lo:hi, :])
                out.append(part[..., (a - lo) // 2 : (b - lo) // 2, :])
            else:
                part = self._head(h[..., lo // 2 : hi // 2, :], rx[..., lo:hi, :])
                out.append(part[..., a - lo : b - lo, :])
        return torch.cat(out, -2)

    def forward(self, r: torch.Tensor, t: torch.Tensor, texture, x_bar: torch.Tensor) -> torch.Tensor:
        f4, f8 = texture
        emb = self.temb(_timestep_embedding(t, self.ch))
        rx = torch.cat([r, x_bar], 1)
        strips = not torch.is_grad_enabled() and rx.shape[-2] > 2 * self.STRIP
        h1 = self.enc1(self._strips(rx) if strips else self._stem(rx), emb)
        h2 = self.down2(torch.cat([_blur_down(h1), f4], 1))
        for blk in self.enc2:
            h2 = blk(h2, emb)
        h = self.down3(torch.cat([_blur_down(h2), f8], 1))
        for blk in self.mid:
            h = blk(h, emb)
        h = torch.cat([self.up2(_up(h)), h2], 1)
        for blk in self.dec2:
            h = blk(h, emb)
        h = self.dec1(torch.cat([self.up1(_up(h)), h1], 1), emb)
        return self._strips(rx, h) if strips else self._head(h, rx)
