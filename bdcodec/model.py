"""The bdcodec network: transforms, hyperprior, gains, entropy model, decoders.

::

    x ─► g_a ─► y ─(× gain[q])─► y_g ─► h_a ─► z ─► EntropyBottleneck ─► z_hat ─► h_s ─► psi
                                  │                                                    │
                                  └──────────► LaplacianEntropyModel(psi) ◄────────────┘
                                                     │ y_hat_g (symbols r + mu)
                                  y_hat = y_hat_g × inv_gain[q]
                      fidelity:   x_bar = g_s(y_hat)
                      perceptual: x_hat = blur-dissipated diffusion sampler(D, cond(y_hat), x_bar)

One set of weights serves every quality: ``gain`` and ``inv_gain`` hold one
vector per trained rate point (Cui et al., *Asymmetric Gained Deep Image
Compression With Continuous Rate Adaptation*, CVPR 2021), and a fractional
quality interpolates them geometrically.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .diffusion import Denoiser, Denoiser2, Texture2
from .entropy import SCALE_TABLE, LaplacianEntropyModel
from .layers import ResidualBlock, ResidualBlockUpsample, ResidualBlockWithStride, conv3x3, subpel_conv3x3

__all__ = ["ModelConfig", "BDCodecModel", "HyperTables"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture; stored as JSON in the weights' metadata."""

    N: int = 64  # transform channels
    N_outer: int = 0  # channels of g_a's first and g_s's last stage, at half resolution (0: N); most of their cost
    M: int = 128  # latent channels
    hyper_N: int = 96  # hyper-latent channels
    chunks: tuple[int, ...] = (16, 16, 32, 64)  # uneven channel chunks of y
    global_context: bool = True  # ablation switch for g_gs
    attn_dim: int = 64
    heads: int = 4
    depth: int = 2
    window: int = 8
    lambdas: tuple[float, ...] = (0.0018, 0.0035, 0.0067, 0.013, 0.025, 0.0483)  # MSE lambdas (x 255^2)
    decoder: int = 2  # diffusion decoder design: 1 = Denoiser (unshuffled, x0 from z_t), 2 = Denoiser2
    den_ch: int = 64  # diffusion denoiser width
    den_blocks: int = 2  # residual blocks per level
    den_resize: bool = False  # decoder 1: upsample by convolution + nearest neighbour, not sub-pixel convolutions
    sigma_blur_max: float = 3.0  # blur std (pixels) at t = 1
    min_damping: float = 0.001
    logsnr_min: float = 1.0  # decoder 2: log-linear logSNR from logsnr_max (t = 0) to logsnr_min (t = 1)
    logsnr_max: float = 10.0
    data_std: float = 0.1  # decoder 2: scale of x - x_bar in [-1, 1] units (preconditioning)

    # Weights written before a field existed were trained with these values.
    LEGACY = {"decoder": 1, "sigma_blur_max": 16.0, "logsnr_min": -10.0, "logsnr_max": 10.0}

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        if not data["N_outer"]:  # as before the field existed, so that earlier versions read these weights
            del data["N_outer"]
        if not data["den_resize"]:
            del data["den_resize"]
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"weights config has fields this version does not know: {sorted(unknown)}")
        for key in ("chunks", "lambdas"):
            if key in data:
                data[key] = tuple(data[key])
        for key, value in cls.LEGACY.items():
            data.setdefault(key, value)
        return cls(**data)

    @property
    def levels(self) -> int:
        return len(self.lambdas)


def _conv(cin, cout, k=5, s=2):
    return nn.Conv2d(cin, cout, k, stride=s, padding=k // 2)


def _deconv(cin, cout, k=5, s=2):
    return nn.ConvTranspose2d(cin, cout, k, stride=s, output_padding=s - 1, padding=k // 2)


def _compressai_entropy_models():
    """CompressAI's factorized prior and Gaussian conditional, for training only."""
    with warnings.catch_warnings():  # compressai's import runs torch.jit.script (via torch_geometric), now deprecated
        warnings.filterwarnings("ignore", r"`torch\.jit\.script` is deprecated", FutureWarning)
        from compressai.entropy_models import EntropyBottleneck, GaussianConditional
    return EntropyBottleneck, GaussianConditional


class HyperTables(nn.Module):
    """What coding needs of the trained factorized prior of z: its medians and quantized CDFs.

    The buffers carry the names of CompressAI's ``EntropyBottleneck`` (``quantiles``,
    ``_offset``, ``_quantized_cdf``, ``_cdf_length``), so they load from the same
    weights; the density model's own parameters are needed only in training.  Per
    channel c, a symbol ``s = round(z - median_c)`` is coded as bin ``s - _offset[c]``
    of the 16-bit CDF ``_quantized_cdf[c, :_cdf_length[c]]``; its last bin is
    CompressAI's overflow bin.
    """

    KEYS = ("quantiles", "_offset", "_quantized_cdf", "_cdf_length")

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("quantiles", torch.zeros(channels, 1, 3))
        self.register_buffer("_offset", torch.zeros(0, dtype=torch.int32))
        self.register_buffer("_quantized_cdf", torch.zeros(0, dtype=torch.int32))
        self.register_buffer("_cdf_length", torch.zeros(0, dtype=torch.int32))


class BDCodecModel(nn.Module):
    """The whole network.

    ``trainable=False`` builds the coding model: the hyperprior's density model is
    replaced by its frozen :class:`HyperTables`, and CompressAI is not imported.
    """

    def __init__(self, cfg: ModelConfig = ModelConfig(), trainable: bool = True):
        super().__init__()
        self.trainable = trainable
        self.cfg = cfg
        N, M, Nh = cfg.N, cfg.M, cfg.hyper_N
        No = cfg.N_outer or N
        self.g_a = nn.Sequential(
            ResidualBlockWithStride(3, No, stride=2),
            ResidualBlock(No, No),
            ResidualBlockWithStride(No, N, stride=2),
            ResidualBlock(N, N),
            ResidualBlockWithStride(N, N, stride=2),
            ResidualBlock(N, N),
            conv3x3(N, M, stride=2),
        )
        self.g_s = nn.Sequential(
            ResidualBlock(M, N),
            ResidualBlockUpsample(N, N, 2),
            ResidualBlock(N, N),
            ResidualBlockUpsample(N, N, 2),
            ResidualBlock(N, N),
            ResidualBlockUpsample(N, No, 2),
            ResidualBlock(No, No),
            subpel_conv3x3(No, 3, 2),
        )
        self.h_a = nn.Sequential(
            conv3x3(M, Nh), nn.LeakyReLU(inplace=True), _conv(Nh, Nh), nn.LeakyReLU(inplace=True), _conv(Nh, Nh)
        )
        hyper_ch = 2 * Nh
        self.h_s = nn.Sequential(
            _deconv(Nh, Nh),
            nn.LeakyReLU(inplace=True),
            _deconv(Nh, Nh * 3 // 2),
            nn.LeakyReLU(inplace=True),
            conv3x3(Nh * 3 // 2, hyper_ch),
        )
        if trainable:
            EntropyBottleneck, GaussianConditional = _compressai_entropy_models()
            self.entropy_bottleneck = EntropyBottleneck(Nh)
            self.gaussian = GaussianConditional(SCALE_TABLE.tolist())
        else:
            self.entropy_bottleneck = HyperTables(Nh)
        self.entropy = LaplacianEntropyModel(
            M, list(cfg.chunks), hyper_ch, cfg.global_context, cfg.attn_dim, cfg.heads, cfg.depth, cfg.window
        )
        # Initial gains follow the quantiser step a lambda implies (step ~ lambda^-1/2).
        lam = torch.tensor(cfg.lambdas, dtype=torch.float32)
        g0 = (lam / lam.log().mean().exp()).sqrt().view(-1, 1)
        self.gain = nn.Parameter(g0.repeat(1, M))
        self.inv_gain = nn.Parameter((1 / g0).repeat(1, M))
        # Texture latents for the diffusion decoder: y_hat (H/16) -> features at H/4 (and H/8).
        if cfg.decoder == 1:
            self.texture = nn.Sequential(
                ResidualBlock(M, cfg.den_ch),
                ResidualBlockUpsample(cfg.den_ch, cfg.den_ch, 2, resize=cfg.den_resize),
                ResidualBlockUpsample(cfg.den_ch, cfg.den_ch, 2, resize=cfg.den_resize),
            )
            self.denoiser = Denoiser(cfg.den_ch, cfg.den_blocks, cond_ch=cfg.den_ch, resize=cfg.den_resize)
        elif cfg.decoder == 2:
            self.texture = Texture2(M, cfg.den_ch)
            self.denoiser = Denoiser2(cfg.den_ch, cfg.den_blocks, cond_ch=cfg.den_ch)
        else:
            raise ValueError(f"unknown diffusion decoder {cfg.decoder}")

    # -- rate control -------------------------------------------------------------------------
    def level(self, quality: float) -> float:
        """Map quality 0..100 to a fractional rate level 0..levels-1."""
        return max(0.0, min(100.0, float(quality))) / 100.0 * (self.cfg.levels - 1)

    def lmbda(self, level: float) -> float:
        lo, w = self._split(level)
        hi = min(lo + 1, self.cfg.levels - 1)
        la, lb = math.log(self.cfg.lambdas[lo]), math.log(self.cfg.lambdas[hi])
        return math.exp((1 - w) * la + w * lb)

    def _split(self, level: float) -> tuple[int, float]:
        lo = min(int(math.floor(level)), self.cfg.levels - 1)
        return lo, level - lo

    def gains(self, level: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(gain, inv_gain) as (1, M, 1, 1) tensors, interpolated geometrically between levels."""
        lo, w = self._split(level)
        hi = min(lo + 1, self.cfg.levels - 1)
        g = self.gain.abs().clamp(min=1e-3)
        ig = self.inv_gain.abs().clamp(min=1e-3)
        gv = g[lo] ** (1 - w) * g[hi] ** w
        igv = ig[lo] ** (1 - w) * ig[hi] ** w
        return gv.view(1, -1, 1, 1), igv.view(1, -1, 1, 1)

    # -- training -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, level: float) -> dict:
        gain, inv_gain = self.gains(level)
        y_a = self.g_a(x).float()
        y = y_a * gain
        z = self.h_a(y)
        with torch.autocast(x.device.type, enabled=False):  # likelihoods stay in fp32 under autocast
            z_hat, z_lik = self.entropy_bottleneck(z.float())
        psi = self.h_s(z_hat)
        y_hat, mu, sigma = self.entropy(y, psi)
        with torch.autocast(x.device.type, enabled=False):
            _, y_lik = self.gaussian(y, sigma.float(), means=mu.float())
        y_dec = y_hat.float() * inv_gain
        x_bar = self.g_s(y_dec).float()
        return {"x_bar": x_bar, "y": y_a, "y_hat": y_dec, "likelihoods": {"y": y_lik, "z": z_lik}}

    def aux_loss(self) -> torch.Tensor:
        return self.entropy_bottleneck.loss()

    # -- pieces used by the codec -------------------------------------------------------------
    def analysis(self, x: torch.Tensor, level: float) -> torch.Tensor:
        return self.gained(self.g_a(x), level)

    def gained(self, y: torch.Tensor, level: float) -> torch.Tensor:
        """The latent y_g that is quantised, from g_a's output ``y`` at ``level``."""
        gain, _ = self.gains(level)
        return y * gain

    def synthesis(self, y_hat_g: torch.Tensor, level: float) -> torch.Tensor:
        _, inv_gain = self.gains(level)
        return self.g_s(y_hat_g * inv_gain)

    def dequantize(self, y_hat_g: torch.Tensor, level: float) -> torch.Tensor:
        _, inv_gain = self.gains(level)
        return y_hat_g * inv_gain

    def texture_features(self, y_hat: torch.Tensor) -> torch.Tensor:
        return self.texture(y_hat)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if not self.trainable:  # the coding model keeps only the hyperprior's tables
            keep = tuple(f"entropy_bottleneck.{k}" for k in HyperTables.KEYS)
            state_dict = {k: v for k, v in state_dict.items()
                          if not k.startswith(("entropy_bottleneck.", "gaussian.")) or k in keep}
        # The bottleneck's CDF buffers change size with its tables; resize before loading.
        eb = self.entropy_bottleneck
        for name in ("_quantized_cdf", "_offset", "_cdf_length"):
            key = f"entropy_bottleneck.{name}"
            if key in state_dict:
                getattr(eb, name).resize_(state_dict[key].shape)
        if not self.trainable:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        for name in ("_quantized_cdf", "_offset", "_cdf_length", "scale_table"):
            key = f"gaussian.{name}"
            if key in state_dict:
                getattr(self.gaussian, name).resize_(state_dict[key].shape)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate-pad (B, C, H, W) at the bottom/right to a multiple of ``multiple``."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x
