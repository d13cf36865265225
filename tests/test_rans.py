import numpy as np
import pytest

from bdcodec.errors import BdcError
from bdcodec.rans import ALPHABET, PassDecoder, PassEncoder


def _passes(rng):
    out = []
    for n in (0, 17, 500, 3000):
        idx = rng.integers(0, 64, n)
        r = np.round(rng.normal(0, 1, n) * (1 + idx / 4)).astype(np.int64)
        out.append((r, idx))
    # outliers beyond the alphabet take the escape path
    out[2][0][:3] = [ALPHABET, -ALPHABET - 1000, 10**6]
    return out


def test_passes_round_trip_with_escapes():
    rng = np.random.default_rng(0)
    passes = _passes(rng)
    enc = PassEncoder()
    for r, idx in passes:
        assert np.array_equal(enc.add(r, idx), r)
    y, esc, crc = enc.finish()
    assert len(y) % 4 == 0 and len(esc) > 0
    dec = PassDecoder(y, esc)
    for r, idx in passes:
        assert np.array_equal(dec.next(idx), r)
    dec.finish(crc)


def test_desync_is_reported_not_silent():
    rng = np.random.default_rng(1)
    passes = _passes(rng)
    enc = PassEncoder()
    for r, idx in passes:
        enc.add(r, idx)
    y, esc, crc = enc.finish()
    dec = PassDecoder(y, esc)
    with pytest.raises(BdcError):
        for r, idx in passes:
            dec.next(np.clip(idx + 1, 0, 63))  # decoder with different scales
        dec.finish(crc)


def test_rate_is_close_to_the_information_content():
    from scipy.stats import norm

    from bdcodec.rans import _STDS

    rng = np.random.default_rng(2)
    idx = rng.integers(10, 40, 20000)
    r = np.round(rng.normal(0, _STDS[idx])).astype(np.int64)
    enc = PassEncoder()
    enc.add(r, idx)
    y, _, _ = enc.finish()
    p = norm.cdf((r + 0.5) / _STDS[idx]) - norm.cdf((r - 0.5) / _STDS[idx])
    ideal = -np.log2(p).sum() / 8
    assert len(y) <= ideal * 1.01 + 8
