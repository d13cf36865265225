"""The refinement layer: what the learned transforms leave out, coded in the DCT domain.

At high qualities the fidelity reconstruction ``x_bar`` of the latent is topped up with
the residual ``x - x_bar``: converted to YCbCr, cut into 8x8 blocks, transformed with
the orthonormal DCT-II, quantized with a dead-zone quantizer (step ``step`` for luma,
``step * chroma`` for chroma) and coded with rANS.

Entropy model, per *band* = (component, diagonal ``u + v`` of the DCT coefficient,
activity class of the block):

- significance (coefficient != 0): Bernoulli with ``p = byte / 256``;
- magnitude - 1 of significant coefficients: a geometric law with ratio
  ``(byte + 0.5) / 256``, truncated to ``MAG - 1`` values plus an escape whose
  excess goes out as ``ESC_BITS`` raw bits;
- sign: one raw bit.

The activity class of a block comes from the latent's entropy model: the sum over
channels of the scale indexes at the latent position over the block.  Those are
integers both sides already share (the latent decode checks them with its symbol
CRC), so the classes cannot drift between machines; the class thresholds travel in
the payload.  The encoder fits the band parameters (two bytes a band) to the image.
Every probability is built from bytes with exactly rounded float operations, so
encoder and decoder build identical tables anywhere.

Payload layout (inside the container's refinement field)::

    u16   step x 16            luma quantizer step, 1.0 .. 4095.9375
    u8    chroma x 16          chroma step multiplier
    u8    K                    activity classes, 1 .. MAX_CLASSES
    K-1   varint thresholds    ascending class boundaries on block activity
    bands u8 p [, u8 theta]    per (component, diagonal, class); p = 0: band all zero
    rest  rANS words           uint32 little-endian
"""

from __future__ import annotations

import dataclasses
import struct

import constriction
import numpy as np

from .errors import BdcError
from .rans import _varint

__all__ = ["BLOCK", "ROUNDING", "Refinement", "encode", "decode", "reconstruct", "project"]

BLOCK = 8
DIAGONALS = 2 * BLOCK - 1
MAG = 24  # magnitude alphabet: 0 .. MAG-2 literal, MAG-1 escape
ESC_BITS = 12
RDO_PASSES = 2
RDO_BLOCKS = 16384  # blocks per slice of the RDO's choices (bounds its temporaries)
CODE_PART = 1 << 20  # symbols per call to the coder where each has a model of its own
# The price of a bit in squared luma steps of error, for choices made by rate and
# distortion (``encode(rdo=)``, and the encoder's latent fit, which prices the error the
# layer leaves the same way).
RDO_PRICE = 0.1
MAX_CLASSES = 3
ROUNDING = 1 / 3  # dead zone: |a| < 1 - ROUNDING quantizes to 0
# A perceptual decode keeps the diffusion decoder's detail only in 8x8 blocks where the
# file codes fewer than TEXTURE_GATE luma coefficients; where it codes more, the file
# describes the texture and its own reconstruction is kept (see ``project``).  Clamping
# the generated detail into every coded cell instead pulled coded coefficients to the
# edge of their cells and softened textured images: kodim05 at quality 75, LPIPS 0.052
# against 0.030 gated and 0.024 for the fidelity decode.
TEXTURE_GATE = 2
DEFAULT_CHROMA = 1.25
_MIN_STEP16 = 16  # steps below 1.0 could overflow the escape field
_EDGE = 1e-6

_YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
_RGB = np.linalg.inv(_YCC)
_n = np.arange(BLOCK)
_DCT = np.sqrt(2 / BLOCK) * np.cos(np.pi * (2 * _n[None] + 1) * _n[:, None] / (2 * BLOCK))
_DCT[0] /= np.sqrt(2)
_DCT2 = np.kron(_DCT, _DCT)  # the 2-D DCT of a flattened 8x8 block: coefficient u*8+v from pixel i*8+j
_DIAG = (_n[:, None] + _n[None]).ravel()  # diagonal of each of the 64 coefficients

_BERNOULLI = constriction.stream.model.Bernoulli(perfect=False)
_CATEGORICAL = constriction.stream.model.Categorical(perfect=False)
_ESCAPE = constriction.stream.model.Uniform(1 << ESC_BITS)
_SIGN = constriction.stream.model.Uniform(2)


def _magnitude_table() -> np.ndarray:
    """(256, MAG) probabilities of magnitude-1 for each theta byte (exactly rounded ops only)."""
    theta = (np.arange(256, dtype=np.float64) + 0.5) / 256
    table = np.empty((256, MAG))
    table[:, 0] = 1.0
    for m in range(1, MAG):
        table[:, m] = table[:, m - 1] * theta
    table[:, MAG - 1] = table[:, MAG - 1] / (1.0 - theta)  # the tail beyond MAG-2
    return table / table.sum(1, keepdims=True)


_MAG_P = _magnitude_table()
_MAG_BITS = -np.log2(_MAG_P)


@dataclasses.dataclass
class Refinement:
    """Decoded (or encoded) refinement: integer coefficients and their steps."""

    q: np.ndarray  # int32 (3, blocks, 64)
    steps: np.ndarray  # float64 (3,): luma, chroma, chroma
    height: int
    width: int


# -- transforms -------------------------------------------------------------------------------
def _grid(height: int, width: int) -> tuple[int, int]:
    return -(-height // BLOCK), -(-width // BLOCK)


def _forward(residual: np.ndarray, edge: bool = False) -> np.ndarray:
    """(H, W, 3) RGB residual -> (3, blocks, 64) DCT coefficients of its YCbCr.

    Partial blocks are padded with zeros, or with ``edge`` by repeating the last row
    and column (the decoder crops the padding away, so this is the encoder's choice).
    Both transforms are linear, so the colour is converted after the DCT, and the 2-D
    DCT of every block is one matrix product with ``_DCT2``: two large products in
    place of a product per block, and fewer full-size temporaries.
    """
    h, w, _ = residual.shape
    by, bx = _grid(h, w)
    if (by * BLOCK, bx * BLOCK) != (h, w):
        residual = np.pad(residual, ((0, by * BLOCK - h), (0, bx * BLOCK - w), (0, 0)),
                          mode="edge" if edge else "constant")
    blocks = residual.reshape(by, BLOCK, bx, BLOCK, 3).transpose(4, 0, 2, 1, 3).reshape(3 * by * bx, BLOCK**2)
    return (_YCC @ (blocks @ _DCT2.T).reshape(3, -1)).reshape(3, by * bx, BLOCK**2)


def _inverse(coef: np.ndarray, height: int, width: int) -> np.ndarray:
    by, bx = _grid(height, width)
    blocks = (_RGB @ coef.reshape(3, -1)).reshape(3 * by * bx, BLOCK**2) @ _DCT2
    pad = blocks.reshape(3, by, bx, BLOCK, BLOCK).transpose(1, 3, 2, 4, 0).reshape(by * BLOCK, bx * BLOCK, 3)
    return pad[:height, :width]


def block_activity(activity: np.ndarray, height: int, width: int, cell: int) -> np.ndarray:
    """Activity of each block from a latent-resolution map (one value per ``cell`` pixels)."""
    by, bx = _grid(height, width)
    ys = np.arange(by) * BLOCK // cell
    xs = np.arange(bx) * BLOCK // cell
    if activity.shape[0] <= ys[-1] or activity.shape[1] <= xs[-1]:
        raise ValueError("activity map smaller than the image")
    return activity[ys[:, None], xs[None, :]].ravel().astype(np.int64)


def block_means(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Mean of an (H, W) map over each block (partial blocks: over their pixels)."""
    by, bx = _grid(height, width)
    pad = np.pad(np.asarray(values, dtype=np.float64), ((0, by * BLOCK - height), (0, bx * BLOCK - width)))
    sums = pad.reshape(by, BLOCK, bx, BLOCK).sum((1, 3))
    rows = np.minimum(height - np.arange(by) * BLOCK, BLOCK)  # pixels of each block row and column
    cols = np.minimum(width - np.arange(bx) * BLOCK, BLOCK)
    return (sums / np.outer(rows, cols)).ravel()


def _classes(act: np.ndarray, thresholds: list[int]) -> np.ndarray:
    cls = np.zeros(act.shape, dtype=np.int64)
    for t in thresholds:
        cls += act >= t
    return cls


def _band_ids(cls: np.ndarray, k: int) -> np.ndarray:
    """(3, blocks, 64) band index of every coefficient: (component, diagonal, class)."""
    comp = np.arange(3)[:, None, None]
    return (comp * DIAGONALS + _DIAG[None, None, :]) * k + cls[None, :, None]


# -- encoder ----------------------------------------------------------------------------------
def _bernoulli_bits(n1: np.ndarray, n0: np.ndarray, byte: np.ndarray) -> np.ndarray:
    p = byte / 256
    return -(n1 * np.log2(p) + n0 * np.log2(1 - p))


def _fit(n: np.ndarray, n1: np.ndarray, hist: np.ndarray, escapes: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Choose (p byte, theta byte) per band from its counts; returns them and the estimated bits.

    ``n``: coefficients per band, ``n1``: the nonzero ones, ``hist``: (bands, MAG)
    histogram of min(|level| - 1, MAG - 1), ``escapes``: levels past the alphabet.
    """
    n_bands = len(n)
    guess = np.clip(np.round(n1 / np.maximum(n, 1) * 256), 1, 255)
    cands = np.clip(guess[None] + np.arange(-1, 2)[:, None], 1, 255)
    cost = _bernoulli_bits(n1[None], (n - n1)[None], cands)
    pbyte = cands[cost.argmin(0), np.arange(n_bands)].astype(np.int64)
    bits = cost.min(0)
    pbyte[n1 == 0] = 0
    bits[n1 == 0] = 0
    mcost = hist @ _MAG_BITS.T  # (bands, 256)
    tbyte = mcost.argmin(1)
    total = bits.sum() + mcost.min(1).sum() + n1.sum() + escapes * ESC_BITS
    total += 8 * (np.count_nonzero(pbyte) + n_bands)
    return pbyte, tbyte, float(total)


def _best_model(q: np.ndarray, activity: np.ndarray) -> tuple:
    """(bits, K, thresholds, bands, p bytes, theta bytes) of the cheapest class split for ``q``.

    The counts are taken once per (component, diagonal, activity value), over the
    nonzero levels only; each class split then merges them, and only the chosen
    split's band map is built for the whole image.
    """
    values, of_block = np.unique(activity, return_inverse=True)
    n_values = len(values)
    per_diagonal = np.bincount(_DIAG, minlength=DIAGONALS)
    n = np.broadcast_to(np.outer(per_diagonal, np.bincount(of_block, minlength=n_values)),
                        (3, DIAGONALS, n_values)).ravel()
    comp, block, coef = np.nonzero(q)
    key = (comp * DIAGONALS + _DIAG[coef]) * n_values + of_block[block]
    mag = np.abs(q[comp, block, coef]).astype(np.int64) - 1
    n1 = np.bincount(key, minlength=n.size).astype(np.float64)
    hist = np.bincount(key * MAG + np.minimum(mag, MAG - 1), minlength=n.size * MAG).reshape(n.size, MAG)
    escapes = int(np.count_nonzero(mag >= MAG - 1))
    best = None
    tried = set()
    for classes in range(1, MAX_CLASSES + 1):
        quantiles = np.quantile(activity, np.arange(1, classes) / classes) if classes > 1 else []
        thresholds = sorted({int(t) for t in quantiles if t > activity.min()})
        k = len(thresholds) + 1
        if k in tried:
            continue
        tried.add(k)
        n_bands = 3 * DIAGONALS * k
        band = (np.arange(3 * DIAGONALS)[:, None] * k + _classes(values, thresholds)[None]).ravel()
        # the rows of each band summed (np.add.at did it 20x slower: 1.8 s of a fitted 768x512 encode)
        merged = np.bincount((band[:, None] * MAG + np.arange(MAG)).ravel(), weights=hist.ravel(),
                             minlength=n_bands * MAG).reshape(n_bands, MAG)
        pbyte, tbyte, bits = _fit(np.bincount(band, weights=n, minlength=n_bands),
                                  np.bincount(band, weights=n1, minlength=n_bands), merged, escapes)
        if best is None or bits < best[0]:
            best = (bits, k, thresholds, pbyte, tbyte)
    bits, k, thresholds, pbyte, tbyte = best
    return bits, k, thresholds, _band_ids(_classes(activity, thresholds), k), pbyte, tbyte


def _rdo_quantize(a: np.ndarray, bands: np.ndarray, pbyte: np.ndarray, tbyte: np.ndarray,
                  weight: np.ndarray, lam: float) -> np.ndarray:
    """Rate-distortion optimised levels for the scaled coefficients ``a`` (3, blocks, 64).

    Each coefficient takes, of its nearest level, the level one nearer zero and zero,
    the one with the least ``weight * (a - level)^2 + lam * bits``, the bits counted
    under the band models ``pbyte``/``tbyte`` fitted to the current levels (a dead band is priced
    as if it held one coefficient in 256).  Decoders need nothing of this: the levels
    are coded as any others.  Each coefficient's choice is its own, so the blocks go
    RDO_BLOCKS at a time (the temporaries of a whole 16 MP image took 5 GB).
    """
    p = np.where(pbyte > 0, pbyte, 1) / 256
    zero_bits = np.where(pbyte > 0, -np.log2(1 - p), 0.0)
    one_bits = -np.log2(p) + 1  # significance and sign
    out = np.empty(a.shape, dtype=np.int32)
    for b0 in range(0, a.shape[1], RDO_BLOCKS):
        part = slice(b0, b0 + RDO_BLOCKS)
        band = bands[:, part]
        w = weight[:, part] if weight.shape[1] > 1 else weight
        table = tbyte[band]  # each coefficient's row of _MAG_BITS (not the rows themselves: MAG x the memory)

        def cost(level: np.ndarray) -> np.ndarray:
            m = np.abs(level)
            extra = _MAG_BITS[table, np.minimum(np.maximum(m - 1, 0), MAG - 1)]
            bits = np.where(m == 0, zero_bits[band], one_bits[band] + extra + np.where(m - 1 >= MAG - 1, ESC_BITS, 0))
            return w * (a[:, part] - level) ** 2 + lam * bits

        near = np.round(a[:, part]).astype(np.int32)
        lower = near - np.sign(near).astype(np.int32)
        cands = (near, lower, np.zeros_like(near))
        costs = np.stack([cost(c) for c in cands])
        out[:, part] = np.choose(costs.argmin(0), cands)
    return out


def quantize(coef: np.ndarray, steps: np.ndarray) -> np.ndarray:
    return quantize_scaled(coef / steps[:, None, None])


def quantize_scaled(a: np.ndarray) -> np.ndarray:
    """Dead-zone levels of coefficients already divided by their steps.

    ``trunc(a + copysign(ROUNDING, a))`` is ``sign(a) * floor(|a| + ROUNDING)`` (the
    sum is exact up to its sign), in fewer passes over the coefficients."""
    out = np.copysign(ROUNDING, a)
    out += a
    return np.trunc(out, out=out).astype(np.int32)


def _steps(step16: int, chroma16: int) -> np.ndarray:
    step = step16 / 16
    return np.array([step, step * chroma16 / 16, step * chroma16 / 16])


def encode(residual: np.ndarray, step: float, activity: np.ndarray, chroma: float = DEFAULT_CHROMA,
           edge: bool = False, rdo: float = 0.0, block_weight: np.ndarray | None = None
           ) -> tuple[bytes, Refinement]:
    """Code an (H, W, 3) residual in 0..255 units; ``activity`` is one integer per block.

    ``edge`` pads partial blocks by repetition instead of zeros (see ``_forward``): a
    block holding one pixel then needs its DC coefficient only.  ``rdo`` > 0 picks
    each coefficient's level by rate and distortion (see ``_rdo_quantize``; rdo is
    the price of a bit in luma squared steps, e.g. RDO_PRICE), with the distortion of block ``i``
    weighed by ``block_weight[i]`` (regions of interest).  Returns the payload and
    the refinement the decoder will see.
    """
    h, w, _ = residual.shape
    step16 = int(np.clip(round(step * 16), _MIN_STEP16, 65535))
    chroma16 = int(np.clip(round(chroma * 16), 16, 255))
    steps = _steps(step16, chroma16)
    a = _forward(np.asarray(residual, dtype=np.float64), edge) / steps[:, None, None]
    q = quantize_scaled(a)
    model = _best_model(q, activity)
    if rdo > 0:
        # the weight of each coefficient's squared error (in steps) in the RGB squared error
        weight = ((_RGB**2).sum(0) * steps**2)[:, None, None]
        lam = rdo * weight[0, 0, 0]
        if block_weight is not None:
            weight = weight * np.asarray(block_weight, dtype=np.float64)[None, :, None]
        for _ in range(RDO_PASSES):
            q = _rdo_quantize(a, *model[3:], weight, lam)
            model = _best_model(q, activity)
    _, k, thresholds, bands, pbyte, tbyte = model
    head = bytearray(struct.pack("<HBB", step16, chroma16, k))
    for i, t in enumerate(thresholds):
        _varint(t - (thresholds[i - 1] if i else 0), head)
    for b in range(len(pbyte)):
        head.append(int(pbyte[b]))
        if pbyte[b]:
            head.append(int(tbyte[b]))

    flat_b = bands.ravel()
    flat_q = q.ravel()
    live = pbyte[flat_b] > 0
    sig = (flat_q[live] != 0).astype(np.int32)
    nzq = flat_q[flat_q != 0]
    nzb = flat_b[flat_q != 0]
    mag = np.abs(nzq).astype(np.int64) - 1
    esc = mag >= MAG - 1
    coder = constriction.stream.stack.AnsCoder()
    if nzq.size:
        coder.encode_reverse((nzq < 0).astype(np.int32), _SIGN)
        if esc.any():
            coder.encode_reverse((mag[esc] - (MAG - 1)).astype(np.int32), _ESCAPE)
        _encode_in_parts(coder, np.minimum(mag, MAG - 1).astype(np.int32), _CATEGORICAL,
                         lambda part: _MAG_P[tbyte[nzb[part]]])
    if sig.size:
        live_b = flat_b[live]
        _encode_in_parts(coder, sig, _BERNOULLI, lambda part: pbyte[live_b[part]] / 256)
    words = coder.get_compressed().astype("<u4").tobytes()
    return bytes(head) + words, Refinement(q, steps, h, w)


def _encode_in_parts(coder, symbols: np.ndarray, family, params) -> None:
    """``coder.encode_reverse(symbols, family, params(all))``, CODE_PART symbols a call: the same stream
    (a stack coder takes the parts last first), without the whole image's model parameters at once
    (the magnitudes' are MAG floats a symbol)."""
    for s0 in reversed(range(0, symbols.size, CODE_PART)):
        part = slice(s0, s0 + CODE_PART)
        coder.encode_reverse(symbols[part], family, params(part))


def _decode_in_parts(coder, n: int, family, params) -> np.ndarray:
    """``n`` symbols that :func:`_encode_in_parts` coded, decoded CODE_PART a call."""
    return np.concatenate([coder.decode(family, params(slice(s0, s0 + CODE_PART))) for s0 in range(0, n, CODE_PART)])


# -- decoder ----------------------------------------------------------------------------------
def decode(payload: bytes, height: int, width: int, activity: np.ndarray) -> Refinement:
    """Parse and decode a payload; raises :class:`BdcError` on anything malformed."""
    def fail(what: str):
        raise BdcError(f"corrupt file: refinement layer {what}")

    if len(payload) < 4:
        fail("is truncated")
    step16, chroma16, k = struct.unpack_from("<HBB", payload)
    if step16 < _MIN_STEP16 or chroma16 < 16 or not 1 <= k <= MAX_CLASSES:
        fail("has an invalid header")
    pos = 4
    thresholds = []
    for _ in range(k - 1):
        n = shift = 0
        while True:
            if pos >= len(payload) or shift > 28:
                fail("has an invalid class threshold")
            b = payload[pos]
            pos += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        thresholds.append(n + (thresholds[-1] if thresholds else 0))
    n_bands = 3 * DIAGONALS * k
    pbyte = np.zeros(n_bands, dtype=np.int64)
    tbyte = np.zeros(n_bands, dtype=np.int64)
    for b in range(n_bands):
        if pos >= len(payload):
            fail("band table is truncated")
        pbyte[b] = payload[pos]
        pos += 1
        if pbyte[b]:
            if pos >= len(payload):
                fail("band table is truncated")
            tbyte[b] = payload[pos]
            pos += 1
    if (len(payload) - pos) % 4:
        fail("stream is not whole words")
    bands = _band_ids(_classes(activity, thresholds), k)
    flat_b = bands.ravel()
    q = np.zeros(flat_b.size, dtype=np.int64)
    try:
        coder = constriction.stream.stack.AnsCoder(np.frombuffer(payload[pos:], dtype="<u4").astype(np.uint32))
        live = np.flatnonzero(pbyte[flat_b] > 0)
        if live.size:
            sig = _decode_in_parts(coder, live.size, _BERNOULLI, lambda part: pbyte[flat_b[live[part]]] / 256)
            nz = live[sig.astype(bool)]
            if nz.size:
                mag = _decode_in_parts(coder, nz.size, _CATEGORICAL,
                                       lambda part: _MAG_P[tbyte[flat_b[nz[part]]]]).astype(np.int64)
                esc = mag == MAG - 1
                if esc.any():
                    mag[esc] += coder.decode(_ESCAPE, int(esc.sum()))
                neg = coder.decode(_SIGN, nz.size)
                q[nz] = np.where(neg == 1, -(mag + 1), mag + 1)
        if not coder.is_empty():
            fail("has unused data (corrupt file or decoder desync)")
    except BdcError:
        raise
    except Exception as exc:
        fail(f"does not decode ({exc})")
    return Refinement(q.reshape(bands.shape).astype(np.int32), _steps(step16, chroma16), height, width)


def reconstruct(ref: Refinement) -> np.ndarray:
    """The decoded residual, (H, W, 3) float in 0..255 units."""
    return _inverse(ref.q * ref.steps[:, None, None], ref.height, ref.width)


def project(ref: Refinement, proposal: np.ndarray, gate: int = TEXTURE_GATE) -> np.ndarray:
    """A residual near ``proposal`` whose coefficients quantize to ``ref.q``.

    In blocks where the file codes ``gate`` or more luma coefficients, the file describes
    the texture: they take the file's own reconstruction.  Elsewhere every coefficient of
    the proposal is clamped into the quantizer cell the file names, so the result is
    consistent with what was coded and keeps the proposal's detail where the file leaves
    room for it.
    """
    a = _forward(np.asarray(proposal, dtype=np.float64))
    a /= ref.steps[:, None, None]
    q = ref.q
    # the cell of level q: (q - R, q + 1 - R) above zero, (q - 1 + R, q + R) below, (R - 1, 1 - R) at zero
    lo = np.where(q > 0, q - ROUNDING, q - 1 + ROUNDING)
    hi = np.where(q < 0, q + ROUNDING, q + 1 - ROUNDING)
    np.clip(a, lo + _EDGE, hi - _EDGE, out=a)  # strictly inside, so it re-quantizes to q
    del lo, hi
    described = (q[0] != 0).sum(-1) >= gate  # blocks the file describes, from luma
    a[:, described] = q[:, described]
    a *= ref.steps[:, None, None]
    return _inverse(a, ref.height, ref.width)
