import dataclasses
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from bdcodec.cli import main

from .conftest import EXAMPLES, ROOT


@pytest.fixture
def run(tmp_path):
    runner = CliRunner()

    def _run(*args, input=None):
        res = runner.invoke(main, [str(a) for a in args], input=input, catch_exceptions=False, prog_name="bdcodec")
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
    assert "quality 40, effort 0," in res.stderr  # perceptual: effort 0 by default
    res = run("decode", bdc, png, "--mode", "fidelity", "-v")
    assert res.exit_code == 0 and "bpp, fidelity," in res.stderr
    res = run("decode", bdc, tmp_path / "p.png", "--steps", "2", "-v")  # the file's mode: perceptual
    assert res.exit_code == 0 and "bpp, perceptual (2 steps)," in res.stderr
    res = run("decode", bdc, png, "-f", "--mode", "fidelity", "--seed", "3")
    assert res.exit_code == 0 and "--seed steers the diffusion decoder: --mode fidelity does not use it" in res.stderr
    from bdcodec.codec import DEFAULT_TEMPERATURE

    assert f"(0: none; default {DEFAULT_TEMPERATURE:g})" in " ".join(run("decode", "--help").output.split())
    res = run("decode", bdc, png, "-f", "--mode", "fidelity", "--steps", "2", "--temperature", "1", "--seed", "3")
    assert "--steps, --temperature and --seed steer the diffusion decoder: --mode fidelity does not use them" \
        in res.stderr
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
    # the sampler's options do nothing to such a file: said once, however many files
    (tmp_path / "c.bdc").write_bytes(bdc.read_bytes())
    res = run("decode", bdc, tmp_path / "c.bdc", "-o", tmp_path / "out", "--temperature", "1", "--seed", "2")
    assert res.exit_code == 0 and res.stderr.count("warning") == 1
    assert "a.bdc was encoded with --tune fidelity and decodes without the diffusion decoder: --temperature and " \
           "--seed are not used" in res.stderr
    assert (tmp_path / "out" / "a.png").read_bytes() == png.read_bytes()
    assert "warning" not in run("decode", bdc, explicit, "-f", "--mode", "perceptual", "--seed", "2").stderr


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


def test_a_stopped_bench_says_whether_it_measured_anything(run, tmp_path, monkeypatch):
    import bdcodec.bench

    def stop(folder, out_dir, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bdcodec.bench, "run_bench", stop)
    res = run("bench", tmp_path, "--out", tmp_path / "b", "--no-speed")
    assert res.exit_code == 130 and "stopped before any point was measured" in res.stderr
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "points.jsonl").write_text('{"bench": {}}\n')  # the bench's own line only
    assert "stopped before any point" in run("bench", tmp_path, "--out", tmp_path / "b", "--no-speed").stderr
    (tmp_path / "b" / "points.jsonl").write_text('{"bench": {}}\n{"codec": "jpeg"}\n')
    res = run("bench", tmp_path, "--out", tmp_path / "b", "--no-speed")
    assert res.exit_code == 130 and "the same command with --resume goes on from there" in res.stderr


def test_usage_errors_exit_2(run, small_png, tmp_path):
    for args, where in (((small_png,), "encode"), ((small_png, tmp_path / "o.bdc", "-q", "150"), "encode"),
                        (("a", "b", "--mode", "pretty"), "decode"), (("-o",), "encode")):
        res = run("decode" if where == "decode" else "encode", *args)
        assert res.exit_code == 2 and len(res.stderr.splitlines()) == 1, res.stderr  # not click's usage block
        assert res.stderr.startswith(f"bdcodec {where}: error: ") and f"'bdcodec {where} --help'" in res.stderr
    assert run("frobnicate").exit_code == 2
    for cmd, out in (("encode", "o.png"), ("decode", "o.bdc")):  # IN and OUT swapped, most likely
        res = run(cmd, small_png, tmp_path / out)
        assert res.exit_code == 2 and "swapped" in res.stderr and not (tmp_path / out).exists()
    for bad in (("--qualities", "abc"), ("--qualities", "150"), ("--codecs", "foo"), ("--modes", "pretty"),
                ("--resume", "-f"), ("--resume", "--fid"), ("--efforts", "x"), ("--efforts", "0,12")):
        res = run("bench", tmp_path, "--no-speed", *bad)
        assert res.exit_code == 2 and len(res.stderr.splitlines()) == 1, (bad, res.stderr)
    assert "efforts are 0..9, got 12" in res.stderr
    for args, word in ((("-e", "abc"), "'abc' is not a valid integer "), (("-q", "abc"), "'abc' is not a valid number ")):
        res = run("encode", small_png, tmp_path / "o.bdc", *args)
        assert res.exit_code == 2 and word in res.stderr, res.stderr
    for args in (("-q", "nan"), ("--target-bpp", "nan"), ("--roi-weight", "NaN")):  # NaN passes every bound
        res = run("encode", small_png, tmp_path / "o.bdc", *args)
        assert res.exit_code == 2 and "not a number" in res.stderr, args
    assert run("decode", "a.bdc", "b.png", "--temperature", "nan").exit_code == 2
    assert not (tmp_path / "o.bdc").exists()


def test_output_into_missing_folder_and_onto_input(run, small_png, tmp_path):
    res = run("encode", small_png, tmp_path / "missing" / "o.bdc")
    assert res.exit_code == 1
    _one_error_line(res)
    before = small_png.read_bytes()
    res = run("encode", small_png, small_png)
    assert res.exit_code == 2 and small_png.read_bytes() == before  # an image suffix for OUT: swapped?
    odd = tmp_path / "small.img"
    odd.write_bytes(before)
    res = run("encode", odd, odd)
    assert res.exit_code == 1 and odd.read_bytes() == before


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
    assert "empty.png: cannot read image (empty file)" in err
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
    i32 = tmp_path / "i32.tif"  # 32-bit integers beyond 16 bits: no known white, refused rather than clipped
    Image.fromarray(base.astype(np.int32) * 1000, "I").save(i32)
    res = run("encode", i32, tmp_path / "i32.bdc")
    assert res.exit_code == 1 and "32-bit" in res.stderr and not (tmp_path / "i32.bdc").exists()


def test_stdin_stdout_and_help_without_torch(small_png, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    png = small_png.read_bytes()
    enc = subprocess.run([sys.executable, "-m", "bdcodec", "encode", "-", "-", "-q", "30"], input=png,
                         capture_output=True, env=env, timeout=300)
    assert enc.returncode == 0 and enc.stdout[:3] == b"BDC"
    dec = subprocess.run([sys.executable, "-m", "bdcodec", "decode", "-", "-", "--mode", "fidelity"],
                         input=enc.stdout, capture_output=True, env=env, timeout=300)
    assert dec.returncode == 0 and dec.stdout[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(io.BytesIO(dec.stdout)).size == Image.open(small_png).size  # all of it, before the quick exit
    bad = subprocess.run([sys.executable, "-m", "bdcodec", "decode", "-", str(tmp_path / "x.png")],
                         input=b"garbage", capture_output=True, env=env, timeout=300)
    assert bad.returncode == 1 and bad.stderr.decode().startswith("bdcodec: error:")
    assert b"Traceback" not in bad.stderr
    probe = ("import sys; from bdcodec.cli import main\n"
             "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
             "assert 'torch' not in sys.modules and 'compressai' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=60).returncode == 0


def test_the_script_leaves_without_the_interpreter_clean_up_after_encode_and_decode_only(small_png, tmp_path,
                                                                                       monkeypatch):
    import torch  # noqa: F401 (the quick exit is taken once torch is loaded)

    from bdcodec import cli

    class Quick(Exception):
        pass

    def quick_exit(code):
        raise Quick(code)

    monkeypatch.setattr(cli, "_QUICK_EXIT", set())
    monkeypatch.setattr(cli.os, "_exit", quick_exit)
    bdc = tmp_path / "a.bdc"
    for argv, code in ((["encode", str(small_png), str(bdc), "-q", "0"], 0), (["encode", str(small_png), str(bdc)], 1)):
        monkeypatch.setattr(sys, "argv", ["bdcodec", *argv])
        with pytest.raises(Quick) as left:
            cli.run()
        assert left.value.args == (code,)  # 1: the output exists, with one error line
    assert bdc.read_bytes()[:3] == b"BDC"
    monkeypatch.setattr(cli, "_QUICK_EXIT", set())
    monkeypatch.setattr(sys, "argv", ["bdcodec", "info", str(bdc)])
    with pytest.raises(SystemExit) as left:
        cli.run()
    assert left.value.code == 0


def test_encode_and_decode_do_not_import_compressai_or_dynamo(small_png, tmp_path):
    # torch.optim imports torch._dynamo (2-3.5 s): the effort fit steps by hand
    probe = (
        "import sys\nfrom bdcodec.cli import main\n"
        "fit = sys.argv[2] + '.fit'\n"
        "for args in (['encode', sys.argv[1], sys.argv[2]], ['decode', sys.argv[2], sys.argv[3]],\n"
        "             ['decode', sys.argv[2], sys.argv[4], '--mode', 'fidelity', '--steps', '1'], ['info', sys.argv[2]],\n"
        "             ['encode', sys.argv[1], fit, '--tune', 'fidelity', '-e', '1'],\n"
        "             ['encode', sys.argv[1], fit, '--tune', 'fidelity', '-e', '7', '-f', '-q', '30'],\n"
        "             'tiles', ['encode', sys.argv[1], fit, '--tune', 'fidelity', '-e', '1', '-f']):\n"
        "    if args == 'tiles':  # the fit in tiles, with the entropy model recomputed in its backward pass\n"
        "        import bdcodec.effort\n        bdcodec.effort.FIT_TILE = 64\n        continue\n"
        "    try:\n        main(args)\n    except SystemExit as exc:\n        assert not exc.code, args\n"
        "assert 'compressai' not in sys.modules, 'compressai imported'\n"
        "assert 'scipy' not in sys.modules and 'torch._dynamo' not in sys.modules, 'heavy imports'\n"
    )
    res = subprocess.run([sys.executable, "-c", probe, str(small_png), str(tmp_path / "a.bdc"),
                          str(tmp_path / "a.png"), str(tmp_path / "b.png")],
                         capture_output=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    assert (tmp_path / "a.png").exists() and (tmp_path / "b.png").exists()


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


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_ctrl_c_in_a_batch_leaves_no_partial_files(tmp_path, jobs):
    """Exit 130 with one line, also when a second SIGINT comes during the clean-up (Ctrl-C pressed
    twice; `timeout -s INT` signals the process and then its group), which click turned into
    "Aborted!" and exit 1."""
    import signal
    import time

    srcs = [tmp_path / f"im{i}.png" for i in range(40)]
    px = np.asarray(Image.open(ROOT / "examples" / "kodim23.png").convert("RGB"))
    for i, p in enumerate(srcs):
        Image.fromarray(np.ascontiguousarray(np.roll(px, i, axis=1))).save(p)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "bdcodec", "encode", *map(str, srcs), "-o", str(out), "-j", jobs],
                            stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and not (out.exists() and any(out.glob("*.bdc"))):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    # 130, or killed by the second SIGINT once Python's exit has put back the default handler: a shell
    # reports both as 130
    assert proc.returncode in (130, -signal.SIGINT), err.decode()
    assert err.decode().strip().splitlines()[-1] == "bdcodec: error: interrupted"
    assert b"Traceback" not in err and b"Aborted" not in err
    assert not [p for p in out.iterdir() if not p.name.endswith(".bdc")]
    assert 0 < len(list(out.glob("*.bdc"))) < len(srcs)
    for p in out.glob("*.bdc"):
        assert p.read_bytes()[:3] == b"BDC"


# -- never lose a file, checks before the work, rough edges ----------------------------
@pytest.fixture
def shared_codec(monkeypatch, codec):
    """The CLI on the session's codec: the model is loaded once for these tests."""
    import bdcodec.cli

    monkeypatch.setattr(bdcodec.cli, "_codec", lambda *args, **kwargs: codec)
    return codec


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to load the model fails the test: checks must come first."""
    import bdcodec.codec

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the checks failed")

    monkeypatch.setattr(bdcodec.codec.Codec, "__init__", refuse)


def _tiny_png(path, seed=0, size=(24, 32)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    return path


def test_existing_outputs_are_never_replaced_without_force(run, shared_codec, tmp_path):
    """`encode a.png b.png` replaced the photo b.png; `decode a.bdc b.bdc` replaced b.bdc."""
    a, b = _tiny_png(tmp_path / "a.png", 0), _tiny_png(tmp_path / "b.png", 1)
    photo = b.read_bytes()
    for force in ((), ("-f",)):  # an image suffix for OUT: refused before anything, even with -f
        res = run("encode", a, b, *force)
        assert res.exit_code == 2 and b.read_bytes() == photo and "swapped" in res.stderr
    other = tmp_path / "b.data"
    other.write_bytes(photo)
    res = run("encode", a, other)
    assert res.exit_code == 1 and other.read_bytes() == photo
    assert "already exists" in res.stderr and "-f" in res.stderr
    _one_error_line(res)
    assert run("encode", a, tmp_path / "a.bdc").exit_code == 0
    assert run("encode", b, tmp_path / "b.bdc").exit_code == 0
    kept = (tmp_path / "b.bdc").read_bytes()
    res = run("decode", tmp_path / "a.bdc", tmp_path / "b.bdc", "--mode", "fidelity")  # .bdc OUT: swapped?
    assert res.exit_code == 2 and (tmp_path / "b.bdc").read_bytes() == kept
    res = run("encode", a, tmp_path / "b.bdc")  # an existing .bdc is no exception
    assert res.exit_code == 1 and (tmp_path / "b.bdc").read_bytes() == kept
    assert run("encode", a, other, "-f").exit_code == 0 and other.read_bytes()[:3] == b"BDC"  # -f replaces
    # batch: an existing output is reported and skipped, the other files are done
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.bdc").write_bytes(b"keep me")
    c = _tiny_png(tmp_path / "c.png", 2)
    res = run("encode", a, c, "-o", out)
    assert res.exit_code == 1 and (out / "a.bdc").read_bytes() == b"keep me"
    assert (out / "c.bdc").read_bytes()[:3] == b"BDC"
    assert "a.bdc: already exists" in res.stderr and "1 of 2 files failed" in res.stderr
    res = run("encode", a, c, "-o", out, "-f")
    assert res.exit_code == 0 and (out / "a.bdc").read_bytes()[:3] == b"BDC"
    # two inputs with one output name: the second is refused, even with -f
    (tmp_path / "d").mkdir()
    a2 = _tiny_png(tmp_path / "d" / "a.png", 3)
    res = run("encode", a, a2, "-o", tmp_path / "new", "-f")
    assert res.exit_code == 1 and "already the output of another input" in res.stderr
    assert (tmp_path / "new" / "a.bdc").read_bytes() == (out / "a.bdc").read_bytes()  # a.png's, not d/a.png's
    res = run("encode", a, c, a, "-o", tmp_path / "twice")  # one file named twice (overlapping globs): coded once
    assert res.exit_code == 0 and sorted(p.name for p in (tmp_path / "twice").iterdir()) == ["a.bdc", "c.bdc"]


def test_fifo_outputs_are_written_in_place(run, shared_codec, tmp_path):
    """rename-into-place replaced a device node (/dev/null as root) with a regular file."""
    import threading

    fifo = tmp_path / "pipe.bdc"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    res = run("encode", _tiny_png(tmp_path / "a.png"), fifo)
    reader.join(60)
    assert res.exit_code == 0, res.output
    assert os.path.exists(fifo) and not os.path.isfile(fifo)  # still the FIFO
    assert got and got[0][:3] == b"BDC"


def test_checks_run_before_any_model_work(run, no_model, tmp_path):
    """a missing output folder was reported 33 s into a decode, output == input after the encode."""
    png = _tiny_png(tmp_path / "a.png")
    for args in [("encode", png, tmp_path / "missing" / "a.bdc"),
                 ("encode", png, tmp_path / "a.bdc", "--max-pixels", 100),
                 ("encode", tmp_path / "none.png", tmp_path / "b.bdc"),
                 ("decode", png, tmp_path / "a2.png"),
                 ("decode", tmp_path / "none.bdc", tmp_path / "a3.png")]:
        res = run(*args)
        assert res.exit_code == 1, args
        _one_error_line(res)
    assert run("encode", png, png, "-f").exit_code == 2  # OUT with an image suffix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_batch_checks_every_file_before_coding_the_first(run, shared_codec, tmp_path):
    """Batch mode: bad files (input, output, weights id) are reported before the first is coded."""
    good1, good2 = _tiny_png(tmp_path / "good1.png", 1), _tiny_png(tmp_path / "good2.png", 2)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    out = tmp_path / "out"
    res = run("encode", good1, bad, good2, "-o", out, "-v")
    assert res.exit_code == 1
    lines = res.stderr.splitlines()
    assert "bad.png" in lines[0] and lines[0].startswith("bdcodec: error:")
    assert any(ln.startswith(str(good1)) for ln in lines[1:]) and any(ln.startswith(str(good2)) for ln in lines)
    from bdcodec import container

    header, streams = container.unpack((out / "good2.bdc").read_bytes())
    alien = tmp_path / "alien.bdc"  # a valid file made with other weights
    alien.write_bytes(container.pack(dataclasses.replace(header, weights_id="0badf00d"), streams))
    res = run("decode", out / "good1.bdc", alien, out / "good2.bdc", "-o", out, "--mode", "fidelity", "-v")
    assert res.exit_code == 1
    lines = res.stderr.splitlines()
    assert "alien.bdc" in lines[0] and "weights 0badf00d" in lines[0]
    assert (out / "good1.png").exists() and (out / "good2.png").exists() and not (out / "alien.png").exists()


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_outputs_follow_the_umask(run, shared_codec, tmp_path, umask, mode):
    """every output was created 0600 whatever the umask."""
    old = os.umask(umask)
    try:
        assert run("encode", _tiny_png(tmp_path / "a.png"), tmp_path / "a.bdc").exit_code == 0
        assert run("decode", tmp_path / "a.bdc", tmp_path / "b.png", "--mode", "fidelity").exit_code == 0
    finally:
        os.umask(old)
    assert (tmp_path / "a.bdc").stat().st_mode & 0o777 == mode
    assert (tmp_path / "b.png").stat().st_mode & 0o777 == mode


def test_messages_carry_no_object_reprs(run, no_model, tmp_path):
    """a text file named .png gave 'cannot identify image file <_io.BytesIO object at 0x...>'."""
    bad = tmp_path / "text.png"
    bad.write_text("hello\n")
    res = run("encode", bad, tmp_path / "o.bdc")
    assert res.exit_code == 1
    _one_error_line(res)
    assert "text.png" in res.stderr and "<" not in res.stderr and "0x" not in res.stderr


def test_target_bpp_out_of_reach_warns_and_excludes_quality(run, shared_codec, tmp_path):
    """a missed --target-bpp passed silently; -q beside it was silently ignored."""
    png = _tiny_png(tmp_path / "a.png")
    res = run("encode", png, tmp_path / "a.bdc", "--target-bpp", "0.01")
    assert res.exit_code == 0 and (tmp_path / "a.bdc").exists()
    warning = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(warning) == 1 and warning[0].startswith("bdcodec: warning:") and "0.01" in warning[0]
    res = run("encode", png, tmp_path / "b.bdc", "--target-bpp", "0.3", "-q", "90")
    assert res.exit_code == 2 and not (tmp_path / "b.bdc").exists()


def test_out_quality_sets_the_quality_of_lossy_outputs(run, shared_codec, small_png, tmp_path):
    """decoding to .jpg/.webp used Pillow's default quality with no way to choose it."""
    bdc = tmp_path / "a.bdc"
    assert run("encode", small_png, bdc, "-q", "60").exit_code == 0
    sizes = {}
    for q in (20, 95):
        res = run("decode", bdc, tmp_path / f"q{q}.jpg", "--mode", "fidelity", "--out-quality", q)
        assert res.exit_code == 0, res.output
        sizes[q] = (tmp_path / f"q{q}.jpg").stat().st_size
    assert sizes[95] > 2 * sizes[20]
    assert "--out-quality" in run("decode", "--help").output


def test_an_unknown_output_suffix_is_written_as_png_with_a_warning(run, shared_codec, small_png, tmp_path):
    """`bdcodec decode a.bdc out.jgp` wrote PNG data without a word."""
    bdc = tmp_path / "a.bdc"
    assert run("encode", small_png, bdc, "-q", "10").exit_code == 0
    res = run("decode", bdc, tmp_path / "out.jgp", "--mode", "fidelity")
    assert res.exit_code == 0 and "unknown suffix .jgp, writing PNG" in res.output
    assert (tmp_path / "out.jgp").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = run("decode", bdc, tmp_path / "out.webp", "--mode", "fidelity")
    assert res.exit_code == 0 and "warning" not in res.output


def test_binary_output_to_a_terminal_is_refused(small_png):
    """`bdcodec encode x.png -` wrote binary data to the terminal."""
    import pty

    controller, terminal = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "bdcodec", "encode", str(small_png), "-"], stdout=terminal,
                              stderr=subprocess.PIPE, cwd=ROOT, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        os.close(terminal)
    os.set_blocking(controller, False)
    try:
        written = os.read(controller, 1 << 16)
    except OSError:  # nothing written (EAGAIN), or the terminal is gone (EIO)
        written = b""
    os.close(controller)
    assert proc.returncode == 1 and b"terminal" in proc.stderr and b"BDC" not in written


def test_broken_pipe_ends_quietly(monkeypatch, capfd):
    """`bdcodec encode x.png - | head -c 0` printed a BrokenPipeError traceback."""
    import io

    from bdcodec import cli

    class Closed(io.RawIOBase):
        def writable(self):
            return True

        def write(self, b):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BufferedWriter(Closed())))
    with pytest.raises(SystemExit) as exc:
        cli._write_output("-", b"BDC" * 10_000, False)
    assert exc.value.code == 141
    assert capfd.readouterr().err == ""



def test_a_reader_that_leaves_early_is_an_error_not_a_success(tmp_path):
    """`bdcodec decode f.bdc - | head -c 10` exited 0: the buffered write stopped after 64 KiB without an error."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    bdc = tmp_path / "k.bdc"
    assert subprocess.run([sys.executable, "-m", "bdcodec", "encode", str(EXAMPLES[-1]), str(bdc), "-q", "0"],
                          env=env, timeout=300).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "bdcodec", "decode", str(bdc), "-", "--mode", "fidelity"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout.read(10)[:4] == b"\x89PNG"
    proc.stdout.close()
    assert proc.wait(timeout=300) == 141 and proc.stderr.read() == b""  # 128 + SIGPIPE, quietly


def test_decode_help_says_the_default_mode_is_the_files(run):
    """`decode --help` called perceptual the default; a --tune fidelity file decodes in fidelity mode."""
    text = " ".join(run("decode", "--help").output.split())
    assert "the mode stored in the file" in text and "--tune fidelity" in text


def test_import_prints_no_warning():
    """`from bdcodec import Codec` printed a FutureWarning (torch.jit.script, from compressai's import)."""
    probe = ("from bdcodec import Codec; import warnings\n"
             "assert not [f for f in warnings.filters if f[2] is FutureWarning]  # silenced at the import only")
    res = subprocess.run([sys.executable, "-W", "default", "-c", probe], capture_output=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert res.returncode == 0 and res.stderr == b"", res.stderr.decode()


def test_progress_shows_on_a_terminal_only(run, shared_codec, monkeypatch, tmp_path):
    """long work was silent; bars now go to stderr when it is a terminal, never with --quiet."""
    from bdcodec import cli

    pngs = [_tiny_png(tmp_path / f"{i}.png", i) for i in range(2)]
    res = run("encode", *pngs, "-o", tmp_path / "piped")
    assert res.exit_code == 0 and res.stderr == ""  # not a terminal: no bar
    monkeypatch.setattr(cli, "PROGRESS_DELAY", 0)
    monkeypatch.setattr(cli, "_stderr_is_tty", lambda: True)
    res = run("encode", *pngs, "-o", tmp_path / "tty")
    assert res.exit_code == 0 and "/2" in res.stderr and "file/s" in res.stderr  # the files bar, total 2
    res = run("encode", *pngs, "-o", tmp_path / "quiet", "--quiet")
    assert res.exit_code == 0 and res.stderr == ""


# -- -j N worker processes --------------------------------------------------------------
def test_jobs_encode_gives_the_same_bytes_and_reports_each_failure(run, shared_codec, tmp_path):
    """`encode IN... -o DIR -j 2` codes in two worker processes: the bytes of -j 1, one line per failure."""
    pngs = [_tiny_png(tmp_path / f"im{i}.png", i) for i in range(3)]
    cut = tmp_path / "cut.png"  # a valid header: passes the checks, fails in a worker
    cut.write_bytes(pngs[0].read_bytes()[:60])
    text = tmp_path / "text.png"  # fails the checks, before any worker starts
    text.write_text("not an image")
    assert run("encode", *pngs, "-o", tmp_path / "one", "--device", "cpu").exit_code == 0
    res = run("encode", pngs[0], cut, pngs[1], text, pngs[2], "-o", tmp_path / "two", "--device", "cpu",
              "-j", "2", "-v")
    assert res.exit_code == 1
    lines = res.stderr.splitlines()
    errors = [ln for ln in lines if ln.startswith("bdcodec: error:")]
    assert len(errors) == 3 and "Traceback" not in res.stderr
    assert any("cut.png" in ln for ln in errors) and any("text.png" in ln for ln in errors)
    assert errors[-1] == "bdcodec: error: 2 of 5 files failed"
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["im0.bdc", "im1.bdc", "im2.bdc"]
    for p in pngs:
        assert (tmp_path / "two" / f"{p.stem}.bdc").read_bytes() == (tmp_path / "one" / f"{p.stem}.bdc").read_bytes()
        assert any(ln.startswith(f"{p}: ") and " bpp, " in ln for ln in lines)  # the -v line
    assert run("encode", pngs[0], tmp_path / "a.bdc", "--device", "cpu", "-j", "0").exit_code == 0  # one per core
    assert run("encode", *pngs, "-o", tmp_path / "x", "-j", "-1").exit_code == 2
    assert "-j, --jobs" in run("decode", "--help").output


def test_jobs_decode_gives_the_same_images_and_checks_weights_first(run, shared_codec, tmp_path):
    """`decode IN... -o DIR -j 2`: the images of -j 1 (the diffusion sampler's within one grey level, as
    between --threads values); a file made with other weights is reported before any file is decoded, the
    others are done."""
    from bdcodec import container

    pngs = [_tiny_png(tmp_path / f"im{i}.png", i) for i in range(3)]
    bdcs = tmp_path / "bdc"
    assert run("encode", *pngs, "-o", bdcs, "--device", "cpu").exit_code == 0
    header, streams = container.unpack((bdcs / "im0.bdc").read_bytes())
    alien = bdcs / "alien.bdc"
    alien.write_bytes(container.pack(dataclasses.replace(header, weights_id="0badf00d"), streams))
    files = [bdcs / f"im{i}.bdc" for i in range(3)]
    assert run("decode", *files, "-o", tmp_path / "one", "--device", "cpu").exit_code == 0
    res = run("decode", files[0], alien, *files[1:], "-o", tmp_path / "two", "--device", "cpu", "-j", "2")
    assert res.exit_code == 1
    errors = res.stderr.splitlines()
    assert len(errors) == 2 and "alien.bdc" in errors[0] and "weights 0badf00d" in errors[0]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["im0.png", "im1.png", "im2.png"]
    for i in range(3):
        one = np.asarray(Image.open(tmp_path / "one" / f"im{i}.png"), dtype=int)
        assert np.abs(np.asarray(Image.open(tmp_path / "two" / f"im{i}.png"), dtype=int) - one).max() <= 1


@pytest.mark.parametrize("gray", [False, True])
def test_large_png_outputs_are_deflated_in_stripes_and_read_back_exactly(monkeypatch, gray):
    import bdcodec.imageio as imageio

    rng = np.random.default_rng(3)
    pixels = np.clip(rng.normal(128, 40, (37, 53, 3)).cumsum(1) / 8, 0, 255).astype(np.uint8)  # odd size, some texture
    want = np.asarray(Image.fromarray(pixels).convert("L")) if gray else pixels
    small = imageio.write_image(pixels, "out.png", gray)  # Pillow's PNG
    monkeypatch.setattr(imageio, "PNG_STRIPE", 500)  # so that this image takes four or more stripes
    striped = imageio.write_image(pixels, "out.png", gray, threads=2)
    assert striped != small and striped.count(b"IDAT") >= 4
    assert striped == imageio.write_image(pixels, "out.png", gray, threads=1)  # the bytes do not depend on threads
    im = Image.open(io.BytesIO(striped))
    im.load()  # checks every chunk's CRC and the zlib stream's Adler-32
    assert im.mode == ("L" if gray else "RGB") and np.array_equal(np.asarray(im), want)
