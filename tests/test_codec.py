import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from bdcodec import container
from bdcodec.metrics import psnr
from bdcodec.errors import BdcError
from bdcodec.model import pad_to

from .conftest import EXAMPLES

# Bands measured from the shipped weights on examples/ (fidelity mode), with a margin.
BANDS = {  # quality: (bpp min, bpp max, PSNR min)
    20: (0.12, 0.21, 29.6),
    75: (0.38, 0.76, 34.0),
}


@pytest.mark.parametrize("quality", sorted(BANDS))
def test_round_trip_on_examples_within_measured_bands(codec, quality):
    lo, hi, min_psnr = BANDS[quality]
    for path in EXAMPLES:
        px = np.asarray(Image.open(path).convert("RGB"))
        data = codec.encode(px, quality=quality)
        out, header = codec.decode(data, mode="fidelity")
        bpp = 8 * len(data) / (px.shape[0] * px.shape[1])
        assert out.shape == px.shape and out.dtype == np.uint8
        assert lo <= bpp <= hi, (path.name, bpp)
        assert psnr(px, out) >= min_psnr, (path.name, psnr(px, out))


def test_higher_quality_means_more_bits_and_less_error(codec, kodim23):
    sizes, errors = [], []
    for q in (0, 50, 100):
        data = codec.encode(kodim23, quality=q)
        out, _ = codec.decode(data, mode="fidelity")
        sizes.append(len(data))
        errors.append(-psnr(kodim23, out))
    assert sizes == sorted(sizes) and errors == sorted(errors, reverse=True)


@pytest.fixture(scope="module")
def trainable_model():
    from bdcodec.weights import load_model

    return load_model(trainable=True)[0]


@pytest.fixture(scope="module")
def compressai_bottleneck(trainable_model):
    return trainable_model.entropy_bottleneck


def test_file_size_matches_the_estimated_rate(codec, kodim23, trainable_model):
    model = trainable_model
    for q in (25.0, 80.0):
        data = codec.encode(kodim23, quality=q)
        x = pad_to(torch.from_numpy(kodim23.copy()).permute(2, 0, 1)[None].float() / 255, 64)
        with torch.no_grad():
            out = model(x, codec.plan(q)[0])
        est_bits = sum(-torch.log2(lik).sum() for lik in out["likelihoods"].values()).item()
        header, streams = container.unpack(data)
        payload = len(streams.z) + len(streams.y) + len(streams.escapes)
        assert abs(payload - est_bits / 8) <= 0.02 * est_bits / 8 + 64, (payload, est_bits / 8)
        assert codec.latent_bytes(x, header.level) == payload  # what training validation reports


def test_encode_is_deterministic_and_decodes_do_not_depend_on_threads(codec, kodim23):
    """The entropy path runs on one thread; the pixel networks on ``threads`` (see codec.py)."""
    from bdcodec.codec import Codec

    one = Codec(device="cpu", threads=1)
    two = Codec(device="cpu", threads=2)
    n = torch.get_num_threads()
    a = one.encode(kodim23, quality=60)
    assert torch.get_num_threads() == n  # the caller's setting is restored
    assert one.encode(kodim23, quality=60) == a
    assert two.encode(kodim23, quality=60) == a
    assert np.array_equal(one.decode(a, mode="fidelity")[0], two.decode(a, mode="fidelity")[0])
    p1, _ = one.decode(a, mode="perceptual", steps=2)
    assert np.array_equal(one.decode(a, mode="perceptual", steps=2)[0], p1)
    p2, _ = two.decode(a, mode="perceptual", steps=2)
    assert np.array_equal(p1, p2)
    with pytest.raises(BdcError, match="threads"):
        Codec(device="cpu", threads=0)


def test_latent_bands_are_whole_windows_and_follow_the_image_size():
    from bdcodec.codec import BAND_ALIGN, latent_bands

    assert latent_bands(32, 48) == [(0, 32)]  # Kodak: one band
    assert latent_bands(128, 188) == [(0, 64), (64, 128)]  # 3000x2000
    assert len(latent_bands(250, 375)) == 4  # 24 megapixels: bands of at least 32 rows
    for h, w in [(1, 1), (7, 3000), (64, 10000), (333, 444), (1000, 1000), (4096, 4096)]:
        bands = latent_bands(h, w)
        assert bands[0][0] == 0 and bands[-1][1] == h and all(r1 > r0 for r0, r1 in bands)
        assert all(a[1] == b[0] and b[0] % BAND_ALIGN == 0 for a, b in zip(bands, bands[1:]))
        assert len(bands) == 1 or (h * w) // len(bands) >= 8192
    assert latent_bands(32, 48, 5) is None  # five bands of 8 rows leave the last without rows


def test_banded_and_tiled_files_do_not_depend_on_threads(kodim23, monkeypatch):
    """Bands of the latent and tiles of the transforms run in parallel, each on one thread (effort 0 here:
    fitted files on bands are checked in test_effort)."""
    import bdcodec.codec as mod
    from bdcodec.codec import Codec

    one = Codec(device="cpu", threads=1)
    whole = one.encode(kodim23, quality=60, mode="fidelity", effort=0)
    monkeypatch.setattr(mod, "BAND_AREA", 256)
    monkeypatch.setattr(mod, "BAND_MIN_ROWS", 8)
    monkeypatch.setattr(mod, "TILE", 256)
    two = Codec(device="cpu", threads=2)
    data = one.encode(kodim23, quality=60, mode="fidelity", effort=0)
    assert two.encode(kodim23, quality=60, mode="fidelity", effort=0) == data
    header, streams = container.unpack(data)
    assert len(streams.bands) == 4 and header.version == container.VERSION
    out, _ = two.decode(data)
    assert np.array_equal(one.decode(data)[0], out)
    # each band's context stops at its edges: some rate (here three edges in 32 latent rows, 6-7 %;
    # one edge in 128 rows of a 3000x2000 photo costs 0.3 % of its latent), the same picture quality
    assert len(whole) < len(data) < 1.1 * len(whole)
    assert abs(psnr(kodim23, out) - psnr(kodim23, one.decode(whole)[0])) < 0.1
    # a band count that leaves a band without latent rows is refused
    crowded = dataclasses.replace(streams, bands=((0, 0),) * 30 + ((len(streams.escapes), len(streams.y)),))
    with pytest.raises(BdcError, match="31 latent bands for 32 latent rows"):
        two.decode(container.pack(header, crowded))
    # bands swapped: every symbol still decodes, but not to what was coded
    swapped = dataclasses.replace(streams, y=b"".join(y for _, y in streams.band_streams()[::-1]),
                                  bands=tuple((e, y) for e, y in streams.bands[::-1]))
    with pytest.raises(BdcError):
        two.decode(container.pack(header, swapped))


def test_bf16_analysis_keeps_the_file_as_good_as_fp32(codec, kodim23, monkeypatch):
    """g_a runs under bf16 where the CPU has it natively; it moves the latent before rounding, not after."""
    from bdcodec.effort import native_bf16

    assert codec.analysis_bf16 == native_bf16("cpu")
    sizes, scores, latents = [], [], []
    for flag in (False, True):
        monkeypatch.setattr(codec, "analysis_bf16", flag)
        latents.append(codec._analyse(codec._tensor(kodim23)))
        for quality in (20, 75):
            data = codec.encode(kodim23, quality=quality)
            sizes.append(len(data))
            scores.append(psnr(kodim23, codec.decode(data, mode="fidelity")[0]))
    assert not torch.equal(*latents)  # the flag is what decides g_a's precision
    for k in range(2):
        assert sizes[2 + k] == pytest.approx(sizes[k], rel=0.01) and abs(scores[2 + k] - scores[k]) < 0.05


def test_bf16_synthesis_moves_pixels_by_a_fraction_of_a_grey_level(codec, kodim23, monkeypatch):
    """g_s runs under bf16 (its last convolution in fp32) where the CPU has it natively, on both sides of
    the refinement layer: files made and decoded alike are as good as in fp32, and across within 0.1 dB.
    The texture branch and the denoiser of a perceptual decode follow the same flag."""
    from bdcodec.effort import native_bf16

    assert codec.synthesis_bf16 == native_bf16("cpu")
    files, decodes = {}, {}
    for made in (False, True):
        monkeypatch.setattr(codec, "synthesis_bf16", made)
        files[made] = codec.encode(kodim23, quality=85)
    for made in (False, True):
        for flag in (False, True):
            monkeypatch.setattr(codec, "synthesis_bf16", flag)
            decodes[made, flag] = codec.decode(files[made], mode="fidelity")[0]
    diff = np.abs(decodes[False, False].astype(int) - decodes[False, True])
    assert diff.any() and diff.max() <= 4 and diff.mean() < 0.3  # the flag decides g_s's precision
    score = {key: psnr(kodim23, pixels) for key, pixels in decodes.items()}
    assert abs(score[True, True] - score[False, False]) < 0.03
    assert min(score[True, False], score[False, True]) > score[False, False] - 0.1
    assert len(files[True]) == pytest.approx(len(files[False]), rel=0.01)
    low = codec.encode(kodim23, quality=0)
    perceptual = []
    for flag in (False, True):
        monkeypatch.setattr(codec, "synthesis_bf16", flag)
        perceptual.append(codec.decode(low, mode="perceptual", steps=2)[0])
    diff = np.abs(perceptual[0].astype(int) - perceptual[1])
    assert diff.any() and diff.mean() < 0.3
    assert abs(psnr(kodim23, perceptual[0]) - psnr(kodim23, perceptual[1])) < 0.03


@pytest.mark.parametrize("size", [(1, 1), (17, 33), (513, 257)])
def test_odd_sizes_round_trip_to_the_same_size(codec, size):
    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    data = codec.encode(px, quality=50)
    out, header = codec.decode(data, mode="fidelity")
    assert out.shape == px.shape and (header.height, header.width) == size
    out, _ = codec.decode(data, mode="perceptual", steps=2)
    assert out.shape == px.shape


def test_perceptual_decode_is_reproducible_per_seed(codec, kodim23):
    crop = np.ascontiguousarray(kodim23[:128, :192])
    data = codec.encode(crop, quality=30)
    a, _ = codec.decode(data, steps=3, seed=1)
    b, _ = codec.decode(data, steps=3, seed=1)
    c, _ = codec.decode(data, steps=3, seed=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_target_bpp_stays_within_budget(codec, kodim23):
    for target in (0.2, 0.3):
        data = codec.encode(kodim23, target_bpp=target)
        bpp = 8 * len(data) / (kodim23.shape[0] * kodim23.shape[1])
        assert bpp <= target
        assert bpp >= 0.6 * target  # the search found a quality near the budget
    # a budget below the smallest file gives the lowest quality, one above the largest the highest
    data = codec.encode(kodim23, target_bpp=0.0001)
    assert container.unpack(data)[0].quality == 0
    data = codec.encode(kodim23, target_bpp=24.0)
    assert container.unpack(data)[0].quality == 100


def test_refinement_layer_above_refine_from_lifts_fidelity(codec, kodim23):
    from bdcodec.codec import REFINE_FROM

    crop = np.ascontiguousarray(kodim23[:192, :256])
    base = codec.encode(crop, quality=REFINE_FROM)
    refined = codec.encode(crop, quality=80)
    assert not container.unpack(base)[1].refine and container.unpack(refined)[1].refine
    # the refined file carries the same latent as the base one
    assert container.unpack(refined)[1].y == container.unpack(base)[1].y
    out_base, _ = codec.decode(base, mode="fidelity")
    out, _ = codec.decode(refined, mode="fidelity")
    assert psnr(crop, out) > psnr(crop, out_base) + 1.5
    # perceptual decoding stays consistent with the refinement: its residual quantizes to the file's
    perc, _ = codec.decode(refined, mode="perceptual", steps=2)
    assert psnr(crop, perc) > psnr(crop, out_base) + 0.5


def _repacked(data: bytes, **changes) -> bytes:

    header, streams = container.unpack(data)
    return container.pack(dataclasses.replace(header, **changes), streams)


def _legacy(codec, eb, data: bytes, **changes) -> bytes:
    """``data`` as an earlier container version writes it: z in CompressAI's rANS format."""
    import math

    header, streams = container.unpack(data)
    zh, zw = math.ceil(header.height / 64), math.ceil(header.width / 64)
    z_hat = torch.from_numpy(codec.hyper.decode(streams.z, zh, zw))[None]
    z = eb.compress(z_hat)[0]
    return container.pack(dataclasses.replace(header, **changes), dataclasses.replace(streams, z=z))


def test_files_with_compressai_z_streams_decode_the_same(codec, kodim23, compressai_bottleneck):
    crop = np.ascontiguousarray(kodim23[:128, :192])
    data = codec.encode(crop, quality=30)
    old = _legacy(codec, compressai_bottleneck, data, version=3)
    assert old != data
    for mode in ("fidelity", "perceptual"):
        want, _ = codec.decode(data, mode=mode, steps=2)
        out, header = codec.decode(old, mode=mode, steps=2)
        assert header.version == 3 and np.array_equal(out, want)


def test_earlier_versions_take_the_rate_level_from_the_quality(codec, kodim23, compressai_bottleneck):
    from bdcodec.codec import REFINE_FROM

    crop = np.ascontiguousarray(kodim23[:64, :128])
    data = codec.encode(crop, quality=REFINE_FROM)
    assert container.unpack(data)[0].level == 3.0  # 0.6 of the model's 5 levels
    # version 2 mapped quality 50, version 1 quality 60, to that same level
    v2 = _legacy(codec, compressai_bottleneck, data, version=2, level=None)
    v1 = _legacy(codec, compressai_bottleneck, data, version=1, level=None, quality=60.0)
    want, _ = codec.decode(data, mode="fidelity")
    for old in (v2, v1):
        out, _ = codec.decode(old, mode="fidelity")
        assert np.array_equal(out, want)
    # the level in a version-3 file is what the decoder uses
    other, _ = codec.decode(_repacked(data, level=2.0), mode="fidelity")
    assert not np.array_equal(other, want)
    with pytest.raises(BdcError, match="rate level 5.1 beyond"):
        codec.decode(_repacked(data, level=5.1))


def test_fidelity_tuning_moves_bits_into_the_refinement_layer(codec, kodim23):
    perc = codec.encode(kodim23, quality=40)
    fid = codec.encode(kodim23, quality=40, mode="fidelity")
    hp, sp = container.unpack(perc)
    hf, sf = container.unpack(fid)
    assert (hp.mode, hf.mode) == ("perceptual", "fidelity")
    assert hf.level < hp.level and len(sf.y) < len(sp.y)
    assert not sp.refine and sf.refine
    # a file made for fidelity decodes in fidelity mode by default
    default, header = codec.decode(fid)
    explicit, _ = codec.decode(fid, mode="fidelity")
    assert header.mode == "fidelity" and np.array_equal(default, explicit)
    assert psnr(kodim23, default) > 25
    with pytest.raises(BdcError, match="unknown mode"):
        codec.encode(kodim23, quality=40, mode="sharp")


def test_file_from_other_weights_is_refused_by_id(codec, kodim23):
    data = codec.encode(np.ascontiguousarray(kodim23[:64, :64]), quality=50)
    with pytest.raises(BdcError, match="weights 00000000"):
        codec.decode(_repacked(data, weights_id="00000000"))


def test_every_single_byte_flip_is_detected_or_harmless(codec):
    rng = np.random.default_rng(3)
    px = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    data = codec.encode(px, quality=40)
    ref, _ = codec.decode(data, mode="fidelity")
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x5A
        try:
            out, _ = codec.decode(bytes(bad), mode="fidelity")
        except BdcError:
            continue
        assert np.array_equal(out, ref), i


def test_tiled_transforms_match_untiled(codec, kodim23, monkeypatch):
    import bdcodec.codec as mod

    data = codec.encode(kodim23, quality=60)
    ref, _ = codec.decode(data, mode="fidelity")
    monkeypatch.setattr(mod, "TILE", 256)
    tiled = codec.encode(kodim23, quality=60)
    out, _ = codec.decode(tiled, mode="fidelity")
    assert abs(len(tiled) - len(data)) <= 0.01 * len(data)
    assert abs(psnr(kodim23, out) - psnr(kodim23, ref)) < 0.1


@pytest.mark.parametrize("mode", ["fidelity", "perceptual"])
def test_images_smaller_than_a_latent_position_come_back_faithful(codec, kodim23, mode):
    """A 1x1 (200, 30, 40) decoded as (185, 64, 51); tiny images now get a fine refinement."""
    red = np.full((1, 1, 3), (200, 30, 40), np.uint8)
    out, _ = codec.decode(codec.encode(red, quality=0, mode=mode))
    assert np.abs(out.astype(int) - red).max() <= 3, out[0, 0]
    crop = np.ascontiguousarray(kodim23[200:215, 300:315])  # 15x15, textured
    data = codec.encode(crop, quality=0, mode=mode)
    out, _ = codec.decode(data)
    assert np.sqrt(np.mean((out.astype(float) - crop) ** 2)) < 2.5 and len(data) < 400


def test_progress_counts_tiles_and_diffusion_steps(codec, kodim23):
    """Encode and decode report their units of work to a tqdm-like bar."""

    class Bar:
        total, n = None, 0

        def update(self, k):
            self.n += k

    crop = np.ascontiguousarray(kodim23[:64, :64])
    enc = Bar()
    data = codec.encode(crop, quality=20, progress=enc)
    assert enc.n == enc.total == 1  # one g_a tile
    dec = Bar()
    codec.decode(data, mode="perceptual", steps=3, progress=dec)
    assert dec.n == dec.total == 1 + 3  # one g_s tile and three diffusion steps
