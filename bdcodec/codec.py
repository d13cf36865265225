"""The codec: images to ``.bdc`` bytes and back, with a loaded model.

Example::

    from bdcodec import Codec
    codec = Codec()                                  # shipped weights, CPU or CUDA
    data = codec.encode(pixels, quality=75)          # pixels: uint8 (H, W, 3) array
    image = codec.decode(data, mode="fidelity")      # uint8 (H, W, 3)

Determinism: everything that decides symbols or probabilities (h_s, the entropy
model's networks, the scale indexes) runs on the CPU in fp32, with the decoder's
arithmetic on both sides.  On the CPU, encode and decode run torch on one thread:
oneDNN's results change in the last bit with the thread count, which would flip
a rounded pixel now and then, so this keeps files and decoded images identical
on machines with any number of cores (run files in parallel processes for
throughput).  With ``device="cuda"`` the transforms and the denoiser run on the
GPU; the entropy path stays on the CPU, so files still decode anywhere.
"""

from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import torch

from . import container
from .container import Header, Streams
from .diffusion import BlurSchedule
from .entropy import anchor_mask, scale_indexes
from .errors import BdcError
from .model import pad_to
from .rans import PassDecoder, PassEncoder
from .weights import default_weights_path, load_model

__all__ = ["Codec", "DEFAULT_QUALITY", "DEFAULT_STEPS"]

DEFAULT_QUALITY = 75.0
DEFAULT_STEPS = 8
DEFAULT_TEMPERATURE = 0.5
PAD = 64
TILE = 1024  # pixels per tile side for g_a / g_s on large images
MARGIN = 128  # overlap in pixels around each tile


@contextlib.contextmanager
def _one_thread():
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BdcError("--device cuda asked for, but no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise BdcError(f"unknown device {device!r} (auto, cpu or cuda)")
    return torch.device(device)


def _tiled(fn, x: torch.Tensor, scale: float, tile: int, margin: int) -> torch.Tensor:
    """Apply a convolutional ``fn`` to overlapping tiles of ``x`` and stitch the centres.

    ``scale`` is the output/input size ratio (1/16 for g_a, 16 for g_s); ``tile`` and
    ``margin`` are in input pixels and must map to whole output pixels.  Peak memory
    then depends on the tile, not the image.
    """
    _, _, h, w = x.shape
    if h <= tile + 2 * margin and w <= tile + 2 * margin:
        return fn(x)
    out = None
    for i0 in range(0, h, tile):
        for j0 in range(0, w, tile):
            i1, j1 = min(i0 + tile, h), min(j0 + tile, w)
            a0, b0 = max(i0 - margin, 0), max(j0 - margin, 0)
            a1, b1 = min(i1 + margin, h), min(j1 + margin, w)
            part = fn(x[:, :, a0:a1, b0:b1])
            if out is None:
                out = part.new_empty(1, part.shape[1], round(h * scale), round(w * scale))
            ri, rj = round((i0 - a0) * scale), round((j0 - b0) * scale)
            hh, ww = round((i1 - i0) * scale), round((j1 - j0) * scale)
            out[:, :, round(i0 * scale) : round(i0 * scale) + hh, round(j0 * scale) : round(j0 * scale) + ww] = (
                part[:, :, ri : ri + hh, rj : rj + ww]
            )
    return out


class Codec:
    """A loaded model plus the coding logic.  Reuse one instance for many files."""

    def __init__(self, weights=None, device: str = "auto", *, model=None, weights_id: str = "00000000"):
        if model is None:
            self.weights_path = weights or default_weights_path()
            self.model, self.meta = load_model(self.weights_path)
            self.weights_id = self.meta["weights_id"]
        else:  # an in-memory model (training validation); its CDF tables must be up to date
            self.weights_path, self.model, self.meta, self.weights_id = "<in memory>", model, {}, weights_id
        self.device = resolve_device(device)
        cfg = self.model.cfg
        self.schedule = BlurSchedule(cfg.sigma_blur_max, cfg.min_damping)
        # Heavy pixel-domain parts may go to the GPU; the entropy path stays on the CPU.
        for part in (self.model.g_a, self.model.g_s, self.model.texture, self.model.denoiser):
            part.to(self.device)
        self.timings: dict[str, float] = {}

    # -- helpers ------------------------------------------------------------------------------
    def _tensor(self, pixels: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.array(pixels, dtype=np.uint8, order="C")).permute(2, 0, 1)[None].float() / 255.0
        return pad_to(x, PAD)

    def _passes(self, psi: torch.Tensor, y: torch.Tensor | None, coder) -> torch.Tensor:
        """Run the chunk x (anchor, non-anchor) passes; returns y_hat (gained domain).

        With ``y`` given, symbols ``round(y - mu)`` go into ``coder`` (a PassEncoder);
        without, they come out of ``coder`` (a PassDecoder).  Both sides run exactly
        this code, so they see the same mu and sigma.
        """
        ent = self.model.entropy
        _, _, h, w = psi.shape
        anchors = anchor_mask(h, w)
        y_hats = []
        offset = 0
        for j, c in enumerate(ent.chunks):
            prev = torch.cat(y_hats, 1) if j else None
            ya = torch.zeros(1, c, h, w)
            for p, sel in enumerate((anchors, ~anchors)):
                mu, sigma = ent.chunk_params(j, psi, prev, ya if p else None)
                mu_s = mu[:, :, sel]
                idx = scale_indexes(sigma[:, :, sel]).numpy()
                if y is not None:
                    r = torch.round(y[:, offset : offset + c][:, :, sel] - mu_s)
                    r = coder.add(r.numpy(), idx)
                else:
                    r = coder.next(idx)
                ya[:, :, sel] = torch.from_numpy(r).view(mu_s.shape).float() + mu_s
            y_hats.append(ya)
            offset += c
        return torch.cat(y_hats, 1)

    # -- encode -------------------------------------------------------------------------------
    def encode(self, pixels: np.ndarray, quality: float = DEFAULT_QUALITY, target_bpp: float | None = None,
               gray: bool = False, mode: str = "perceptual", steps: int = DEFAULT_STEPS, seed: int = 0) -> bytes:
        """Encode uint8 (H, W, 3) pixels; ``target_bpp`` searches the quality that meets it."""
        with torch.no_grad(), _one_thread():
            return self._encode(pixels, quality, target_bpp, gray, mode, steps, seed)

    def decode(self, data: bytes, mode: str | None = None, steps: int | None = None,
               temperature: float = DEFAULT_TEMPERATURE, seed: int | None = None,
               max_pixels: int | None = None) -> tuple[np.ndarray, Header]:
        """Decode ``.bdc`` bytes; returns (uint8 (H, W, 3) pixels, header)."""
        with torch.no_grad(), _one_thread():
            return self._decode(data, mode, steps, temperature, seed, max_pixels)

    def _encode(self, pixels, quality, target_bpp, gray, mode, steps, seed) -> bytes:
        if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
            raise BdcError("encode expects uint8 pixels of shape (H, W, 3)")
        hgt, wid = pixels.shape[:2]
        if not (1 <= wid <= container.MAX_SIDE and 1 <= hgt <= container.MAX_SIDE):
            raise BdcError(f"image size {wid}x{hgt} out of range")
        t0 = time.perf_counter()
        x = self._tensor(pixels).to(self.device)
        y0 = _tiled(self.model.g_a, x, 1 / 16, TILE, MARGIN).float().cpu()
        self.timings = {"analysis": time.perf_counter() - t0}

        def at(q: float) -> bytes:
            level = self.model.level(q)
            gain, _ = self.model.gains(level)
            return self._encode_latent(y0 * gain, Header(wid, hgt, q, self.weights_id, gray, mode, steps, seed))

        if target_bpp is None:
            q = round(float(quality) * 2) / 2
            if not 0 <= q <= 100:
                raise BdcError(f"quality must be within 0..100, got {quality}")
            return at(q)
        if target_bpp <= 0:
            raise BdcError("--target-bpp must be positive")
        lo, hi = 0, 200  # half steps
        best = at(0.0)
        if 8 * len(best) / (wid * hgt) > target_bpp:
            return best
        while lo < hi:
            mid = (lo + hi + 1) // 2
            data = at(mid / 2)
            if 8 * len(data) / (wid * hgt) <= target_bpp:
                lo, best = mid, data
            else:
                hi = mid - 1
        return best

    def _encode_latent(self, y: torch.Tensor, header: Header) -> bytes:
        t0 = time.perf_counter()
        eb = self.model.entropy_bottleneck
        z = self.model.h_a(y)
        z_strings = eb.compress(z)
        z_hat = eb.decompress(z_strings, z.shape[-2:])
        psi = self.model.h_s(z_hat)
        coder = PassEncoder()
        self._passes(psi, y, coder)
        t1 = time.perf_counter()
        y_stream, escapes, crc = coder.finish()
        self.timings["entropy_model"] = t1 - t0
        self.timings["rans"] = time.perf_counter() - t1
        return container.pack(header, Streams(z_strings[0], escapes, y_stream, crc))

    # -- decode -------------------------------------------------------------------------------
    def _decode(self, data, mode, steps, temperature, seed, max_pixels) -> tuple[np.ndarray, Header]:
        header, streams = container.unpack(data, max_pixels=max_pixels)
        if header.weights_id != self.weights_id:
            raise BdcError(
                f"file was made with weights {header.weights_id}, but the loaded weights are "
                f"{self.weights_id} ({self.weights_path}); pass the matching --weights"
            )
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
        eb = self.model.entropy_bottleneck
        zshape = (hp // 64, wp // 64)
        try:
            z_hat = eb.decompress([streams.z], zshape)
        except Exception as exc:
            raise BdcError(f"corrupt file: z stream does not decode ({exc})") from None
        psi = self.model.h_s(z_hat)
        coder = PassDecoder(streams.y, streams.escapes)
        y_hat_g = self._passes(psi, None, coder)
        coder.finish(streams.symbol_crc)
        t1 = time.perf_counter()
        level = self.model.level(header.quality)
        y_hat = self.model.dequantize(y_hat_g, level).to(self.device)
        x_bar = _tiled(self.model.g_s, y_hat, 16, TILE // 16, MARGIN // 16).clamp(0, 1)
        if mode == "perceptual":
            gen = torch.Generator().manual_seed(int(seed))
            cond = {"texture": self.model.texture(y_hat), "x_bar": x_bar * 2 - 1}
            x0 = self.schedule.sample(self.model.denoiser, cond, cond["x_bar"], steps, temperature, gen)
            out = (x0 + 1) / 2
        else:
            out = x_bar
        out = out[0, :, : header.height, : header.width].clamp(0, 1)
        pixels = (out * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        self.timings = {"entropy_decode": t1 - t0, "synthesis": time.perf_counter() - t1}
        return pixels, header
