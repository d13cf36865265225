"""Laplacian-guided entropy model for the latent ``y``.

The latent's channels are split into uneven chunks ``y0..yK``.  Every chunk is
coded in two passes over a checkerboard: first the *anchors*, then the
*non-anchors*.  The Gaussian parameters (mu, sigma) of each symbol come from

::

    psi = h_s(z_hat)                         hyperprior features
    ch  = g_ch^(j)(y_hat^(<j))               channel context (earlier chunks)
    ls  = g_ls^(j)(y_hat_a^(j))              local context: 5x5 checkerboard conv
    gs  = g_gs^(j)(y_hat_a^(j))              global context: windowed Transformer,
                                             non-anchor queries see anchor keys only,
                                             logits + Laplacian position bias
    (mu, sigma) = g_ep^(j)(ls, gs, ch, psi)  (ls = gs = 0 in the anchor pass)

The Laplacian relative position bias (Khoshkhahtinat et al., CVPR 2024) is
``A^2 * exp(-(|dh| + |dw|) / (2 B^2))`` with ``A``, ``B`` learnable per chunk
and per head.

The same :meth:`LaplacianEntropyModel.chunk_params` runs during training and
during coding, so the encoder and the decoder evaluate identical arithmetic.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import CheckerboardMaskedConv2d

__all__ = [
    "SCALE_TABLE",
    "LaplacianBias",
    "MaskedWindowAttention",
    "GlobalContext",
    "LaplacianEntropyModel",
    "anchor_mask",
    "scale_indexes",
]

#: 64 log-spaced scales, as CompressAI's ``get_scale_table`` (0.11 .. 256).
SCALE_TABLE = torch.exp(torch.linspace(math.log(0.11), math.log(256.0), 64))
SCALE_BOUND = 0.11


def anchor_mask(h: int, w: int, device=None) -> torch.Tensor:
    """Boolean (h, w) map that is True on anchors, i.e. where ``(i + j)`` is even."""
    i = torch.arange(h, device=device).view(-1, 1)
    j = torch.arange(w, device=device).view(1, -1)
    return (i + j) % 2 == 0


def scale_indexes(scales: torch.Tensor) -> torch.Tensor:
    """Index of the first table scale >= ``scales`` (CompressAI's ``build_indexes``)."""
    table = SCALE_TABLE.to(scales.device, scales.dtype)
    idx = torch.bucketize(scales.clamp(min=SCALE_BOUND), table)
    return idx.clamp(max=len(SCALE_TABLE) - 1)


class LaplacianBias(nn.Module):
    """Relative position bias ``A^2 exp(-(|dh|+|dw|)/(2 B^2))`` inside a window, per head."""

    def __init__(self, window: int, heads: int):
        super().__init__()
        self.window = window
        self.A = nn.Parameter(torch.ones(heads))
        self.B = nn.Parameter(torch.ones(heads))
        coords = torch.stack(
            torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        ).flatten(1)  # 2, w*w
        dist = (coords[:, :, None] - coords[:, None, :]).abs().sum(0).float()
        self.register_buffer("dist", dist, persistent=False)  # L1 distance, (w*w, w*w)

    def forward(self) -> torch.Tensor:
        a2 = self.A.square().view(-1, 1, 1)
        b2 = self.B.square().view(-1, 1, 1).clamp(min=1e-4)
        return a2 * torch.exp(-self.dist / (2.0 * b2))  # heads, w*w, w*w


class MaskedWindowAttention(nn.Module):
    """One Swin block (attention + MLP) whose keys are restricted to anchor tokens.

    ``shift`` > 0 gives the shifted-window variant; instead of a cyclic roll the
    map is padded by ``shift`` at the top and left, so windows never wrap around.
    Padding tokens are never keys.
    """

    def __init__(self, dim: int, heads: int = 4, window: int = 8, shift: int = 0):
        super().__init__()
        self.dim, self.heads, self.window, self.shift = dim, heads, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias = LaplacianBias(window, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def _windows(self, x: torch.Tensor) -> torch.Tensor:
        b, hp, wp, c = x.shape
        k = self.window
        x = x.view(b, hp // k, k, wp // k, k, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(-1, k * k, c)

    def _unwindows(self, x: torch.Tensor, b: int, hp: int, wp: int) -> torch.Tensor:
        k = self.window
        x = x.view(b, hp // k, wp // k, k, k, -1).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, hp, wp, -1)

    def forward(self, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``x``: (B, H, W, C) tokens; ``keys``: (H, W) bool, True where a token may be attended to."""
        b, h, w, c = x.shape
        k, s = self.window, self.shift
        pad_b = (-(h + s)) % k
        pad_r = (-(w + s)) % k
        hp, wp = h + s + pad_b, w + s + pad_r

        y = self.norm1(x)
        y = F.pad(y, (0, 0, s, pad_r, s, pad_b))
        allowed = F.pad(keys.float(), (s, pad_r, s, pad_b)).view(1, hp, wp, 1)
        yw = self._windows(y)  # nW*B, k*k, C
        aw = self._windows(allowed.expand(b, -1, -1, -1)).squeeze(-1) > 0.5  # nW*B, k*k

        qkv = self.qkv(yw).view(yw.shape[0], k * k, 3, self.heads, c // self.heads)
        q, kk, v = qkv.permute(2, 0, 3, 1, 4)  # each nW*B, heads, k*k, d
        logits = (q @ kk.transpose(-2, -1)) * (c // self.heads) ** -0.5
        logits = logits + self.bias().unsqueeze(0)
        neg = torch.finfo(logits.dtype).min / 2
        logits = logits.masked_fill(~aw[:, None, None, :], neg)
        out = logits.softmax(-1) @ v
        out = out.transpose(1, 2).reshape(yw.shape[0], k * k, c)
        out = self._unwindows(self.proj(out), b, hp, wp)[:, s : s + h, s : s + w]
        x = x + out
        return x + self.mlp(self.norm2(x))


class GlobalContext(nn.Module):
    """g_gs: Transformer over a chunk's anchors (W-MSA then SW-MSA blocks)."""

    def __init__(self, in_ch: int, out_ch: int, dim: int = 64, heads: int = 4, depth: int = 2, window: int = 8):
        super().__init__()
        self.embed = nn.Linear(in_ch, dim)
        self.blocks = nn.ModuleList(
            MaskedWindowAttention(dim, heads, window, shift=(window // 2) * (i % 2)) for i in range(depth)
        )
        self.out = nn.Linear(dim, out_ch)

    def forward(self, y_anchor: torch.Tensor) -> torch.Tensor:
        _, _, h, w = y_anchor.shape
        keys = anchor_mask(h, w, y_anchor.device)
        x = self.embed(y_anchor.permute(0, 2, 3, 1))
        x = x * keys.view(1, h, w, 1)  # non-anchor tokens carry nothing
        for blk in self.blocks:
            x = blk(x, keys)
        return self.out(x).permute(0, 3, 1, 2)


def _ramp(in_ch: int, out_ch: int) -> nn.Sequential:
    mid1 = max(out_ch, (in_ch * 2 + out_ch) // 3)
    mid2 = max(out_ch, (in_ch + out_ch * 2) // 3)
    return nn.Sequential(
        nn.Conv2d(in_ch, mid1, 1), nn.GELU(), nn.Conv2d(mid1, mid2, 1), nn.GELU(), nn.Conv2d(mid2, out_ch, 1)
    )


class LaplacianEntropyModel(nn.Module):
    """Chunked, checkerboard, Transformer-context entropy model for ``y``.

    Args:
        M: latent channels.
        chunks: channel chunk sizes, summing to ``M`` (uneven, e.g. ``[16, 16, 32, 64]``).
        hyper_ch: channels of the hyperprior features ``psi``.
        global_context: ablation switch; ``False`` drops g_gs.
        attn_dim, heads, depth, window: the Transformer's size.
    """

    def __init__(
        self,
        M: int,
        chunks: list[int],
        hyper_ch: int,
        global_context: bool = True,
        attn_dim: int = 64,
        heads: int = 4,
        depth: int = 2,
        window: int = 8,
    ):
        super().__init__()
        if sum(chunks) != M:
            raise ValueError(f"chunks {chunks} do not sum to M={M}")
        self.M, self.chunks, self.global_context = M, list(chunks), global_context
        self.g_ch = nn.ModuleList()
        self.g_ls = nn.ModuleList()
        self.g_gs = nn.ModuleList()
        self.g_ep = nn.ModuleList()
        done = 0
        for c in self.chunks:
            if done:
                self.g_ch.append(
                    nn.Sequential(
                        nn.Conv2d(done, 96, 3, padding=1), nn.GELU(), nn.Conv2d(96, 2 * c, 3, padding=1)
                    )
                )
            else:
                self.g_ch.append(nn.Identity())
            self.g_ls.append(CheckerboardMaskedConv2d(c, 2 * c, kernel_size=5, padding=2))
            if global_context:
                self.g_gs.append(GlobalContext(c, 2 * c, attn_dim, heads, depth, window))
            ctx_ch = 2 * c * (2 if global_context else 1) + (2 * c if done else 0) + hyper_ch
            self.g_ep.append(_ramp(ctx_ch, 2 * c))
            done += c

    def channel_context(self, j: int, prev: torch.Tensor | None) -> torch.Tensor | None:
        """g_ch of chunk ``j`` from y_hat of chunks < j (``prev``); None for the first chunk.

        Both passes of a chunk see the same earlier chunks, so they share it."""
        return self.g_ch[j](prev) if j else None

    def chunk_params(
        self, j: int, psi: torch.Tensor, channel: torch.Tensor | None, y_anchor: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, sigma) of chunk ``j`` over the whole map.

        ``channel`` is :meth:`channel_context` of the chunk (None for j = 0);
        ``y_anchor`` is the chunk's decoded anchors with zeros elsewhere, or None
        for the anchor pass.
        """
        c = self.chunks[j]
        b, _, h, w = psi.shape
        parts = []
        if y_anchor is None:
            zeros = psi.new_zeros(b, 2 * c, h, w)
            parts += [zeros] * (2 if self.global_context else 1)
        else:
            parts.append(self.g_ls[j](y_anchor))
            if self.global_context:
                parts.append(self.g_gs[j](y_anchor))
        if j > 0:
            parts.append(channel)
        parts.append(psi)
        mu, sigma = self.g_ep[j](torch.cat(parts, 1)).chunk(2, 1)
        return mu, sigma

    def hyper_terms(self, psi: torch.Tensor) -> "HyperTerms":
        """What each chunk's parameter network makes of ``psi`` alone, for a fixed ``psi``.

        ``forward(y, hyper_terms(psi))`` gives what ``forward(y, psi)`` gives, up to float rounding,
        with about half the arithmetic of g_ep: its first layer over psi is taken once here, over the
        channel context once per chunk, and each pass's parameters only where that pass codes (g_ep is
        pointwise).  The encoder's latent fit, where z (and so psi) is fixed, runs the model this way;
        coding always takes :meth:`chunk_params`.
        """
        n = psi.shape[1]
        return HyperTerms(F.conv2d(psi, ep[0].weight[:, -n:], ep[0].bias) for ep in self.g_ep)

    def _fixed_params(self, j: int, base: torch.Tensor, y_anchor: torch.Tensor | None) -> torch.Tensor:
        """g_ep of chunk ``j`` from ``base`` (its first layer over psi and the channel context), at the
        anchors (``y_anchor`` None) or at the non-anchors, zeros elsewhere: a (b, 2c, h, w) map."""
        if y_anchor is not None:
            ctx = [self.g_ls[j](y_anchor)] + ([self.g_gs[j](y_anchor)] if self.global_context else [])
            base = base + F.conv2d(torch.cat(ctx, 1), self.g_ep[j][0].weight[:, : 2 * len(ctx) * self.chunks[j]])
        h, w = base.shape[-2:]
        even = F.pad(base, (0, w % 2, 0, h % 2))
        s = int(y_anchor is not None)  # anchors: even rows from column 0, odd rows from 1; non-anchors: 1, 0
        out = self.g_ep[j][1:](torch.cat([even[..., 0::2, s::2], even[..., 1::2, 1 - s :: 2]], -1))
        full = out.new_zeros(out.shape[:2] + even.shape[-2:])
        full[..., 0::2, s::2], full[..., 1::2, 1 - s :: 2] = out.chunk(2, -1)
        return full[..., :h, :w]

    def forward(self, y: torch.Tensor, psi: torch.Tensor, rounding=None, checkpoint: bool = False):
        """Training / estimation pass.

        Returns ``(y_hat, mu, sigma)`` for the whole latent, where y_hat uses
        straight-through rounding around mu (what the decoder will see).  The
        caller evaluates the rate on ``y`` (+ uniform noise when training).
        ``rounding`` replaces the straight-through rounding of ``y - mu`` (the
        encoder's latent fit passes a relaxed one).  ``checkpoint`` keeps only the
        inputs and outputs of each chunk's context networks for the backward pass,
        which runs them again (the fit on large images: about a third of the memory);
        gradients then reach ``y`` only, not the model's weights.
        """
        rnd = rounding or _ste_round
        fixed = isinstance(psi, HyperTerms)
        if fixed:  # psi fixed: see hyper_terms

            def params(j, base, channel, y_anchor):
                return self._fixed_params(j, base, y_anchor).chunk(2, 1)
        else:
            params = self.chunk_params
        if checkpoint and torch.is_grad_enabled():
            params = functools.partial(_Recomputed.apply, params)

        _, _, h, w = y.shape
        anchors = anchor_mask(h, w, y.device).view(1, 1, h, w)
        y_hats, mus, sigmas = [], [], []
        for j, y_j in enumerate(y.split(self.chunks, 1)):
            prev = torch.cat(y_hats, 1) if j else None
            channel = self.channel_context(j, prev)
            given = psi
            if fixed:  # g_ep's first layer over the channel context, shared by both passes
                given = psi[j]
                if channel is not None:
                    at = 2 * self.chunks[j] * (2 if self.global_context else 1)
                    given = given + F.conv2d(channel, self.g_ep[j][0].weight[:, at : at + channel.shape[1]])
            mu_a, s_a = params(j, given, channel, None)
            ya = rnd(y_j - mu_a) + mu_a
            mu_n, s_n = params(j, given, channel, ya * anchors)
            mu = torch.where(anchors, mu_a, mu_n)
            sigma = torch.where(anchors, s_a, s_n)
            y_hats.append(torch.where(anchors, ya, rnd(y_j - mu_n) + mu_n))  # anchors as their context saw them
            mus.append(mu)
            sigmas.append(sigma)
        return torch.cat(y_hats, 1), torch.cat(mus, 1), torch.cat(sigmas, 1)


class _Recomputed(torch.autograd.Function):
    """``fn(*args)`` (a tuple of tensors) that keeps no activations: the backward pass runs it again.
    Gradients go to the tensor arguments, not to parameters inside ``fn``.  (torch.utils.checkpoint
    does this too, but imports torch._dynamo: 2 to 3.5 s of an encode.)"""

    @staticmethod
    def forward(ctx, fn, *args):
        ctx.fn, ctx.args = fn, args
        return tuple(fn(*args))

    @staticmethod
    def backward(ctx, *grads):
        wanted = ctx.needs_input_grad[1:]
        args = [a.detach().requires_grad_(True) if w else a for a, w in zip(ctx.args, wanted)]
        with torch.enable_grad():
            out = ctx.fn(*args)
        pairs = [(o, g) for o, g in zip(out, grads) if g is not None and o.requires_grad]
        inputs = [a for a, w in zip(args, wanted) if w]
        found = iter(torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)
                     if pairs and inputs else [None] * len(inputs))
        ctx.fn = ctx.args = None
        return (None, *(next(found) if w else None for w in wanted))


class HyperTerms(tuple):
    """:meth:`LaplacianEntropyModel.hyper_terms`: one (b, o, h, w) map per chunk."""

    def rows(self, r0: int, r1: int) -> "HyperTerms":
        """The terms of latent rows r0..r1 (a band)."""
        return HyperTerms(t[..., r0:r1, :].contiguous() for t in self)


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()
