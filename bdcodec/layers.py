"""The transform layers, written out so that coding never imports CompressAI.

These are CompressAI's ``GDN``, ``ResidualBlock``, ``ResidualBlockWithStride``,
``ResidualBlockUpsample``, ``conv3x3``, ``subpel_conv3x3`` and
``CheckerboardMaskedConv2d`` (Cheng et al. 2020; He et al. 2021), with the same
parameter and buffer names, so weights trained with either load into the other,
and the same arithmetic, so they give the same pixels.  Importing ``compressai``
costs several seconds (its package imports its datasets, and those import
torch_geometric, torch._dynamo and scipy.stats), which a one-file command-line
call would spend before doing anything; the training code still uses CompressAI's
entropy models (see ``model.BDCodecModel``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "GDN",
    "ResidualBlock",
    "ResidualBlockWithStride",
    "ResidualBlockUpsample",
    "CheckerboardMaskedConv2d",
    "conv3x3",
    "subpel_conv3x3",
]


class _LowerBound(torch.autograd.Function):
    """``max(x, bound)`` whose gradient passes where it moves ``x`` back towards the bound."""

    @staticmethod
    def forward(ctx, x, bound):
        ctx.save_for_backward(x, bound)
        return torch.max(x, bound)

    @staticmethod
    def backward(ctx, grad):
        x, bound = ctx.saved_tensors
        passes = (x >= bound) | (grad < 0)
        return passes * grad, None


class LowerBound(nn.Module):
    def __init__(self, bound: float):
        super().__init__()
        self.register_buffer("bound", torch.Tensor([float(bound)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return torch.max(x, self.bound)
        return _LowerBound.apply(x, self.bound)


class NonNegative(nn.Module):
    """``x -> max(x, sqrt(minimum + p)) ** 2 - p`` with ``p = 2**-36`` (Ballé's reparametrisation)."""

    def __init__(self, minimum: float = 0.0, reparam_offset: float = 2**-18):
        super().__init__()
        pedestal = reparam_offset**2
        self.register_buffer("pedestal", torch.Tensor([pedestal]))
        self.lower_bound = LowerBound((float(minimum) + pedestal) ** 0.5)

    def init(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(torch.max(x + self.pedestal, self.pedestal))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lower_bound(x) ** 2 - self.pedestal


class GDN(nn.Module):
    """Generalized divisive normalization ``x / sqrt(beta + gamma * x^2)`` (inverse: times)."""

    def __init__(self, channels: int, inverse: bool = False, beta_min: float = 1e-6, gamma_init: float = 0.1):
        super().__init__()
        self.inverse = inverse
        self.beta_reparam = NonNegative(minimum=beta_min)
        self.beta = nn.Parameter(self.beta_reparam.init(torch.ones(channels)))
        self.gamma_reparam = NonNegative()
        self.gamma = nn.Parameter(self.gamma_reparam.init(gamma_init * torch.eye(channels)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        beta = self.beta_reparam(self.beta)
        gamma = self.gamma_reparam(self.gamma).reshape(c, c, 1, 1)
        norm = F.conv2d(x**2, gamma, beta)
        return x * (torch.sqrt(norm) if self.inverse else torch.rsqrt(norm))


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride)


def subpel_conv3x3(in_ch: int, out_ch: int, r: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch * r**2, kernel_size=3, padding=1), nn.PixelShuffle(r))


class ResidualBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch)
        self.leaky_relu = nn.LeakyReLU(inplace=True)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.skip = conv1x1(in_ch, out_ch) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.leaky_relu(self.conv2(self.leaky_relu(self.conv1(x))))
        return out + (x if self.skip is None else self.skip(x))


class ResidualBlockWithStride(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int = 2):
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch, stride=stride)
        self.leaky_relu = nn.LeakyReLU(inplace=True)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.gdn = GDN(out_ch)
        self.skip = conv1x1(in_ch, out_ch, stride=stride) if stride != 1 or in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.gdn(self.conv2(self.leaky_relu(self.conv1(x))))
        return out + (x if self.skip is None else self.skip(x))


def resize_conv3x3(in_ch: int, out_ch: int, r: int = 1) -> nn.Sequential:
    """A 3x3 convolution, then nearest-neighbour upsampling by ``r``: a sub-pixel convolution whose r² phase
    kernels are one, so no output pixel phase has weights of its own (those can print a lattice)."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1), nn.Upsample(scale_factor=r))


class ResidualBlockUpsample(nn.Module):
    """CompressAI's upsampling residual block; with ``resize``, its two sub-pixel convolutions are
    :func:`resize_conv3x3` instead."""

    def __init__(self, in_ch: int, out_ch: int, upsample: int = 2, resize: bool = False):
        super().__init__()
        up = resize_conv3x3 if resize else subpel_conv3x3
        self.subpel_conv = up(in_ch, out_ch, upsample)
        self.leaky_relu = nn.LeakyReLU(inplace=True)
        self.conv = conv3x3(out_ch, out_ch)
        self.igdn = GDN(out_ch, inverse=True)
        self.upsample = up(in_ch, out_ch, upsample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.igdn(self.conv(self.leaky_relu(self.subpel_conv(x))))
        return out + self.upsample(x)


class CheckerboardMaskedConv2d(nn.Conv2d):
    """A convolution that sees only the other colour of a checkerboard (mask type A)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        mask = torch.ones_like(self.weight.data)
        mask[:, :, 0::2, 0::2] = 0
        mask[:, :, 1::2, 1::2] = 0
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight * self.mask, self.bias)
