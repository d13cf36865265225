"""rANS coding of the latents with ``constriction``.

**y.**
Each symbol is ``r = round(y - mu)`` under a zero-mean quantized Gaussian whose
standard deviation is ``SCALE_TABLE[idx]``: the probability tables depend only on
the integer index, never on float noise in mu or sigma.  Residuals outside
``[-ALPHABET + 1, ALPHABET - 1]`` are coded as the escape symbol ``+-ALPHABET``
and their excess magnitude goes, as a varint, to a separate escape stream.

All passes share one stack coder (LIFO): the encoder pushes the passes in
reverse, so the decoder pops them in coding order, one vectorized call per pass.

**z.** The hyper-latent's symbols ``round(z - median_c)`` use, per channel c, the
trained factorized prior's 16-bit CDF (see ``model.HyperTables``): the encoder
clamps them into the table's range (its overflow bin is never used; a clamped
value is simply the z the decoder sees), and a stack coder codes the channels one
vectorized call each.  The table's probabilities are multiples of 2^-16, which
constriction takes exactly, so both sides build identical models.  Files before
container version 4 hold CompressAI's own rANS format for z, which
:func:`decode_z_compressai` reads with CompressAI's coder.
"""

from __future__ import annotations

import zlib

import constriction
import numpy as np

from .entropy import SCALE_TABLE
from .errors import BdcError

__all__ = ["ALPHABET", "PassEncoder", "PassDecoder", "HyperCoder", "decode_z_compressai", "band_crc", "check_crc"]

ALPHABET = 255
_STDS = SCALE_TABLE.double().numpy()
_FAMILY = constriction.stream.model.QuantizedGaussian(-ALPHABET, ALPHABET)


def _varint(n: int, out: bytearray) -> None:
    """Append ``n`` as unsigned LEB128."""
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | 0x80 if n else b)
        if not n:
            return


def band_crc(crcs: list[int]) -> int:
    """The file's symbol CRC from its bands' (a band's own CRC where there is one band)."""
    if len(crcs) == 1:
        return crcs[0]
    return zlib.crc32(np.asarray(crcs, dtype="<u4").tobytes())


def check_crc(actual: int, expected: int) -> None:
    if actual != expected:
        raise BdcError(
            "decoded symbols do not match the file's checksum (corrupt file, or the encoder's "
            "arithmetic differs from this machine's)"
        )


class PassEncoder:
    """Collects the passes in coding order; :meth:`finish` returns the streams."""

    def __init__(self):
        self.passes: list[tuple[np.ndarray, np.ndarray]] = []
        self.escapes = bytearray()
        self.crc = 0

    def add(self, residuals: np.ndarray, indexes: np.ndarray) -> np.ndarray:
        """Queue one pass; returns the residuals as the decoder will see them (int64)."""
        r = residuals.astype(np.int64).ravel()
        big = np.abs(r) >= ALPHABET
        for v in r[big]:
            _varint(int(abs(v)) - ALPHABET, self.escapes)
        sym = np.where(big, np.sign(r) * ALPHABET, r).astype(np.int32)
        self.crc = zlib.crc32(r.astype("<i8").tobytes(), self.crc)
        self.passes.append((sym, indexes.astype(np.int64).ravel()))
        return r

    def finish(self) -> tuple[bytes, bytes, int]:
        """(y stream, escape stream, symbol CRC)."""
        coder = constriction.stream.stack.AnsCoder()
        for sym, idx in reversed(self.passes):
            if sym.size:
                coder.encode_reverse(sym, _FAMILY, np.zeros(sym.size), _STDS[idx])
        words = coder.get_compressed().astype("<u4").tobytes()
        return words, bytes(self.escapes), self.crc


class PassDecoder:
    """Pops the passes in coding order from a y stream."""

    def __init__(self, y: bytes, escapes: bytes):
        words = np.frombuffer(y, dtype="<u4").astype(np.uint32)
        try:
            self.coder = constriction.stream.stack.AnsCoder(words)
        except Exception as exc:  # constriction rejects some invalid streams up front
            raise BdcError(f"corrupt file: invalid y stream ({exc})") from None
        self.escapes, self.esc_pos = escapes, 0
        self.crc = 0

    def _read_escape(self) -> int:
        n = shift = 0
        while True:
            if self.esc_pos >= len(self.escapes) or shift > 35:
                raise BdcError("corrupt file: escape stream too short")
            b = self.escapes[self.esc_pos]
            self.esc_pos += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return n

    def next(self, indexes: np.ndarray) -> np.ndarray:
        idx = indexes.astype(np.int64).ravel()
        if not idx.size:
            return np.zeros(0, dtype=np.int64)
        try:
            sym = self.coder.decode(_FAMILY, np.zeros(idx.size), _STDS[idx]).astype(np.int64)
        except Exception as exc:
            raise BdcError(f"corrupt file: y stream does not decode ({exc})") from None
        esc = np.flatnonzero(np.abs(sym) == ALPHABET)
        for k in esc:
            sym[k] = np.sign(sym[k]) * (ALPHABET + self._read_escape())
        self.crc = zlib.crc32(sym.astype("<i8").tobytes(), self.crc)
        return sym

    def finish(self, expected_crc: int | None = None) -> None:
        """Check that the escapes are used up and, with ``expected_crc``, the symbols' CRC."""
        if self.esc_pos != len(self.escapes):
            raise BdcError("corrupt file: unused bytes in the escape stream")
        if expected_crc is not None:
            check_crc(self.crc, expected_crc)


class HyperCoder:
    """Codes z with the factorized prior's tables: ``cdfs`` (C, L), ``lengths`` (C,), ``offsets`` (C,)."""

    def __init__(self, cdfs: np.ndarray, lengths: np.ndarray, offsets: np.ndarray, medians: np.ndarray):
        self.offsets = offsets.astype(np.int64)
        self.bins = lengths.astype(np.int64) - 2  # value bins, the overflow bin left out
        self.medians = medians.astype(np.float32)
        self.models = []
        for c in range(len(lengths)):
            pmf = np.diff(cdfs[c, : lengths[c]]).astype(np.float64) / 65536.0
            self.models.append(constriction.stream.model.Categorical(pmf, perfect=False))

    def encode(self, z: np.ndarray) -> tuple[bytes, np.ndarray]:
        """z (C, H, W) float32 -> (stream, z_hat as the decoder will see it)."""
        med = self.medians[:, None, None]
        sym = np.round(z - med).astype(np.int64) - self.offsets[:, None, None]
        sym = np.clip(sym, 0, self.bins[:, None, None] - 1)
        coder = constriction.stream.stack.AnsCoder()
        for c in reversed(range(len(self.models))):
            coder.encode_reverse(sym[c].ravel().astype(np.int32), self.models[c])
        return coder.get_compressed().astype("<u4").tobytes(), self._values(sym)

    def decode(self, data: bytes, height: int, width: int) -> np.ndarray:
        if len(data) % 4:
            raise BdcError("corrupt file: z stream is not a whole number of words")
        try:
            coder = constriction.stream.stack.AnsCoder(np.frombuffer(data, dtype="<u4").astype(np.uint32))
            sym = np.stack([coder.decode(m, height * width) for m in self.models]).astype(np.int64)
        except Exception as exc:
            raise BdcError(f"corrupt file: z stream does not decode ({exc})") from None
        if (sym >= self.bins[:, None]).any():
            raise BdcError("corrupt file: z stream holds an overflow symbol")
        return self._values(sym.reshape(-1, height, width))

    def _values(self, sym: np.ndarray) -> np.ndarray:
        return ((sym + self.offsets[:, None, None]).astype(np.float32) + self.medians[:, None, None])


def decode_z_compressai(data: bytes, height: int, width: int, cdfs: np.ndarray, lengths: np.ndarray,
                        offsets: np.ndarray, medians: np.ndarray) -> np.ndarray:
    """z_hat (C, H, W) from a z stream in CompressAI's format (container versions 1 to 3)."""
    import warnings

    with warnings.catch_warnings():  # compressai's import runs torch.jit.script, now deprecated
        warnings.simplefilter("ignore", FutureWarning)
        from compressai.ans import RansDecoder

    channels = len(lengths)
    indexes = np.repeat(np.arange(channels, dtype=np.int32), height * width)
    try:
        values = RansDecoder().decode_with_indexes(
            data, indexes.tolist(), cdfs.astype(np.int32).tolist(), lengths.astype(np.int32).tolist(),
            offsets.astype(np.int32).tolist())
    except Exception as exc:
        raise BdcError(f"corrupt file: z stream does not decode ({exc})") from None
    values = np.asarray(values, dtype=np.float32).reshape(channels, height, width)
    return values + medians.astype(np.float32)[:, None, None]
