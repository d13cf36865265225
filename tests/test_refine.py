import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bdcodec import refine
from bdcodec.errors import BdcError


def _residual(rng, h, w, scale=6.0):
    r = rng.laplace(0, scale, (h, w, 3))
    r[: h // 2] *= 3  # a busier half, so the activity classes matter
    return r


def _activity(rng, h, w):
    by, bx = -(-h // 8), -(-w // 8)
    return np.repeat(np.arange(by) * 40, bx) + rng.integers(0, 30, by * bx)


@pytest.mark.parametrize("size", [(1, 1), (17, 33), (96, 128)])
@pytest.mark.parametrize("step", [1.0, 7.5, 40.0])
def test_round_trip_is_exact(size, step):
    rng = np.random.default_rng(size[0] * 1000 + int(step))
    r = _residual(rng, *size)
    act = _activity(rng, *size)
    payload, sent = refine.encode(r, step, act)
    got = refine.decode(payload, *size, act)
    assert np.array_equal(got.q, sent.q)
    assert np.array_equal(got.steps, sent.steps)
    assert refine.reconstruct(got).shape == r.shape


def test_error_shrinks_with_the_step_and_matches_the_quantizer():
    rng = np.random.default_rng(1)
    r = _residual(rng, 64, 80)
    act = _activity(rng, 64, 80)
    errors, sizes = [], []
    for step in (32.0, 8.0, 2.0):
        payload, _ = refine.encode(r, step, act)
        rec = refine.reconstruct(refine.decode(payload, 64, 80, act))
        errors.append(np.sqrt(np.mean((rec - r) ** 2)))
        sizes.append(len(payload))
    assert errors == sorted(errors, reverse=True) and sizes == sorted(sizes)
    # at step 2 the error is the quantizer's, a fraction of the step (chroma steps are 1.5x)
    assert errors[-1] < 2.0


def test_large_values_take_the_escape_path():
    r = np.zeros((8, 8, 3))
    r[:, :, :] = 255.0  # DC far beyond the literal alphabet at step 1
    act = np.zeros(1, dtype=np.int64)
    payload, sent = refine.encode(r, 1.0, act)
    assert np.abs(sent.q).max() > refine.MAG
    got = refine.decode(payload, 8, 8, act)
    assert np.array_equal(got.q, sent.q)
    assert np.allclose(refine.reconstruct(got), r, atol=1.0)


def test_projection_stays_in_the_coded_cells_and_keeps_detail():
    rng = np.random.default_rng(2)
    r = _residual(rng, 48, 64)
    r[:, :32] *= 0.05  # a flat half, whose blocks code almost nothing
    act = _activity(rng, 48, 64)
    payload, _ = refine.encode(r, 12.0, act)
    ref = refine.decode(payload, 48, 64, act)
    proposal = r + rng.normal(0, 3, r.shape)
    for gate in (2, 65):  # 65: no block is described by the file, all keep the proposal's detail
        out = refine.project(ref, proposal, gate=gate)
        coef = refine._forward(out)
        assert np.array_equal(refine.quantize(coef, ref.steps), ref.q)
        # the projection moves the proposal no further than the file's reconstruction is from it
        assert np.linalg.norm(out - proposal) <= np.linalg.norm(refine.reconstruct(ref) - proposal)
    # blocks with two or more coded luma coefficients are the file's; the others keep the proposal's detail
    out = refine._forward(refine.project(ref, proposal, gate=2)) / ref.steps[:, None, None]
    described = (ref.q[0] != 0).sum(-1) >= 2
    assert described.any() and (~described).any()
    assert np.allclose(out[:, described], ref.q[:, described])
    assert not np.allclose(out[:, ~described], ref.q[:, ~described])


def test_encoding_is_deterministic():
    rng = np.random.default_rng(3)
    r = _residual(rng, 40, 56)
    act = _activity(rng, 40, 56)
    assert refine.encode(r, 6.0, act)[0] == refine.encode(r.copy(), 6.0, act.copy())[0]


@pytest.mark.parametrize("rdo", [0.0, refine.RDO_PRICE])
def test_large_layers_are_coded_and_chosen_in_parts(rdo, monkeypatch):
    """Large images code their symbols and choose their RDO levels a part at a time (bounded memory):
    the payload is the same bytes as in one go, and it decodes the same."""
    rng = np.random.default_rng(7)
    r = _residual(rng, 64, 96, scale=12.0)
    act = _activity(rng, 64, 96)
    weight = rng.random(-(-64 // 8) * -(-96 // 8)) + 0.5
    whole, sent = refine.encode(r, 3.0, act, rdo=rdo, block_weight=weight if rdo else None)
    monkeypatch.setattr(refine, "CODE_PART", 1000)
    monkeypatch.setattr(refine, "RDO_BLOCKS", 7)
    parts, _ = refine.encode(r, 3.0, act, rdo=rdo, block_weight=weight if rdo else None)
    assert parts == whole
    assert np.count_nonzero(sent.q) > 2 * refine.CODE_PART  # several parts of magnitudes, and of significance
    assert np.array_equal(refine.decode(whole, 64, 96, act).q, sent.q)


def test_malformed_payloads_are_refused():
    rng = np.random.default_rng(4)
    act = _activity(rng, 32, 32)
    payload, _ = refine.encode(_residual(rng, 32, 32), 4.0, act)
    for bad, msg in [(b"", "truncated"), (payload[:3], "truncated"), (b"\x00\x00" + payload[2:], "invalid header"),
                     (payload[:4] + b"\x01", "truncated"), (payload + b"\x00", "whole words")]:
        with pytest.raises(BdcError, match=msg):
            refine.decode(bad, 32, 32, act)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_payloads_decode_or_fail_cleanly(data):
    rng = np.random.default_rng(5)
    act = _activity(rng, 24, 40)
    payload = bytearray(refine.encode(_residual(rng, 24, 40), 5.0, act)[0])
    i = data.draw(st.integers(0, len(payload) - 1))
    payload[i] ^= data.draw(st.integers(1, 255))
    try:
        got = refine.decode(bytes(payload), 24, 40, act)
    except BdcError:
        return
    assert got.q.shape == (3, 15, 64)
