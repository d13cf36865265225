import dataclasses
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bdcodec.container import MAGIC, Header, Streams, describe, pack, unpack
from bdcodec.errors import BdcError

HEADER = Header(width=768, height=512, quality=37.5, weights_id="0a1b2c3d", gray=False, mode="perceptual",
                steps=8, seed=7, level=1.48)
STREAMS = Streams(z=b"zzzz" * 10, escapes=b"\x05", y=b"\x01\x02\x03\x04" * 50, symbol_crc=0xDEADBEEF)


def test_round_trip_and_small_overhead():
    data = pack(HEADER, STREAMS)
    header, streams = unpack(data)
    assert header == HEADER and streams == STREAMS
    overhead = len(data) - len(STREAMS.z) - len(STREAMS.y) - len(STREAMS.escapes)
    assert overhead <= 30
    text = describe(data)
    assert "768 x 512" in text and "0a1b2c3d" in text and "quality:     37.5 (latent rate level 1.48)" in text


def test_gray_and_fidelity_flags_round_trip():
    h = Header(1, 1, 100.0, "ffffffff", gray=True, mode="fidelity", steps=1, seed=2**32 - 1, level=5.1)
    assert unpack(pack(h, STREAMS))[0] == h


def test_refinement_layer_round_trips_and_is_described():
    streams = Streams(z=b"zz", escapes=b"", y=b"\x01\x02\x03\x04", symbol_crc=1, refine=b"\x78\x00\x18\x01rest")
    data = pack(HEADER, streams)
    assert unpack(data) == (HEADER, streams)
    assert "luma step 7.5" in describe(data)
    assert "refinement:  none" in describe(pack(HEADER, STREAMS))


def test_earlier_versions_round_trip_without_a_rate_level():
    for version, streams in ((1, STREAMS), (2, dataclasses.replace(STREAMS, refine=b"\x78\x00r"))):
        header = dataclasses.replace(HEADER, version=version, level=None)
        data = pack(header, streams)
        assert data[3] == version and len(data) == len(pack(dataclasses.replace(HEADER, version=4), streams)) - 1
        assert unpack(data) == (header, streams)
        assert "rate level" not in describe(data)
    with pytest.raises(ValueError, match="refinement"):
        pack(dataclasses.replace(HEADER, version=1, level=None), dataclasses.replace(STREAMS, refine=b"r"))
    with pytest.raises(ValueError, match="rate level"):
        pack(dataclasses.replace(HEADER, level=None), STREAMS)
    with pytest.raises(ValueError, match="rate level"):
        pack(dataclasses.replace(HEADER, level=1.234), STREAMS)  # not on the 1/50 grid
    body = bytearray(pack(dataclasses.replace(HEADER, version=1, level=None), STREAMS)[:-4])
    body[4] |= 4  # the refinement flag does not exist in version 1
    with pytest.raises(BdcError, match="unknown flags"):
        unpack(_resealed(bytes(body)))


def _resealed(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def test_latent_bands_round_trip_and_are_checked():
    banded = dataclasses.replace(STREAMS, bands=((1, 80), (0, 40), (0, 80)))
    data = pack(HEADER, banded)
    assert len(data) == len(pack(HEADER, STREAMS)) + 4  # n, then two varints for each band but the last
    header, streams = unpack(data)
    assert streams == banded and "3 latent bands" in describe(data)
    assert [len(e) + len(y) for e, y in streams.band_streams()] == [81, 40, 80]
    assert unpack(pack(HEADER, STREAMS))[1].band_streams() == [(STREAMS.escapes, STREAMS.y)]
    for bands, msg in [(((1, 80), (0, 80)), "add up"), (((1, 2), (0, 198)), "whole words"), ((), None)]:
        if msg:
            with pytest.raises(ValueError, match=msg):
                pack(HEADER, dataclasses.replace(STREAMS, bands=bands))
    with pytest.raises(ValueError, match="version 5"):
        pack(dataclasses.replace(HEADER, version=4), banded)
    old = pack(dataclasses.replace(HEADER, version=4), STREAMS)  # no band table before version 5
    assert len(old) == len(pack(HEADER, STREAMS)) - 1 and unpack(old)[1].bands == ()
    # a band table that claims more than the streams hold, resealed so that only the sizes are wrong
    body = bytearray(data[:-4])
    pos = body.index(bytes([3, 1, 80, 0, 40]))
    body[pos + 2] = 0x7E  # the first band's y stream: 126 bytes, not whole words
    with pytest.raises(BdcError, match="band sizes"):
        unpack(_resealed(bytes(body)))
    body[pos + 2], body[pos + 4] = 0x7C, 0x7C  # 124 + 124 bytes of a 200-byte y stream
    with pytest.raises(BdcError, match="band sizes"):
        unpack(_resealed(bytes(body)))
    body[pos] = 0
    with pytest.raises(BdcError, match="no latent bands"):
        unpack(_resealed(bytes(body)))


def test_refuses_foreign_truncated_and_corrupt_data():
    data = pack(HEADER, STREAMS)
    for bad, msg in [(b"", "empty file"), (b"PNG\x89....", "bad magic"), (data[:10], "truncated"),
                     (data[:-1], "truncated file: checksum"), (data[:3] + b"\x09" + data[4:], "version")]:
        with pytest.raises(BdcError, match=msg):
            unpack(bad)
    flipped = bytearray(data)
    flipped[30] ^= 0x10
    with pytest.raises(BdcError, match="checksum"):
        unpack(bytes(flipped))


def test_huge_dimensions_refused_before_any_allocation():
    h = Header(100000, 100000, 50.0, "00000000", level=0.0)
    data = pack(h, STREAMS)
    with pytest.raises(BdcError, match="above the limit"):
        unpack(data, max_pixels=200_000_000)
    # a length field that claims more bytes than the file holds
    body = bytearray(pack(HEADER, STREAMS)[:-4])
    pos = body.index(b"zzzz") - 1
    body[pos] = 0x7F
    with pytest.raises(BdcError):
        unpack(_resealed(bytes(body)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutations_fail_cleanly(data):
    """Mutated, truncated or extended files either parse or raise BdcError, nothing else."""
    streams = data.draw(st.sampled_from([STREAMS, dataclasses.replace(STREAMS, bands=((1, 80), (0, 40), (0, 80)))]))
    blob = bytearray(pack(HEADER, streams))
    op = data.draw(st.sampled_from(["flip", "truncate", "extend", "reseal"]))
    if op == "flip":
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] ^= data.draw(st.integers(1, 255))
    elif op == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif op == "extend":
        blob += data.draw(st.binary(min_size=1, max_size=64))
    else:  # mutate inside, then fix the CRC so the parser's field checks are exercised
        i = data.draw(st.integers(4, len(blob) - 5))
        blob[i] = data.draw(st.integers(0, 255))
        blob = bytearray(_resealed(bytes(blob[:-4])))
    try:
        unpack(bytes(blob), max_pixels=10**8)
    except BdcError:
        pass


def test_magic_is_stable():
    assert MAGIC == b"BDC"
