"""The ``.bdc`` container: a compact, versioned, checksummed frame around the streams.

All integers little-endian; ``varint`` is unsigned LEB128 (at most 5 bytes here).

======  ===========  ==========================================================
bytes   field        meaning
======  ===========  ==========================================================
3       magic        ``b"BDC"``
1       version      container format version (5; versions 1 to 4 are read too)
1       flags        bit 0: grayscale source; bit 1: default decode mode is
                     fidelity (else perceptual); bit 2: a refinement layer
                     follows the y stream; other bits must be 0
1       quality      quality x 2 (0..200), i.e. 0..100 in half steps
1       rate level   the latent's rate level x 50 (0..250); decoders take the
                     level from here, so the encoder's quality plan may change
                     without a new format version (absent before version 3)
4       weights id   first 4 bytes of the weights' tensor hash
varint  width - 1    image width in pixels  (1 .. 2^20)
varint  height - 1   image height in pixels (1 .. 2^20)
1       steps        default diffusion steps (1..64)
varint  seed         default sampling seed (< 2^32)
varint  bands        latent bands n, 1..MAX_BANDS (from version 5; before: one)
n-1 x   band sizes   varint escape bytes, varint y bytes of each band but the
                     last, which takes the rest of both streams
varint  len, bytes   z stream (hyper-latent; constriction rANS words, uint32
                     little-endian; CompressAI's rANS format before version 4)
varint  len, bytes   escape stream (varints of out-of-alphabet residual magnitudes),
                     the bands' one after the other
varint  len, bytes   y stream (constriction rANS words, uint32 little-endian), one
                     stack coder's words per band, one band after the other
varint  len, bytes   refinement layer (only with flag bit 2; see ``refine.py``)
4       symbol crc   CRC-32 of the decoded y symbols: catches a decoder desync (with
                     several bands: CRC-32 of the bands' CRCs, each u32)
4       crc          CRC-32 of every byte before it
======  ===========  ==========================================================

About 27 bytes in all for a Kodak-sized image.  The latent is coded in horizontal
bands of whole windows of its entropy model (see ``Codec`` for the rows of each), so
that a decoder may decode them in parallel; a Kodak-sized image has one.  Versions 1 and 2 had no rate-level
byte: the decoder derives the level from the quality with the plan of that version
(see ``Codec.level_of``); version 1 had no refinement layer either.  The parser checks every field and
length before anything is allocated; this module does not import torch.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib

from .errors import BdcError

__all__ = ["MAGIC", "VERSION", "MAX_SIDE", "Header", "pack", "unpack", "describe"]

MAGIC = b"BDC"
VERSION = 5
READ_VERSIONS = (1, 2, 3, 4, 5)
MAX_BANDS = 255
LEVEL_SCALE = 50  # the rate level is stored in steps of 1/LEVEL_SCALE
MAX_SIDE = 1 << 20
_FLAG_GRAY = 1
_FLAG_FIDELITY = 2
_FLAG_REFINE = 4


@dataclasses.dataclass(frozen=True)
class Header:
    width: int
    height: int
    quality: float  # 0..100 in half steps
    weights_id: str  # 8 hex digits
    gray: bool = False
    mode: str = "perceptual"  # default decode mode
    steps: int = 8
    seed: int = 0
    version: int = VERSION
    level: float | None = None  # latent rate level; None in files before version 3


@dataclasses.dataclass(frozen=True)
class Streams:
    z: bytes
    escapes: bytes
    y: bytes
    symbol_crc: int
    refine: bytes = b""
    # (escape bytes, y bytes) of each latent band, in order; () for one band over both streams
    bands: tuple[tuple[int, int], ...] = ()

    def band_streams(self) -> list[tuple[bytes, bytes]]:
        """(escape stream, y stream) of each band."""
        if not self.bands:
            return [(self.escapes, self.y)]
        out, e0, y0 = [], 0, 0
        for ne, ny in self.bands:
            out.append((self.escapes[e0 : e0 + ne], self.y[y0 : y0 + ny]))
            e0, y0 = e0 + ne, y0 + ny
        return out


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise BdcError(f"truncated file: {what} runs past the end")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def varint(self, what: str, limit: int) -> int:
        n = shift = 0
        for _ in range(5):
            b = self.u8(what)
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                if n > limit:
                    raise BdcError(f"corrupt file: {what} {n} exceeds {limit}")
                return n
            shift += 7
        raise BdcError(f"corrupt file: {what} is not a valid varint")


def pack(header: Header, streams: Streams) -> bytes:
    q2 = round(header.quality * 2)
    if not 0 <= q2 <= 200 or abs(q2 / 2 - header.quality) > 1e-9:
        raise ValueError(f"quality must be 0..100 in half steps, got {header.quality}")
    if not (1 <= header.width <= MAX_SIDE and 1 <= header.height <= MAX_SIDE):
        raise ValueError("image size out of range")
    if not 1 <= header.steps <= 64 or not 0 <= header.seed < 2**32:
        raise ValueError("steps or seed out of range")
    if header.version not in READ_VERSIONS:
        raise ValueError(f"unknown version {header.version}")
    if (header.level is None) != (header.version < 3):
        raise ValueError("files from version 3 on carry a rate level; earlier versions do not")
    if header.version < 2 and streams.refine:
        raise ValueError("version 1 files have no refinement layer")
    bands = streams.bands or ((len(streams.escapes), len(streams.y)),)
    if header.version < 5 and len(bands) > 1:
        raise ValueError("files before version 5 have one latent band")
    if not 1 <= len(bands) <= MAX_BANDS:
        raise ValueError(f"1..{MAX_BANDS} latent bands, got {len(bands)}")
    if (sum(b[0] for b in bands), sum(b[1] for b in bands)) != (len(streams.escapes), len(streams.y)) or any(
            b[1] % 4 for b in bands):
        raise ValueError("band sizes do not add up to the streams, or a band's y stream is not whole words")
    flags = (_FLAG_GRAY if header.gray else 0) | (_FLAG_FIDELITY if header.mode == "fidelity" else 0)
    flags |= _FLAG_REFINE if streams.refine else 0
    out = bytearray(MAGIC)
    out += bytes([header.version, flags, q2])
    if header.level is not None:
        code = round(header.level * LEVEL_SCALE)
        if not 0 <= code <= 255 or abs(code / LEVEL_SCALE - header.level) > 1e-9:
            raise ValueError(f"rate level must be 0..{255 / LEVEL_SCALE} in steps of 1/{LEVEL_SCALE}")
        out.append(code)
    out += bytes.fromhex(header.weights_id)
    out += _varint(header.width - 1) + _varint(header.height - 1)
    out += bytes([header.steps]) + _varint(header.seed)
    if header.version >= 5:
        out += _varint(len(bands))
        for ne, ny in bands[:-1]:
            out += _varint(ne) + _varint(ny)
    for s in (streams.z, streams.escapes, streams.y) + ((streams.refine,) if streams.refine else ()):
        out += _varint(len(s)) + s
    out += struct.pack("<I", streams.symbol_crc & 0xFFFFFFFF)
    out += struct.pack("<I", zlib.crc32(out))
    return bytes(out)


def unpack(data: bytes, max_pixels: int | None = None) -> tuple[Header, Streams]:
    """Parse and validate a ``.bdc`` file; raises :class:`BdcError` on anything malformed."""
    data = bytes(data)
    if not data:
        raise BdcError("empty file, not a .bdc file")
    if len(data) < 4 or data[:3] != MAGIC:
        raise BdcError("not a .bdc file (bad magic)")
    r = _Reader(data)
    r.take(3, "magic")
    version = r.u8("version")
    if version not in READ_VERSIONS:
        raise BdcError(f"unsupported .bdc version {version} (this bdcodec reads versions 1 to {VERSION})")
    if len(data) < 20:
        raise BdcError("truncated file: shorter than a header")
    stored_crc = struct.unpack("<I", data[-4:])[0]
    if zlib.crc32(data[:-4]) != stored_crc:
        raise BdcError("corrupt or truncated file: checksum mismatch")
    flags = r.u8("flags")
    known = _FLAG_GRAY | _FLAG_FIDELITY | (_FLAG_REFINE if version >= 2 else 0)
    if flags & ~known:
        raise BdcError("corrupt file: unknown flags")
    q2 = r.u8("quality")
    if q2 > 200:
        raise BdcError(f"corrupt file: quality {q2 / 2} out of range")
    level = r.u8("rate level") / LEVEL_SCALE if version >= 3 else None
    wid = r.take(4, "weights id").hex()
    width = r.varint("width", MAX_SIDE - 1) + 1
    height = r.varint("height", MAX_SIDE - 1) + 1
    if max_pixels is not None and width * height > max_pixels:
        raise BdcError(f"image is {width}x{height} = {width * height} pixels, above the limit of {max_pixels}")
    steps = r.u8("steps")
    if not 1 <= steps <= 64:
        raise BdcError(f"corrupt file: steps {steps} out of range")
    seed = r.varint("seed", 2**32 - 1)
    body_end = len(data) - 8
    sizes = []
    if version >= 5:
        n = r.varint("band count", MAX_BANDS)
        if not n:
            raise BdcError("corrupt file: no latent bands")
        sizes = [(r.varint("band escape length", body_end), r.varint("band y length", body_end)) for _ in range(n - 1)]
    lens = []
    streams = []
    names = ("z stream", "escape stream", "y stream") + (("refinement layer",) if flags & _FLAG_REFINE else ())
    for what in names:
        n = r.varint(f"{what} length", body_end - r.pos)
        lens.append(n)
        streams.append(r.take(n, what))
    if r.pos != body_end:
        raise BdcError("corrupt file: trailing bytes")
    if lens[2] % 4:
        raise BdcError("corrupt file: y stream is not whole words")
    bands: tuple[tuple[int, int], ...] = ()
    if sizes:
        rest = (lens[1] - sum(b[0] for b in sizes), lens[2] - sum(b[1] for b in sizes))
        if min(rest) < 0 or any(b[1] % 4 for b in sizes):
            raise BdcError("corrupt file: latent band sizes do not fit the streams")
        bands = tuple(sizes) + (rest,)
    symbol_crc = struct.unpack("<I", data[body_end : body_end + 4])[0]
    header = Header(width, height, q2 / 2, wid, bool(flags & _FLAG_GRAY),
                    "fidelity" if flags & _FLAG_FIDELITY else "perceptual", steps, seed, version, level)
    refine = streams[3] if len(streams) > 3 else b""
    if flags & _FLAG_REFINE and not refine:
        raise BdcError("corrupt file: empty refinement layer")
    return header, Streams(streams[0], streams[1], streams[2], symbol_crc, refine, bands)


def describe(data: bytes) -> str:
    """The header of a ``.bdc`` file in words (for ``bdcodec info``)."""
    header, streams = unpack(data)
    n = header.width * header.height
    overhead = len(data) - len(streams.z) - len(streams.escapes) - len(streams.y) - len(streams.refine)
    if streams.refine and len(streams.refine) >= 2:
        step = struct.unpack_from("<H", streams.refine)[0] / 16
        refine = f"{len(streams.refine)} B, luma step {step:g}"
    else:
        refine = "none"
    lines = [
        f"format:      .bdc version {header.version}",
        f"size:        {header.width} x {header.height} ({'grayscale' if header.gray else 'RGB'} source)",
        f"quality:     {header.quality:g}"
        + (f" (latent rate level {header.level:g})" if header.level is not None else ""),
        f"weights id:  {header.weights_id}",
        f"decode:      {header.mode} mode, {header.steps} step{'s' if header.steps != 1 else ''}, seed {header.seed}",
        f"streams:     z {len(streams.z)} B, y {len(streams.y)} B, escapes {len(streams.escapes)} B, "
        f"header+checks {overhead} B" + (f", {len(streams.bands)} latent bands" if len(streams.bands) > 1 else ""),
        f"refinement:  {refine}",
        f"total:       {len(data)} bytes, {8 * len(data) / n:.4f} bpp",
    ]
    return "\n".join(lines)
