import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from bdcodec.cli import main

from .conftest import ROOT


@pytest.fixture
def run(tmp_path):
    runner = CliRunner()

    def _run(*args, input=None):
        res = runner.invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)
        return res

    return _run


@pytest.fixture
def small_png(tmp_path):
    px = np.asarray(Image.open(ROOT / "examples" / "kodim23.png").convert("RGB"))[:96, :128]
    p = tmp_path / "small.png"
    Image.fromarray(np.ascontiguousarray(px)).save(p)
    return p


def _one_error_line(res):
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines and all(ln.startswith("bdcodec: error:") for ln in lines), res.stderr
    assert "Traceback" not in res.output


def test_encode_decode_info_round_trip(run, small_png, tmp_path):
    bdc, png = tmp_path / "a.bdc", tmp_path / "a.png"
    res = run("encode", small_png, bdc, "-q", "40", "-v")
    assert res.exit_code == 0 and bdc.exists()
    assert "bytes" in res.stderr and "bpp" in res.stderr
    res = run("decode", bdc, png, "--mode", "fidelity")
    assert res.exit_code == 0
    assert Image.open(png).size == (128, 96)
    res = run("info", bdc)
    assert res.exit_code == 0 and "128 x 96" in res.output and "quality:     40" in res.output
    assert "perceptual mode" in res.output


def test_tune_fidelity_sets_the_default_decode_mode(run, small_png, tmp_path):
    bdc, png, explicit = tmp_path / "a.bdc", tmp_path / "a.png", tmp_path / "b.png"
    assert run("encode", small_png, bdc, "-q", "60", "--tune", "fidelity").exit_code == 0
    assert "fidelity mode" in run("info", bdc).output
    assert run("decode", bdc, png).exit_code == 0
    assert run("decode", bdc, explicit, "--mode", "fidelity").exit_code == 0
    assert png.read_bytes() == explicit.read_bytes()


def test_missing_input_is_one_line_and_exit_1(run, tmp_path):
    res = run("encode", tmp_path / "nope.png", tmp_path / "out.bdc")
    assert res.exit_code == 1
    _one_error_line(res)
    assert not (tmp_path / "out.bdc").exists()


@pytest.mark.parametrize("content", [b"", b"hello, this is text\n", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_unreadable_images_fail_cleanly(run, tmp_path, content):
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    res = run("encode", bad, tmp_path / "out.bdc")
    assert res.exit_code == 1
    _one_error_line(res)
    assert not (tmp_path / "out.bdc").exists()
    assert bad.read_bytes() == content


def test_corrupt_bdc_fails_and_leaves_no_output(run, small_png, tmp_path):
    bdc = tmp_path / "a.bdc"
    run("encode", small_png, bdc)
    data = bytearray(bdc.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bdc.write_bytes(bytes(data))
    res = run("decode", bdc, tmp_path / "a.png")
    assert res.exit_code == 1
    _one_error_line(res)
    assert not (tmp_path / "a.png").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]
    res = run("info", bdc)
    assert res.exit_code == 1


def test_usage_errors_exit_2(run, small_png, tmp_path):
    assert run("encode", small_png).exit_code == 2
    assert run("encode", small_png, tmp_path / "o.bdc", "-q", "150").exit_code == 2
    assert run("decode", "a", "b", "--mode", "pretty").exit_code == 2
    assert run("frobnicate").exit_code == 2


def test_output_into_missing_folder_and_onto_input(run, small_png, tmp_path):
    res = run("encode", small_png, tmp_path / "missing" / "o.bdc")
    assert res.exit_code == 1
    _one_error_line(res)
    before = small_png.read_bytes()
    res = run("encode", small_png, small_png)
    assert res.exit_code == 1 and small_png.read_bytes() == before


def test_batch_reports_each_failure_and_continues(run, small_png, tmp_path):
    good2 = tmp_path / "good2.png"
    Image.open(small_png).transpose(Image.FLIP_LEFT_RIGHT).save(good2)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(small_png.read_bytes()[:200])
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    out = tmp_path / "out"
    res = run("encode", small_png, corrupt, good2, text, empty, "-o", out)
    assert res.exit_code == 1
    assert sorted(p.name for p in out.iterdir()) == ["good2.bdc", "small.bdc"]
    err = res.stderr
    for name in ("corrupt.png", "notes.txt", "empty.png"):
        assert name in err
    assert "3 of 5 files failed" in err
    res = run("decode", out / "small.bdc", out / "good2.bdc", "-o", out, "--mode", "fidelity")
    assert res.exit_code == 0
    assert (out / "small.png").exists() and (out / "good2.png").exists()


def test_grayscale_16bit_alpha_palette_and_exif(run, tmp_path):
    rng = np.random.default_rng(0)
    base = (np.linspace(0, 255, 64)[None, :] * np.ones((48, 1))).astype(np.uint8)
    gray = tmp_path / "gray.png"
    Image.fromarray(base, "L").save(gray)
    g16 = tmp_path / "g16.png"
    Image.fromarray(base.astype(np.uint16) * 257).save(g16)
    rgba = tmp_path / "rgba.png"
    a = np.dstack([base, base, base, np.full_like(base, 128)])
    Image.fromarray(a, "RGBA").save(rgba)
    pal = tmp_path / "pal.gif"
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).convert("P").save(pal)
    exif = tmp_path / "rot.jpg"
    im = Image.fromarray(np.dstack([base] * 3))
    ex = Image.Exif()
    ex[0x0112] = 6  # rotate 90 degrees on display
    im.save(exif, exif=ex.tobytes())
    out = tmp_path / "out"
    res = run("encode", gray, g16, rgba, pal, exif, "-o", out)
    assert res.exit_code == 0, res.output
    assert "alpha channel dropped" in res.stderr
    res = run("decode", *sorted(out.glob("*.bdc")), "-o", out, "--mode", "fidelity")
    assert res.exit_code == 0, res.output
    assert Image.open(out / "gray.png").mode == "L"
    assert Image.open(out / "g16.png").mode == "L"
    assert Image.open(out / "rgba.png").mode == "RGB"
    assert Image.open(out / "rot.png").size == (48, 64)  # EXIF orientation applied


def test_stdin_stdout_and_help_without_torch(small_png, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    png = small_png.read_bytes()
    enc = subprocess.run([sys.executable, "-m", "bdcodec", "encode", "-", "-", "-q", "30"], input=png,
                         capture_output=True, env=env, timeout=300)
    assert enc.returncode == 0 and enc.stdout[:3] == b"BDC"
    dec = subprocess.run([sys.executable, "-m", "bdcodec", "decode", "-", "-", "--mode", "fidelity"],
                         input=enc.stdout, capture_output=True, env=env, timeout=300)
    assert dec.returncode == 0 and dec.stdout[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run([sys.executable, "-m", "bdcodec", "decode", "-", str(tmp_path / "x.png")],
                         input=b"garbage", capture_output=True, env=env, timeout=300)
    assert bad.returncode == 1 and bad.stderr.decode().startswith("bdcodec: error:")
    assert b"Traceback" not in bad.stderr
    probe = ("import sys; from bdcodec.cli import main\n"
             "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
             "assert 'torch' not in sys.modules and 'compressai' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=60).returncode == 0


def test_bad_weights_and_device_fail_in_one_line(run, small_png, tmp_path):
    res = run("encode", small_png, tmp_path / "o.bdc", "--weights", tmp_path / "none.safetensors")
    assert res.exit_code == 1
    _one_error_line(res)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    res = run("decode", small_png, tmp_path / "o.png", "--weights", junk)
    assert res.exit_code == 1
    _one_error_line(res)
    import torch

    if not torch.cuda.is_available():
        res = run("encode", small_png, tmp_path / "o.bdc", "--device", "cuda")
        assert res.exit_code == 1
        _one_error_line(res)


def test_ctrl_c_in_a_batch_leaves_no_partial_files(tmp_path):
    import signal
    import time

    srcs = [tmp_path / f"im{i}.png" for i in range(40)]
    px = np.asarray(Image.open(ROOT / "examples" / "kodim23.png").convert("RGB"))
    for i, p in enumerate(srcs):
        Image.fromarray(np.ascontiguousarray(np.roll(px, i, axis=1))).save(p)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "bdcodec", "encode", *map(str, srcs), "-o", str(out)],
                            stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and not (out.exists() and any(out.glob("*.bdc"))):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert b"Traceback" not in err
    assert not [p for p in out.iterdir() if not p.name.endswith(".bdc")]
    assert 0 < len(list(out.glob("*.bdc"))) < len(srcs)
    for p in out.glob("*.bdc"):
        assert p.read_bytes()[:3] == b"BDC"
