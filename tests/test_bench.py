import csv
import io
import warnings

import numpy as np
import pytest
from PIL import Image

from bdcodec.bench import _baseline_point, _curves, bd_quality, bd_rate
from bdcodec.metrics import psnr

from .conftest import EXAMPLES, SHARED


def test_bd_rate_known_cases():
    rate = np.array([0.1, 0.25, 0.5, 1.0])
    q = np.array([26.0, 29.0, 32.0, 35.0])
    assert abs(bd_rate(rate, q, rate, q)) < 1e-9
    assert bd_rate(rate, q, rate / 2, q) == pytest.approx(-50.0, abs=1e-6)
    assert bd_rate(rate, q, rate * 1.1, q) == pytest.approx(10.0, abs=1e-6)
    assert bd_quality(rate, q, rate, q + 1.5) == pytest.approx(1.5, abs=1e-9)
    assert np.isnan(bd_rate(rate, q, rate, q + 100))  # no overlap


def test_a_bench_written_to_a_log_reports_progress(capsys, monkeypatch):
    """Without a terminal there is no bar: a line at most once a minute and one at the end."""
    from bdcodec import bench

    clock = iter([0.0, 10.0, 70.0, 75.0, 80.0])
    monkeypatch.setattr(bench.time, "monotonic", lambda: next(clock))
    bar = bench._LogBar(4, "bdcodec")
    for _ in range(4):
        bar.update()
    assert capsys.readouterr().err.splitlines() == ["bench: bdcodec 2/4 (70 s)", "bench: bdcodec 4/4 (80 s)"]


def test_curves_average_per_setting():
    rows = [{"codec": "c", "setting": 1, "bpp": 0.2, "psnr": 30.0},
            {"codec": "c", "setting": 1, "bpp": 0.4, "psnr": 32.0},
            {"codec": "c", "setting": 2, "bpp": 1.0, "psnr": 40.0}]
    pts = _curves(rows)["c"]
    assert pts[0]["bpp"] == pytest.approx(0.3) and pts[0]["psnr"] == pytest.approx(31.0) and pts[0]["n"] == 2


@pytest.mark.skipif(not (SHARED / "baselines" / "kodak_avg.csv").exists(), reason="needs ../shared")
@pytest.mark.parametrize("codec,setting,ref_name",
                         [("jpeg", 50, "jpeg420"), ("webp", 50, "webp"), ("avif", 30, "avif")])
def test_baselines_agree_with_independent_measurement(codec, setting, ref_name):
    from PIL import Image

    with open(SHARED / "baselines" / "kodak_avg.csv") as f:
        ref = next(r for r in csv.DictReader(f) if r["codec"] == ref_name and int(r["setting"]) == setting)
    images = sorted((SHARED / "data" / "kodak").glob("*.png"))
    assert len(images) == int(ref["n"])
    bpps, psnrs = [], []
    for p in images:
        res = _baseline_point((codec, setting, str(p)))
        orig = np.asarray(Image.open(p).convert("RGB"))
        bpps.append(8 * res["bytes"] / res["pixels"])
        psnrs.append(psnr(orig, res["_out"]))
    assert abs(np.mean(psnrs) - float(ref["psnr"])) < 0.1
    assert abs(np.mean(bpps) - float(ref["bpp"])) < 0.01 * float(ref["bpp"])


def test_metrics_take_read_only_images_without_a_warning():
    """Decoded baselines are read-only arrays; torch.from_numpy warned about them."""
    import warnings

    pytest.importorskip("pytorch_msssim")
    from bdcodec.metrics import Metrics

    metrics = Metrics(None)
    metrics.lpips = None
    img = np.zeros((8, 8, 3), np.uint8)
    img.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert metrics(img, img)["psnr"] > 90


def test_report_has_no_fid_columns_without_fid():
    """FID/KID columns of "n/a" only cluttered the table when --fid was not asked for."""
    from bdcodec.bench import _report

    summary = {"images": 1, "folder": "x", "notes": [], "bd": [], "speed": [],
               "curves": {"jpeg": [{"setting": 50, "bpp": 1.0, "psnr": 30.0}]}}
    assert "FID" not in _report(summary) and "KID" not in _report(summary)
    summary["curves"]["jpeg"][0].update(fid=12.5, kid=0.01)
    assert "| FID | KID |" in _report(summary) and "12.5" in _report(summary)


def test_cli_speed_times_every_command_line_and_reports_ratios(codec, monkeypatch, tmp_path):
    """S/MP of whole command-line runs at two sizes and batch images/s, against AVIF.

    Cheap: one tiny image, a small "large" size, one run each, and the bdcodec command lines run in
    this process on the session's codec (no timing is checked)."""
    from click.testing import CliRunner
    from PIL import Image, features

    import bdcodec.cli
    from bdcodec.bench import _report, _tile_to, cli_speed

    monkeypatch.setattr(bdcodec.cli, "_codec", lambda *args, **kwargs: codec)
    calls = []

    def run_bdcodec(args):
        calls.append(args)
        res = CliRunner().invoke(bdcodec.cli.main, args, catch_exceptions=False)
        assert res.exit_code == 0, res.output

    png = tmp_path / "a.png"
    px = np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(px).save(png)
    tiled = _tile_to(px, 70, 50)
    assert tiled.shape == (50, 70, 3) and (tiled[:24, :32] == px).all() and (tiled[:24, 32] == px[:, 31]).all()
    baselines = ["avif"] if features.check("avif") else []
    s = cli_speed([png], device="cpu", baselines=baselines, reps=1, large=(64, 48), batch_jobs=(1,),
                  run_bdcodec=run_bdcodec)
    assert [e["image"] for e in s["sizes"]] == ["32x24", "64x48"]
    assert [a[0] for a in calls] == ["encode", "decode", "decode"] * 2 + ["encode"]
    assert {a[a.index("--mode") + 1] for a in calls if "--mode" in a} == {"fidelity", "perceptual"}
    assert calls[-1][calls[-1].index("-j") + 1] == "1" and "-o" in calls[-1]
    for e in s["sizes"]:
        assert all(e["bdcodec"][k] > 0 for k in ("enc_s_per_mp", "dec_fidelity_s_per_mp", "dec_perceptual_s_per_mp"))
        for name in baselines:
            assert set(e["ratios"][name]) == {"enc", "dec_fidelity", "dec_perceptual"} and e[name]["dec_s_per_mp"] > 0
    assert s["batch"]["bdcodec"]["1"] > 0 and all(s["batch"][n]["1"] > 0 for n in baselines)
    text = _report({"images": 1, "folder": "x", "notes": [], "bd": [], "speed": [], "curves": {}, "cli_speed": s})
    assert "perceptual decode s/MP" in text and "mirror-tiled to 64x48" in text and "| bdcodec | " in text
    assert ("| 64x48 | avif | " in text) == bool(baselines)


def test_periodic_structure_finds_a_lattice_and_not_image_content():
    from bdcodec.metrics import periodic_structure

    rng = np.random.default_rng(0)
    photo = np.asarray(Image.open(EXAMPLES[0]).convert("RGB"))
    base = periodic_structure(photo)
    assert base < 0.5  # content averages out over the phases
    yy, xx = np.mgrid[: photo.shape[0], : photo.shape[1]]
    lattice = 3.0 * ((xx % 8 == 3) | (yy % 8 == 5))  # thin lines every 8 px, 3 grey levels
    marked = np.clip(photo + lattice[..., None] + rng.normal(0, 0.5, photo.shape), 0, 255).round().astype(np.uint8)
    assert periodic_structure(marked) > 3 * base
    assert periodic_structure(np.roll(marked, 3, axis=1)) == pytest.approx(periodic_structure(marked), rel=0.1)  # the phase of the lattice does not matter


def test_perceptual_decodes_carry_no_more_periodic_structure_than_the_original(codec):
    # On average over the examples within 1.5x of the originals' (the bench's measure, a mean over images), and
    # on no example beyond 2x: a lattice such as an earlier denoiser drew scored 5.5x.
    from bdcodec.metrics import periodic_structure

    ratios = {8: [], 4: []}
    for path in EXAMPLES:
        photo = np.asarray(Image.open(path).convert("RGB"))
        out, _ = codec.decode(codec.encode(photo, quality=0))
        for period in ratios:
            ratios[period].append(periodic_structure(out, period) / periodic_structure(photo, period))
    for period, r in ratios.items():
        assert np.mean(r) <= 1.5 and max(r) <= 2.0, (period, r)


def test_effort_table_compares_each_effort_with_effort_0_of_its_mode():
    from bdcodec.bench import _curves, _effort_table

    rows = []
    for name, gain, secs in (("bdcodec-fidelity", 0.0, 1.0), ("bdcodec-fidelity-e3", 0.3, 4.0)):
        for q, (bpp, db) in enumerate([(0.2, 27.0), (0.4, 29.0), (0.8, 32.0), (1.6, 36.0)]):
            rows.append({"codec": name, "setting": q, "image": "a.png", "bpp": bpp,
                         "psnr": db + gain, "enc_s": secs})
    table = _effort_table(_curves(rows), rows)
    assert [(r["codec"], r["effort"]) for r in table] == [("bdcodec-fidelity", 0), ("bdcodec-fidelity", 3)]
    assert table[0]["bd_rate_psnr"] == pytest.approx(0, abs=1e-9)
    assert -10 < table[1]["bd_rate_psnr"] < -2  # +0.3 dB everywhere on a curve of about 7-14 % per 0.3 dB
    assert (table[1]["enc_s"], table[1]["enc_s_effort0"]) == (4.0, 1.0)
    # a mode benched at effort 0 alone (the perceptual default) has no effort table
    plain = [dict(r, codec="bdcodec-perceptual") for r in rows if r["codec"] == "bdcodec-fidelity"]
    assert [r["codec"] for r in _effort_table(_curves(rows + plain), rows + plain)] == ["bdcodec-fidelity"] * 2


def test_avif_at_fills_the_budget_without_passing_it():
    from bdcodec.bench import avif_at

    photo = np.asarray(Image.open(EXAMPLES[0]).convert("RGB"))[:128, :192]
    q, data = avif_at(photo, 1500)
    assert len(data) <= 1500
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="AVIF", quality=min(q + 1, 100), speed=6)
    assert q == 100 or len(buf.getvalue()) > 1500  # one quality more would not fit


def test_perception_section_compares_decoders_in_the_same_bytes_and_writes_crops(codec, tmp_path):
    from bdcodec.bench import _perception_report, run_perception
    from bdcodec.metrics import Metrics

    photo = np.asarray(Image.open(EXAMPLES[0]).convert("RGB"))[:128, :192]
    metrics = Metrics(None)
    p = run_perception(codec, {"a.png": photo}, metrics, tmp_path, qualities=(0,), temperatures=(0.0, 1.0),
                       steps=(1, 2))
    rows = {r["decoder"]: r for r in p["rates"]}
    assert set(rows) == {"perceptual", "fidelity", "avif"}
    assert rows["perceptual"]["bpp"] == rows["fidelity"]["bpp"]  # one file, two decoders
    assert rows["avif"]["bpp"] <= rows["perceptual"]["bpp"] or rows["avif"]["avif_quality"] == 0
    assert [r["temperature"] for r in p["temperature"]] == [0.0, 1.0]
    assert [r["steps"] for r in p["steps"]] == [1, 2]
    assert p["temperature"][0]["psnr"] != p["temperature"][1]["psnr"]  # the noise reaches the image
    if metrics.lpips is not None:
        assert rows["perceptual"]["diversity"] > 0
    with Image.open(tmp_path / "crops-q0.png") as im:
        assert im.width > 4 * 2 * 128 and im.height > 2 * 128
    report = "\n".join(_perception_report(p))
    assert "| 0 | perceptual |" in report and "crops-q0.png" in report


def test_patch_fid_scores_grow_with_the_distance_between_feature_sets():
    from bdcodec.metrics import PatchFID

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(300, 16))
    pf = object.__new__(PatchFID)  # the scores need features only, not the Inception network
    pf.feats = {"reference": list(ref), ("same", 0): list(rng.normal(size=(300, 16))),
                ("moved", 0): list(rng.normal(size=(300, 16)) + 0.5)}
    s = pf.scores()
    assert s[("same", 0)]["fid"] < 1.0 and abs(s[("same", 0)]["kid"]) < 0.01
    assert s[("moved", 0)]["fid"] > 16 * 0.25 * 0.8 and s[("moved", 0)]["kid"] > 0.01
    assert set(pf.scores([("moved", 0)])) == {("moved", 0)}


def test_patch_fid_cuts_the_grid_and_the_grid_shifted_by_half_a_patch():
    import torch

    from bdcodec.metrics import PatchFID

    pf = object.__new__(PatchFID)
    pf.torch = torch
    img = np.random.default_rng(1).integers(0, 256, size=(512, 768, 3), dtype=np.uint8)
    img.setflags(write=False)  # as decoded arrays are
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patches = pf._patches(img)
    assert patches.shape == (6 + 2, 3, 256, 256)  # Kodak: 192 patches from 24 images
    assert torch.equal(patches[6], torch.from_numpy(img[128:384, 128:384]).permute(2, 0, 1).float())
    assert len(pf._patches(img[:200, :300])) == 0


def test_detail_window_finds_the_textured_square():
    from bdcodec.bench import detail_window

    img = np.zeros((300, 400, 3), np.uint8)
    img[200:248, 300:348] = np.random.default_rng(0).integers(0, 255, (48, 48, 3))
    y, x = detail_window(img, 64)
    assert y <= 200 and y + 64 >= 248 and x <= 300 and x + 64 >= 348
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert detail_window(np.zeros((1, 1, 3), np.uint8), 1) == (0, 0)


def test_bench_merge_joins_per_image_results_and_leaves_out_incomplete_images(tmp_path):
    """scripts/bench-merge.py: per-image benches give the effort table one bench over those images would."""
    import subprocess
    import sys

    from bdcodec.bench import _curves, _effort_table

    from .conftest import ROOT

    fields = ["codec", "setting", "image", "bytes", "pixels", "bpp", "psnr", "enc_s"]
    rows_by_image = {}
    for image, lift in (("a.png", 0.0), ("b.png", 1.0), ("c.png", 0.5)):
        rows = []
        for name, gain, secs in (("bdcodec-fidelity", 0.0, 1.0), ("bdcodec-fidelity-e3", 0.3, 4.0)):
            for q, (bpp, db) in enumerate([(0.2, 27.0), (0.4, 29.0), (0.8, 32.0), (1.6, 36.0)]):
                if image == "c.png" and name.endswith("e3") and q == 3:
                    continue  # c's bench was cut short
                rows.append({"codec": name, "setting": float(q), "image": image, "bytes": 100.0, "pixels": 4000.0,
                             "bpp": bpp * (1 + lift), "psnr": db + gain + lift, "enc_s": secs + lift})
        rows_by_image[image] = rows
        with open(tmp_path / f"{image}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench-merge.py"), "--csv", str(tmp_path / "all.csv"),
                          *(str(tmp_path / f"{i}.csv") for i in rows_by_image)],
                         capture_output=True, text=True, check=True)
    both = rows_by_image["a.png"] + rows_by_image["b.png"]
    e3 = [r for r in _effort_table(_curves(both), both) if r["effort"] == 3][0]
    assert f"| bdcodec-fidelity-e3 | 3 | {e3['bd_rate_psnr']:+.2f} |" in res.stdout
    assert "2 images" in res.stdout and "left out, incomplete: c.png" in res.stdout
    with open(tmp_path / "all.csv", newline="") as f:
        assert sorted({r["image"] for r in csv.DictReader(f)}) == ["a.png", "b.png"]
    # an image's results given twice (the same file, or a bench over several images beside one of them) is refused
    twice = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench-merge.py"), str(tmp_path / "a.png.csv"),
                            str(tmp_path / "a.png.csv")], capture_output=True, text=True)
    assert twice.returncode != 0 and "again" in twice.stderr and "Traceback" not in twice.stderr
    # --curves: effort 0 alone is whole on all three images
    every = [str(tmp_path / f"{i}.csv") for i in rows_by_image]
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench-merge.py"), "--curves", "bdcodec-fidelity",
                          *every], capture_output=True, text=True, check=True)
    assert "3 images" in res.stdout and "left out" not in res.stdout and "-e3" not in res.stdout
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench-merge.py"), "--curves", "bdcodec-fidelity-e9",
                          *every], capture_output=True, text=True)
    assert res.returncode != 0 and "no curve bdcodec-fidelity-e9" in res.stderr
    # results kept without their times (as docs/results/kodak-effort.csv) give the BD-rates and no seconds
    with open(tmp_path / "timeless.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields[:-1], extrasaction="ignore")
        w.writeheader()
        w.writerows(both)
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench-merge.py"), str(tmp_path / "timeless.csv")],
                         capture_output=True, text=True, check=True)
    assert f"| bdcodec-fidelity-e3 | 3 | {e3['bd_rate_psnr']:+.2f} |" in res.stdout
    assert "| n/a (effort 0: n/a) |" in res.stdout and "| bdcodec-fidelity | 0 | +0.00 |" in res.stdout


def test_a_stopped_bench_resumes_where_it_stopped(tmp_path, monkeypatch, capsys):
    import json

    from bdcodec import bench
    from bdcodec.codec import Codec
    from bdcodec.errors import BdcError

    folder, out = tmp_path / "img", tmp_path / "out"
    folder.mkdir()
    for i, path in enumerate(EXAMPLES[:2]):
        Image.open(path).convert("RGB").crop((0, 0, 96, 64)).save(folder / f"{i}.png")
    args = dict(codecs=["bdcodec", "jpeg"], qualities="0,40", modes=["fidelity"], limit=None, jobs=1,
                lpips_weights=None, weights=None, device="cpu", speed=False, efforts=(0,))
    bench.run_bench(folder, out, **args)

    def columns(path):  # all but the times, which each run measures anew
        return sorted(",".join(line.split(",")[:7]) for line in path.read_text().splitlines())

    full = columns(out / "results.csv")
    points = (out / "points.jsonl").read_text().splitlines()
    notes = json.loads((out / "summary.json").read_text())["notes"]
    assert "MS-SSIM skipped on 2 images under 161 px on a side (0.png, 1.png): no MS-SSIM curves" in notes
    lpips = bench.Metrics(None).lpips is not None
    assert json.loads(points[0]) == {"bench": {"weights": Codec(device="cpu").weights_id, "lpips": lpips}}
    assert len(points) == 1 + 2 * 2 + 2 * len(bench.BASELINES["jpeg"])  # bdcodec's points come first
    (out / "points.jsonl").write_text("\n".join(points[:4]) + "\n" + points[4][:30])  # stopped in its 4th point
    calls = []
    encode = Codec.encode
    monkeypatch.setattr(Codec, "encode", lambda self, *a, **k: calls.append(k["quality"]) or encode(self, *a, **k))
    bench.run_bench(folder, out, **args, resume=True)
    assert calls == [40]  # only the point cut short is measured again (and the baselines, not kept either)
    assert columns(out / "results.csv") == full
    assert len((out / "points.jsonl").read_text().splitlines()) == len(points)
    bench.run_bench(folder, out, **args, resume=True)
    assert calls == [40]  # nothing left to measure
    with pytest.raises(BdcError, match="holds 20 points of an earlier bench"):
        bench.run_bench(folder, out, **args)  # neither --resume nor -f: the points are not dropped
    jpeg = 2 * len(bench.BASELINES["jpeg"])
    capsys.readouterr()
    bench.run_bench(folder, out, **dict(args, codecs=["jpeg"]), resume=True)  # a part of it: nothing to measure
    assert len(calls) == 1 and len((out / "points.jsonl").read_text().splitlines()) == len(points)
    err = capsys.readouterr().err
    assert f"bench: {jpeg} of the {len(points) - 1} points in" in err and "image not in" not in err
    bench.run_bench(folder, out, **dict(args, limit=1), resume=True)  # one image of two: the other's points stay
    assert len(calls) == 1 and len((out / "points.jsonl").read_text().splitlines()) == len(points)
    err = capsys.readouterr().err
    assert f"bench: {2 + jpeg // 2} of the {len(points) - 1} points in" in err
    assert "also holds points of 1 image not in" in err and "(1.png)" in err
    stamp = json.loads(points[0])
    stamp["bench"]["weights"] = "0" * 8
    (out / "points.jsonl").write_text(json.dumps(stamp) + "\n" + "\n".join(points[1:]))
    with pytest.raises(BdcError, match="the weights 00000000, these are"):
        bench.run_bench(folder, out, **args, resume=True)
    (out / "points.jsonl").write_text("\n".join(points[:3] + ["{"] + points[4:]))  # only a last line may be cut
    with pytest.raises(BdcError, match="line 4: not a bench point"):
        bench.run_bench(folder, out, **args, resume=True)
    (out / "points.jsonl").write_text("\n".join(points))
    Image.open(folder / "0.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / "0.png")
    with pytest.raises(BdcError, match="the 0.png measured there is not the picture in this folder"):
        bench.run_bench(folder, out, **args, resume=True)
    bench.run_bench(folder, out, **args, force=True)  # -f: measured afresh
    assert len(calls) == 1 + 4 and columns(out / "results.csv") != full
