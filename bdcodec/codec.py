"""The codec: images to ``.bdc`` bytes and back, with a loaded model.

Example::

    from bdcodec import Codec
    codec = Codec()                                  # shipped weights, CPU or CUDA
    data = codec.encode(pixels, quality=75)          # pixels: uint8 (H, W, 3) array
    image = codec.decode(data, mode="fidelity")      # uint8 (H, W, 3)

Determinism: everything that decides symbols or probabilities (h_s, the entropy
model's networks, the scale indexes) runs on the CPU in fp32, each latent band (see
``latent_bands``) on one thread, with the decoder's arithmetic on both sides, so a
file decodes to the same latent on any machine.  The pixel-domain networks (g_a, g_s, the texture branch, the
denoiser) run on ``threads`` threads (default: every core this process may use).
Their convolutions gave the same sums on 1 and 2 threads wherever we checked, and
the denoiser's GroupNorm sums its statistics in fp64 (see ``diffusion._GroupNorm``),
so files and decodes of both modes come out the same with 1 and 2 threads (tested);
with the same thread count, bytes and pixels are identical run to run.  On a CPU with
native bf16, g_a runs under bf16 autocast, so an encoder with and one without it
may round a few symbols differently; the files decode to the same latent anywhere.
g_s runs in bf16 there too, up to its last convolution: x_bar moves by about 0.16 of
a grey level (mean; at most 2-3), the same in the encoder, whose refinement layer
codes what is left against that x_bar, and in the decoder.  A file made and decoded
on such CPUs is as good as in fp32; made on one kind and decoded on the other, its
pixels differ by those fractions of a level (0.02-0.05 dB at qualities 85-90).  With
``device="cuda"`` the transforms and the denoiser run on the GPU; the entropy path
stays on the CPU, so files still decode anywhere.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import math
import time

import numpy as np
import torch

from . import container, refine
from .container import Header, Streams
from .diffusion import BlurSchedule
from .entropy import anchor_mask, scale_indexes
from .effort import (DEFAULT_EFFORT_PIXELS, DEFAULT_EFFORTS, DEFAULT_ROI_WEIGHT, EFFORT_MAX_PIXELS, EFFORT_STEPS,
                     MAX_EFFORT, ROI_MIN_EFFORT, SGA_FROM, native_bf16, refine_latent)
from .errors import BdcError
from .imageio import cpu_count
from .model import pad_to
from .rans import HyperCoder, PassDecoder, PassEncoder, band_crc, check_crc, decode_z_compressai
from .weights import default_weights_path, load_model, reads

__all__ = ["Codec", "DEFAULT_QUALITY", "DEFAULT_STEPS"]

DEFAULT_QUALITY = 75.0
# Diffusion steps written into new files.  With the current denoiser more steps buy
# nothing: on six Kodak images at qualities 0, 25 and 50, LPIPS with 1, 2, 4 and 8 steps
# agrees within 0.0005 (0.1829 / 0.1827 / 0.1829 / 0.1825 at quality 0) while 8 steps
# take 3x the time of one; files carry their own default, and --steps overrides it.
DEFAULT_STEPS = 1
DEFAULT_TEMPERATURE = 0.5
# The latent fit minimises the fidelity reconstruction's error.  Files made for the
# diffusion decoder gain PSNR from it at every rate, and LPIPS from rate level 1 up
# (kodim04/13/19/23, effort 3, qualities 25/50/70: LPIPS -0.007 to +0.001, PSNR +0.04
# to +0.54 dB); at quality 0 (level 0) LPIPS rose by 0.004 to 0.023, so below this
# level perceptual files are not fitted (but for a region of interest); level 1 is quality
# effort.PERCEPTUAL_FIT_QUALITY (a test checks the two agree).
PERCEPTUAL_FIT_FROM = 1.0
# Quality plans: how the encoder splits bits between the latent and the refinement
# layer.  Files carry the rate level and the refinement step they use, so these are
# encoder policy, not format.  Past rate level ~1 a bit spent in the DCT refinement
# layer buys more PSNR than one spent in the latent, while the diffusion decoder
# draws more from a richer latent (lower LPIPS); hence one plan per decode mode.
#   perceptual: up to REFINE_FROM the level rises to PERCEPTUAL_SHARE of the model's
#     levels; above it the level stays and the refinement step falls geometrically
#     from STEP_COARSE to STEP_FINE at quality 100.
#   fidelity: the level rises only to FIDELITY_SHARE, and the refinement layer starts
#     right above quality 0 with step STEP_START, reaching STEP_COARSE at REFINE_FROM.
REFINE_FROM = 50.0
PERCEPTUAL_SHARE = 0.6
FIDELITY_SHARE = 0.2
# At effort 1 and up, a file made for fidelity decoding above REFINE_FROM takes the
# cheapest of these fidelity plans for the image at hand: each is coded at effort 0, and
# the one with the least squared error + lambda x bits (lambda: refine.RDO_PRICE x 3 x
# step^2, the layer's own exchange rate) is fitted.  A fitted latent gains more at higher
# rate levels, and images differ in where a bit buys more (see the effort table in the
# README).  At or below REFINE_FROM the first plan won on every Kodak image tried, so the
# search is not run there.
FIDELITY_SHARES = (0.2, 0.4, 0.6)
# From effort FITTED_PLANS_FROM up, the plans are compared after a short fit of
# PLAN_PROBE_EFFORT's steps each instead of at effort 0, and FITTED_SHARES adds a richer
# one: at effort 0 the first plan is cheapest on most images, but the fit gains more the
# more the latent carries (kodim01 at quality 80: at effort 0 plan 0.2 costs 0.9 % less
# than plan 0.6; fitted with 48 steps, plan 0.8 costs 1.5 % less than plan 0.2).
FITTED_PLANS_FROM = 7
FITTED_SHARES = (0.2, 0.4, 0.6, 0.8)
PLAN_PROBE_EFFORT = 3
# From effort 1 up, the refinement layer of a fidelity file above REFINE_FROM picks its
# levels by rate and distortion (refine.encode's rdo at refine.RDO_PRICE) instead of by
# the dead zone alone: about 0.7 s more per file at 768x512, which effort 0 does not spend.
EFFORT_RDO = True
STEP_START = 160.0
STEP_COARSE = 96.0
STEP_FINE = 4.0
_V2_SHARE = 0.6  # the single plan of version-2 files
# Images with fewer pixels than one latent position (16 x 16) are mostly padding to the
# latent, which renders them poorly (a 1x1 (200, 30, 40) came back as (185, 64, 51)).
# The encoder tops them up with a refinement layer of step TINY_STEP at every quality,
# padding partial DCT blocks by repetition so that a lone pixel costs one coefficient:
# near-lossless for some 130 to 420 bytes (a 1x1 image 135 to 280).
TINY_PIXELS = 16 * 16
TINY_STEP = 2.0
PAD = 64
TILE = 1024  # pixels per tile side for g_a / g_s on large images
MARGIN = 64  # overlap in pixels around each tile: g_a exact, g_s within 0.01 of a grey level on Kodak
# Large latents are coded in horizontal bands, each with its own context (the entropy model
# sees nothing across a band's edge) and its own rANS stream, so that the entropy path of
# several bands runs at once, each band on one thread: the same arithmetic, and so the same
# bytes, with any number of threads.  The encoder doubles the bands while each keeps at
# least BAND_AREA latent positions (2 megapixels) and BAND_MIN_ROWS rows; files store the count.
BAND_AREA = 8192
BAND_MIN_ROWS = 32
BAND_ALIGN = 8  # band rows come in whole windows of the Transformer context (and keep the checkerboard)


def latent_bands(height: int, width: int, n: int | None = None) -> list[tuple[int, int]] | None:
    """Row ranges of the ``n`` bands of a (height, width) latent (``n`` None: the encoder's choice).

    Every band but the last has ``ceil(height / n)`` rows rounded up to BAND_ALIGN; None where
    ``n`` bands do not all get rows."""
    if n is None:
        n = 1
        while (n * 2 <= container.MAX_BANDS and height * width >= BAND_AREA * n * 2
               and height >= BAND_MIN_ROWS * n * 2 and latent_bands(height, width, n * 2)):
            n *= 2
    rows = -(-height // (n * BAND_ALIGN)) * BAND_ALIGN
    if n < 1 or (n - 1) * rows >= height:
        return None
    return [(k * rows, min(height, (k + 1) * rows)) for k in range(n)]


@contextlib.contextmanager
def _threads(n: int):
    """Run torch's CPU operators on ``n`` threads inside the block."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BdcError("--device cuda asked for, but no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise BdcError(f"unknown device {device!r} (auto, cpu or cuda)")
    return torch.device(device)


class _Progress:
    """Counts units of work (tiles, diffusion steps) into a tqdm-like ``bar``, or nowhere.

    ``bar`` needs a settable ``total`` and ``update(n)``; totals grow as work is planned.
    """

    def __init__(self, bar=None):
        self.bar = bar

    def plan(self, n: int) -> None:
        if self.bar is not None:
            self.bar.total = (self.bar.total or 0) + n

    def __call__(self) -> None:
        if self.bar is not None:
            self.bar.update(1)


def _tiled(fn, x: torch.Tensor, scale: float, tile: int, margin: int, progress: _Progress | None = None,
           workers: int = 1) -> torch.Tensor:
    """Apply a convolutional ``fn`` to overlapping tiles of ``x`` and stitch the centres.

    ``scale`` is the output/input size ratio (1/16 for g_a, 16 for g_s); ``tile`` and
    ``margin`` are in input pixels and must map to whole output pixels.  Peak memory
    then depends on the tile, not the image.  ``progress`` counts one unit per tile.
    With ``workers`` > 1 and several tiles, that many tiles run at once, each on one
    thread (on two cores 10 % faster than one tile at a time on both); ``fn`` then
    sets its own autocast, which torch keeps per thread.  The caller's thread count
    applies to an image of one tile.
    """
    progress = progress or _Progress()
    _, _, h, w = x.shape
    if _one_tile(h, w, tile, margin):
        progress.plan(1)
        out = fn(x)
        progress()
        return out
    tiles = [(i0, j0) for i0 in range(0, h, tile) for j0 in range(0, w, tile)]
    progress.plan(len(tiles))
    grad = torch.is_grad_enabled()

    def run(corner: tuple[int, int]):
        i0, j0 = corner
        i1, j1 = min(i0 + tile, h), min(j0 + tile, w)
        a0, b0 = max(i0 - margin, 0), max(j0 - margin, 0)
        a1, b1 = min(i1 + margin, h), min(j1 + margin, w)
        with torch.set_grad_enabled(grad):  # grad mode is per thread
            part = fn(x[:, :, a0:a1, b0:b1])
        ri, rj = round((i0 - a0) * scale), round((j0 - b0) * scale)
        hh, ww = round((i1 - i0) * scale), round((j1 - j0) * scale)
        progress()
        return part[:, :, ri : ri + hh, rj : rj + ww]

    out = None
    with contextlib.ExitStack() as stack:
        if workers > 1:
            stack.enter_context(_threads(1))
            parts = stack.enter_context(concurrent.futures.ThreadPoolExecutor(workers)).map(run, tiles)
        else:
            parts = map(run, tiles)
        for (i0, j0), part in zip(tiles, parts):
            if out is None:
                out = part.new_empty(1, part.shape[1], round(h * scale), round(w * scale))
            oi, oj = round(i0 * scale), round(j0 * scale)
            out[:, :, oi : oi + part.shape[2], oj : oj + part.shape[3]] = part
    if workers > 1:
        _trim_heap()
    return out


def _thread_map(fn, items: list, workers: int) -> list:
    """``[fn(item) for item in items]``, up to ``workers`` at once on threads (the caller holds torch to the
    threads each may use); the heaps the threads freed go back to the system after."""
    workers = min(workers, len(items))
    if workers <= 1:
        return [fn(item) for item in items]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        out = list(pool.map(fn, items))
    _trim_heap()
    return out


def _one_tile(h: int, w: int, tile: int, margin: int) -> bool:
    """Whether :func:`_tiled` takes an (h, w) input whole."""
    return h <= tile + 2 * margin and w <= tile + 2 * margin


def _trim_heap() -> None:
    """Hand the memory freed by worker threads back to the system (glibc; elsewhere nothing).

    glibc gives every thread a heap of its own and keeps what is freed there for later
    allocations; after g_s ran its tiles on two threads, 350 MB of them outlived the tiles,
    and at 3000x2000 the perceptual decode's peak went from 2.2 to 2.6 GB.  Trimming takes 0.03 s."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC(0)


_LIBC = None


def _add_residual(base: np.ndarray, residual: np.ndarray) -> np.ndarray:
    """uint8 pixels of a base image plus a refinement residual (0..255 units), which this overwrites.

    In place: at 3000x2000 each float64 temporary is 144 MB of fresh pages (0.48 s with
    four of them, 0.1 s in place)."""
    out = np.add(residual, base, out=residual if residual.dtype == np.float64 else None, dtype=np.float64)
    np.round(out, out=out)
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


class Codec:
    """A loaded model plus the coding logic.  Reuse one instance for many files."""

    def __init__(self, weights=None, device: str = "auto", *, threads: int | None = None, model=None,
                 weights_id: str = "00000000"):
        if model is None:
            self.weights_path = weights or default_weights_path()
            self.model, self.meta = load_model(self.weights_path)
            self.model.requires_grad_(False)  # only effort's latent needs gradients
            self.weights_id = self.meta["weights_id"]
            self.reads = frozenset(reads(self.meta))
        else:  # an in-memory model (training validation); its CDF tables must be up to date
            self.weights_path, self.model, self.meta, self.weights_id = "<in memory>", model, {}, weights_id
            self.reads = frozenset()
        self.device = resolve_device(device)
        if threads is not None and threads < 1:
            raise BdcError(f"threads must be at least 1, got {threads}")
        self.threads = threads or cpu_count()
        # g_a under bf16 autocast where the CPU multiplies bf16 natively: about 2x faster; it only moves the
        # latent before rounding (mean |change| 0.7 % of |y|), so files stay as good and decode the same anywhere.
        self.analysis_bf16 = self.device.type == "cpu" and model is None and native_bf16("cpu")
        # g_s likewise (1.8x), and the texture branch and the denoiser: x_bar moves by about 0.16 of a grey
        # level (mean), on both sides of the refinement layer, so a file made and decoded on such CPUs loses
        # nothing (Kodak BD-rate +0.02 %); see the module docstring.
        self.synthesis_bf16 = self.analysis_bf16
        # oneDNN runs the convolutions in NHWC about 1.4x faster than in NCHW on the CPU.
        self._layout = torch.channels_last if self.device.type == "cpu" and model is None else torch.contiguous_format
        cfg = self.model.cfg
        self.schedule = BlurSchedule.for_config(cfg)
        # Heavy pixel-domain parts may go to the GPU; the entropy path stays on the CPU.
        for part in (self.model.g_a, self.model.g_s, self.model.texture, self.model.denoiser):
            part.to(self.device, memory_format=self._layout)
        self.timings: dict[str, float] = {}
        # The quality and effort the last encode's file was made at: the quality --target-bpp found,
        # the effort what the default, the image's size, the quality (perceptual files below
        # PERCEPTUAL_FIT_FROM) and a region of interest made of the one asked.
        self.encoded_quality: float | None = None
        self.encoded_effort: int | None = None
        eb = self.model.entropy_bottleneck
        self._z_tables = (eb._quantized_cdf.numpy().astype(np.int64), eb._cdf_length.numpy().astype(np.int64),
                          eb._offset.numpy().astype(np.int64), eb.quantiles.detach()[:, 0, 1].numpy())
        self.hyper = HyperCoder(*self._z_tables)

    # -- helpers ------------------------------------------------------------------------------
    def _tensor(self, pixels: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.array(pixels, dtype=np.uint8, order="C")).permute(2, 0, 1)[None].float() / 255.0
        return pad_to(x, PAD)

    def plan(self, quality: float, mode: str = "perceptual", share: float | None = None
             ) -> tuple[float, float | None]:
        """(rate level, refinement step or None) the encoder uses for a quality 0..100.

        ``mode`` is the decode mode the file is made for; ``share`` replaces the mode's
        share of the model's levels reached at REFINE_FROM.  The level is rounded to
        the container's 1/LEVEL_SCALE steps.
        """
        top = self.model.cfg.levels - 1
        q = max(0.0, min(100.0, float(quality)))
        if share is None:
            share = FIDELITY_SHARE if mode == "fidelity" else PERCEPTUAL_SHARE
        level = round(min(q, REFINE_FROM) / REFINE_FROM * share * top * container.LEVEL_SCALE) / container.LEVEL_SCALE
        if q > REFINE_FROM:
            t = (q - REFINE_FROM) / (100 - REFINE_FROM)
            return level, STEP_COARSE * (STEP_FINE / STEP_COARSE) ** t
        if mode == "fidelity" and q > 0:
            return level, STEP_START * (STEP_COARSE / STEP_START) ** (q / REFINE_FROM)
        return level, None

    def check_header(self, header: Header) -> float:
        """Raise :class:`BdcError` unless these weights decode the file; returns its rate level.

        Cheap (no model work), so a batch checks every file before decoding the first.
        """
        if header.weights_id != self.weights_id and header.weights_id not in self.reads:
            raise BdcError(
                f"file was made with weights {header.weights_id}, but the loaded weights are "
                f"{self.weights_id} ({self.weights_path}); pass the matching --weights"
            )
        return self.level_of(header)

    def level_of(self, header: Header) -> float:
        """The latent rate level a file was coded at (derived from the quality before version 3)."""
        top = self.model.cfg.levels - 1
        if header.level is not None:
            if header.level > top:
                raise BdcError(f"corrupt file: rate level {header.level:g} beyond the model's top level {top}")
            return header.level
        if header.version < 2:
            return header.quality / 100 * top
        return min(header.quality, REFINE_FROM) / REFINE_FROM * _V2_SHARE * top

    def _passes(self, psi: torch.Tensor, y: torch.Tensor | None, coder) -> tuple[torch.Tensor, np.ndarray]:
        """Run the chunk x (anchor, non-anchor) passes; returns y_hat (gained domain) and activity.

        With ``y`` given, symbols ``round(y - mu)`` go into ``coder`` (a PassEncoder);
        without, they come out of ``coder`` (a PassDecoder).  Both sides run exactly
        this code, so they see the same mu and sigma.  The activity map (h, w) sums
        the scale indexes over channels: integers both sides share, which the
        refinement layer uses as its context.
        """
        ent = self.model.entropy
        _, _, h, w = psi.shape
        anchors = anchor_mask(h, w)
        activity = np.zeros((h, w), dtype=np.int64)
        y_hats = []
        offset = 0
        for j, c in enumerate(ent.chunks):
            prev = torch.cat(y_hats, 1) if j else None
            channel = ent.channel_context(j, prev)
            ya = torch.zeros(1, c, h, w)
            for p, sel in enumerate((anchors, ~anchors)):
                mu, sigma = ent.chunk_params(j, psi, channel, ya if p else None)
                mu_s = mu[:, :, sel]
                idx = scale_indexes(sigma[:, :, sel]).numpy()
                activity[sel.numpy()] += idx.reshape(c, -1).sum(0)
                if y is not None:
                    r = torch.round(y[:, offset : offset + c][:, :, sel] - mu_s)
                    r = coder.add(r.numpy(), idx)
                else:
                    r = coder.next(idx)
                ya[:, :, sel] = torch.from_numpy(r).view(mu_s.shape).float() + mu_s
            y_hats.append(ya)
            offset += c
        return torch.cat(y_hats, 1), activity

    def _synthesize(self, y_hat_g: torch.Tensor, level: float, height: int, width: int,
                    progress: _Progress | None = None) -> torch.Tensor:
        """Fidelity reconstruction x_bar (1, 3, H_pad, W_pad) in 0..1 on the device."""
        y_hat = self.model.dequantize(y_hat_g, level).to(self.device, memory_format=self._layout)
        with _threads(self.threads):
            return _tiled(self._g_s, y_hat, 16, TILE // 16, MARGIN // 16, progress, self._tile_workers).clamp(0, 1)

    def _g_s(self, y_hat: torch.Tensor) -> torch.Tensor:
        """g_s, in bf16 up to its last convolution where ``synthesis_bf16``; that one stays fp32 (3% of the
        work), as bf16 pixels in 0..1 would be rounded to 1/256 (a grey level) on top of the network's error."""
        with self._synthesis_precision():
            h = self.model.g_s[:-1](y_hat)
        return self.model.g_s[-1](h.float())

    def _synthesis_precision(self):
        """The autocast of the decoder's pixel networks (g_s, texture branch, denoiser)."""
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.synthesis_bf16)

    @staticmethod
    def _to_uint8(x: torch.Tensor, height: int, width: int) -> np.ndarray:
        out = x[0, :, :height, :width].clamp(0, 1)
        return (out * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()

    # -- encode -------------------------------------------------------------------------------
    def encode(self, pixels: np.ndarray, quality: float = DEFAULT_QUALITY, target_bpp: float | None = None,
               gray: bool = False, mode: str = "perceptual", steps: int = DEFAULT_STEPS, seed: int = 0,
               progress=None, effort: int | None = None, roi: np.ndarray | None = None,
               roi_weight: float = DEFAULT_ROI_WEIGHT) -> bytes:
        """Encode uint8 (H, W, 3) pixels; ``target_bpp`` searches the quality that meets it.

        ``mode`` is the decode mode the file is made for: it picks the quality plan
        (see ``plan``) and is stored as the file's default decode mode.  ``effort``
        0..9 spends encode time on fitting the latent to the image (see ``effort.py``;
        default: ``DEFAULT_EFFORTS[mode]``, 0 above DEFAULT_EFFORT_PIXELS).
        ``roi`` (H, W) in 0..1 marks the regions of interest, whose squared error
        counts ``roi_weight`` times that of the rest (effort at least ROI_MIN_EFFORT).
        ``progress``, a tqdm-like bar, counts the tiles of the transforms.
        """
        if mode not in ("perceptual", "fidelity"):
            raise BdcError(f"unknown mode {mode!r}")
        if effort is None:
            effort = DEFAULT_EFFORTS[mode] if pixels.shape[0] * pixels.shape[1] <= DEFAULT_EFFORT_PIXELS else 0
        if not (isinstance(effort, (int, np.integer)) and 0 <= effort <= MAX_EFFORT):
            raise BdcError(f"effort must be within 0..{MAX_EFFORT}, got {effort}")
        weight = None
        if roi is not None:
            roi = np.asarray(roi, dtype=np.float64)
            if roi.shape != pixels.shape[:2]:
                raise BdcError(f"region-of-interest mask is {roi.shape[1]}x{roi.shape[0]}, "
                               f"the image {pixels.shape[1]}x{pixels.shape[0]}")
            if not roi_weight >= 1:
                raise BdcError(f"roi weight must be at least 1, got {roi_weight}")
            weight = 1 + (roi_weight - 1) * np.clip(roi, 0, 1)
            weight /= weight.mean()
            effort = max(effort, ROI_MIN_EFFORT)
        with torch.no_grad(), _threads(1):
            return self._encode(pixels, quality, target_bpp, gray, mode, steps, seed, _Progress(progress),
                                effort, weight)

    def decode(self, data: bytes, mode: str | None = None, steps: int | None = None,
               temperature: float = DEFAULT_TEMPERATURE, seed: int | None = None,
               max_pixels: int | None = None, progress=None) -> tuple[np.ndarray, Header]:
        """Decode ``.bdc`` bytes; returns (uint8 (H, W, 3) pixels, header).

        ``progress``, a tqdm-like bar, counts the tiles of g_s and the diffusion steps.
        """
        with torch.no_grad(), _threads(1):
            return self._decode(data, mode, steps, temperature, seed, max_pixels, _Progress(progress))

    def _encode(self, pixels, quality, target_bpp, gray, mode, steps, seed, progress, effort=0,
                weight=None) -> bytes:
        if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
            raise BdcError("encode expects uint8 pixels of shape (H, W, 3)")
        hgt, wid = pixels.shape[:2]
        if not (1 <= wid <= container.MAX_SIDE and 1 <= hgt <= container.MAX_SIDE):
            raise BdcError(f"image size {wid}x{hgt} out of range")
        if target_bpp is None:
            quality = round(float(quality) * 2) / 2
            if not 0 <= quality <= 100:
                raise BdcError(f"quality must be within 0..100, got {quality}")
        elif not target_bpp > 0:
            raise BdcError("--target-bpp must be positive")
        t0 = time.perf_counter()
        x = self._tensor(pixels)
        y0 = self._analyse(x, progress)
        self.timings = {"analysis": time.perf_counter() - t0}
        if hgt * wid > EFFORT_MAX_PIXELS:
            effort = 0
        block_weight = pixel_weight = None
        if weight is not None:
            pixel_weight = weight[..., None]
            # Blocks mostly outside the region get no refinement at all: levels chosen there by
            # rate alone leave DC-only corrections, whose 8x8 steps show on smooth areas.
            block_weight = refine.block_means(weight, hgt, wid)
            block_weight[block_weight < (weight.min() + weight.max()) / 2] = 0.0
            weight = torch.from_numpy(weight).float()

        latents: dict[tuple, tuple] = {}  # (level, effort) -> (streams, y_hat_g, activity)
        recons: dict[tuple, np.ndarray] = {}  # (level, effort) -> fidelity reconstruction, as decoded
        tiny = hgt * wid < TINY_PIXELS
        made: dict[bytes, tuple[float, int]] = {}  # file -> the quality and effort it was coded at

        def at(q: float, effort: int) -> bytes:
            level, step = self.plan(q, mode)
            rdo = EFFORT_RDO and bool(effort) and mode == "fidelity" and q > REFINE_FROM and block_weight is None
            if tiny:
                step = min(step or TINY_STEP, TINY_STEP)
            lam = refine.RDO_PRICE * 3 * (step or STEP_START) ** 2  # the plan step's price of a bit
            if block_weight is not None:
                # regions of interest: a step fine enough for the region (squared error
                # weighted w_in: step / sqrt(w_in)), levels chosen at the price of a bit of
                # the plan's step, so that the rest keeps only what pays for itself there
                step = (step or STEP_START) / math.sqrt(block_weight.max())
            if effort and mode == "fidelity" and q > REFINE_FROM and not tiny:
                fitted = effort >= FITTED_PLANS_FROM
                shares = FITTED_SHARES if fitted else FIDELITY_SHARES
                levels = sorted({self.plan(q, mode, share)[0] for share in shares})
                if len(levels) > 1:
                    probe = PLAN_PROBE_EFFORT if fitted else 0
                    level = min(levels, key=lambda lv: cost(q, lv, step, lam, probe))
            if mode == "perceptual" and level < PERCEPTUAL_FIT_FROM and block_weight is None:
                effort = 0  # (a region of interest is fitted all the same: nothing else would steer it here)
            data = code(q, level, step, effort, rdo=rdo)
            made[data] = (q, effort)
            return data

        def cost(q: float, level: float, step: float, lam: float, effort: int) -> float:
            """Squared error of the fidelity decode + lam x bits, of the file at ``level`` and ``effort``."""
            kept: list = []
            data = code(q, level, step, effort, kept)
            decoded = _add_residual(recons[(level, effort, step if effort else None)], refine.reconstruct(kept[0]))
            error = np.square(decoded.astype(np.float64) - pixels)
            if pixel_weight is not None:
                error *= pixel_weight
            return float(error.sum()) + lam * 8 * len(data)

        def code(q: float, level: float, step: float | None, effort: int, kept: list | None = None,
                 rdo: bool = False) -> bytes:
            """The file at ``level``; ``kept`` receives the refinement as decoded."""
            # Above REFINE_FROM the fit serves the refinement layer's step (effort._DctCost).  At or
            # below it the layer's coarse steps price a squared error at a third to a quarter of the
            # latent's lambda; fitted at that price, quality 20 came out worse than quality 0 in more
            # bytes (kodim23, effort 3), so there the fit uses the latent's own lambda.
            key = (level, effort, step if effort else None)
            if key not in latents:
                y = self.model.gained(y0, level)
                hyper = self._hyper(y)
                if effort:
                    t1 = time.perf_counter()
                    with _threads(self.threads):
                        y = refine_latent(self.model, x.to(self.device, memory_format=self._layout), y, hyper[1],
                                          level, EFFORT_STEPS[effort], hgt, wid, weight=weight,
                                          dct_step=step if q > REFINE_FROM else None,
                                          relax="sga" if effort >= SGA_FROM else "ste")
                    self.timings["effort"] = self.timings.get("effort", 0.0) + time.perf_counter() - t1
                latents[key] = self._encode_latent(y, hyper)
            streams, y_hat_g, activity = latents[key]
            if step is not None:
                if key not in recons:
                    recons[key] = self._to_uint8(self._synthesize(y_hat_g, level, hgt, wid, progress), hgt, wid)
                payload, ref = self._refine(pixels, recons[key], activity, step, edge=tiny, block_weight=block_weight,
                                            rdo=rdo)
                if kept is not None:
                    kept.append(ref)
                streams = dataclasses.replace(streams, refine=payload)
            header = Header(wid, hgt, q, self.weights_id, gray, mode, steps, seed, level=level)
            return container.pack(header, streams)

        if target_bpp is None:
            data = at(quality, effort)
        else:
            data = self._search(at, target_bpp * wid * hgt / 8, effort)
        self.encoded_quality, self.encoded_effort = made[data]
        return data

    @staticmethod
    def _search(at, budget: float, effort: int) -> bytes:
        """The file of ``at(quality, effort)`` with the most quality in ``budget`` bytes."""
        # The search runs at effort 0, whose files take a fraction of the time; then the
        # quality it found is coded at the effort asked for.  A refined latent may cost a
        # little more than the plain one: then one quality lower by the same ratio is
        # tried, and failing that the effort-0 file that met the target is kept.  When it
        # costs less, higher qualities are tried the same way (at most three fits).
        sizes: dict[int, int] = {}

        def size(half: int) -> int:
            if half not in sizes:
                sizes[half] = len(at(half / 2, 0))
            return sizes[half]

        def highest(ratio: float, lo: int, top: int) -> int:
            """The highest half step in lo..top whose effort-0 size x ratio fits the budget."""
            while lo < top:
                mid = (lo + top + 1) // 2
                lo, top = (mid, top) if size(mid) * ratio <= budget else (lo, mid - 1)
            return lo

        if size(0) > budget:
            return at(0.0, effort)
        lo = highest(1.0, 0, 200)
        if not effort:
            return at(lo / 2, 0)
        data = at(lo / 2, effort)
        ratio = len(data) / size(lo)
        if len(data) <= budget:
            # the fit saved bytes: the highest quality that the same saving brings within the
            # budget is fitted too, and kept if it fits (else once more, one ratio later)
            up = highest(ratio, lo, 200)
            for _ in range(2):
                if up <= lo:
                    break
                richer = at(up / 2, effort)
                if len(richer) <= budget:
                    return richer
                up = highest(len(richer) / size(up), lo, up - 1)
            return data
        below = [h for h, n in sizes.items() if h < lo and n * ratio <= budget]
        if below:
            data = at(max(below) / 2, effort)
            if len(data) <= budget:
                return data
        return at(lo / 2, 0)

    def _analyse(self, x: torch.Tensor, progress: _Progress | None = None) -> torch.Tensor:
        """The latent y (ungained, fp32 on the CPU) of a padded (1, 3, H, W) image in 0..1."""
        x = x.to(self.device, memory_format=self._layout)

        def g_a(part: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.analysis_bf16):
                return self.model.g_a(part)

        with _threads(self.threads):
            y = _tiled(g_a, x, 1 / 16, TILE, MARGIN, progress, self._tile_workers)
        return y.float().cpu().contiguous()

    @property
    def _tile_workers(self) -> int:
        """Tiles of g_a and g_s at once: one per thread on the CPU (a GPU takes them one by one)."""
        return self.threads if self.device.type == "cpu" else 1

    def latent_bytes(self, x: torch.Tensor, level: float) -> int:
        """Bytes of the z, escape and y streams for a (1, 3, H, W) image in 0..1 at a rate level."""
        with torch.no_grad(), _threads(1):
            y = self._analyse(pad_to(x, PAD))
            streams, _, _ = self._encode_latent(self.model.gained(y, level))
        return len(streams.z) + len(streams.escapes) + len(streams.y)

    def _refine(self, pixels: np.ndarray, x_bar: np.ndarray, activity: np.ndarray, step: float,
                edge: bool = False, block_weight: np.ndarray | None = None, rdo: bool = False
                ) -> tuple[bytes, refine.Refinement]:
        """The refinement payload for ``pixels`` over ``x_bar`` (b"" when it would be empty), and what it decodes to.

        ``rdo`` chooses the levels by rate and distortion (at refine.RDO_PRICE) instead of the dead zone alone."""
        t0 = time.perf_counter()
        hgt, wid = pixels.shape[:2]
        residual = pixels.astype(np.float64) - x_bar
        act = refine.block_activity(activity, hgt, wid, 16)
        if block_weight is None:
            payload, ref = refine.encode(residual, step, act, edge=edge, rdo=refine.RDO_PRICE if rdo else 0.0)
        else:
            payload, ref = refine.encode(residual, step, act, edge=edge, rdo=refine.RDO_PRICE * block_weight.max(),
                                         block_weight=block_weight)
        self.timings["refine"] = self.timings.get("refine", 0.0) + time.perf_counter() - t0
        return (payload if ref.q.any() else b""), ref

    def _hyper(self, y: torch.Tensor) -> tuple[bytes, torch.Tensor]:
        """(z stream, psi) of a gained latent."""
        z_stream, z_hat = self.hyper.encode(self.model.h_a(y)[0].numpy())
        return z_stream, self.model.h_s(torch.from_numpy(z_hat)[None])

    def _band_map(self, fn, bands: list[tuple[int, int]]) -> list:
        """``fn(band)`` for every latent band, on up to ``threads`` threads at once (torch runs each
        band's operators on the thread that calls them: the caller holds torch to one thread)."""
        return _thread_map(fn, bands, self.threads)

    def _encode_latent(self, y: torch.Tensor, hyper: tuple[bytes, torch.Tensor] | None = None
                       ) -> tuple[Streams, torch.Tensor, np.ndarray]:
        t0 = time.perf_counter()
        z_stream, psi = hyper or self._hyper(y)
        bands = latent_bands(*y.shape[2:])

        def band(rows: tuple[int, int]):
            r0, r1 = rows
            with torch.no_grad():  # grad mode is per thread
                coder = PassEncoder()
                y_hat_g, activity = self._passes(psi[:, :, r0:r1].contiguous(), y[:, :, r0:r1].contiguous(), coder)
                return y_hat_g, activity, coder.finish()

        parts = self._band_map(band, bands)
        streams = Streams(z_stream, b"".join(p[2][1] for p in parts), b"".join(p[2][0] for p in parts),
                          band_crc([p[2][2] for p in parts]), bands=tuple((len(p[2][1]), len(p[2][0])) for p in parts))
        self.timings["entropy_model"] = time.perf_counter() - t0
        return streams, torch.cat([p[0] for p in parts], 2), np.concatenate([p[1] for p in parts])

    # -- decode -------------------------------------------------------------------------------
    def _decode(self, data, mode, steps, temperature, seed, max_pixels, progress) -> tuple[np.ndarray, Header]:
        header, streams = container.unpack(data, max_pixels=max_pixels)
        level = self.check_header(header)
        mode = mode or header.mode
        if mode not in ("perceptual", "fidelity"):
            raise BdcError(f"unknown mode {mode!r}")
        steps = header.steps if steps is None else steps
        if not 1 <= steps <= 1000:
            raise BdcError("steps must be within 1..1000")
        if temperature < 0:
            raise BdcError("temperature must be >= 0")
        seed = header.seed if seed is None else seed
        t0 = time.perf_counter()
        hp = math.ceil(header.height / PAD) * PAD
        wp = math.ceil(header.width / PAD) * PAD
        if header.version >= 4:
            z_hat = self.hyper.decode(streams.z, hp // 64, wp // 64)
        else:
            z_hat = decode_z_compressai(streams.z, hp // 64, wp // 64, *self._z_tables)
        psi = self.model.h_s(torch.from_numpy(z_hat)[None])
        bands = latent_bands(hp // 16, wp // 16, len(streams.bands) or 1)
        if bands is None:
            raise BdcError(f"corrupt file: {len(streams.bands)} latent bands for {hp // 16} latent rows")
        coded = streams.band_streams()

        def band(k: int):
            r0, r1 = bands[k]
            with torch.no_grad():  # grad mode is per thread
                coder = PassDecoder(coded[k][1], coded[k][0])
                y_hat_g, activity = self._passes(psi[:, :, r0:r1].contiguous(), None, coder)
                coder.finish()
                return y_hat_g, activity, coder.crc

        parts = self._band_map(band, list(range(len(bands))))
        check_crc(band_crc([p[2] for p in parts]), streams.symbol_crc)
        y_hat_g, activity = torch.cat([p[0] for p in parts], 2), np.concatenate([p[1] for p in parts])
        layer = None
        if streams.refine:
            act = refine.block_activity(activity, header.height, header.width, 16)

            def decode_layer():
                ref = refine.decode(streams.refine, header.height, header.width, act)
                return ref, (refine.reconstruct(ref) if mode == "fidelity" else None)

            if not _one_tile(hp // 16, wp // 16, TILE // 16, MARGIN // 16):
                # the layer does not depend on x_bar: on a thread of its own while g_s runs, tile after tile
                # (3000x2000, fidelity: 8.45 -> 8.0 s; on an image of one tile it slowed the decode by 0.1 s)
                pool = concurrent.futures.ThreadPoolExecutor(1)
                layer = pool.submit(decode_layer)
                pool.shutdown(wait=False)
            else:
                layer = concurrent.futures.Future()
                layer.set_result(decode_layer())
        t1 = time.perf_counter()
        if mode == "perceptual":
            progress.plan(steps)  # before the tiles, so that the bar's total is right from the start
        x_bar = self._synthesize(y_hat_g, level, header.height, header.width, progress)
        if mode == "perceptual":
            gen = torch.Generator().manual_seed(int(seed))
            y_hat = self.model.dequantize(y_hat_g, level).to(self.device, memory_format=self._layout)

            def denoiser(*args, **kwargs):  # one progress unit per diffusion step
                with self._synthesis_precision():
                    out = self.model.denoiser(*args, **kwargs)
                progress()
                return out.float()

            with _threads(self.threads):
                with self._synthesis_precision():
                    texture = self.model.texture(y_hat)
                cond = {"texture": texture, "x_bar": x_bar * 2 - 1}
                x0 = self.schedule.sample(denoiser, cond, cond["x_bar"], steps, temperature, gen)
            del cond, texture, y_hat  # large images: free the features before the refinement's arrays exist
            pixels = self._to_uint8((x0 + 1) / 2, header.height, header.width)
            del x0
            base = self._to_uint8(x_bar, header.height, header.width) if layer is not None else None
        else:
            pixels = base = self._to_uint8(x_bar, header.height, header.width)
        del x_bar
        t2 = time.perf_counter()
        if layer is not None:
            ref, residual = layer.result()
            if mode == "perceptual":
                residual = refine.project(ref, pixels.astype(np.float64) - base)
            pixels = _add_residual(base, residual)
        self.timings = {"entropy_decode": t1 - t0, "synthesis": t2 - t1, "refine": time.perf_counter() - t2}
        return pixels, header
