"""Training: ``python -m bdcodec.train --stage rd|diffusion ...``.

Stage ``rd`` trains the transforms, hyperprior, entropy model and g_s with
``bpp + lambda * 255^2 * MSE`` (or ``bpp + lambda * K * (1 - MS-SSIM)``), the
rate level drawn per batch over the whole quality range, plus the bottleneck's
aux loss on its own optimizer.  Stage ``diffusion`` freezes all of that and trains
the texture branch and the denoiser on frozen latents with an x0 loss plus LPIPS.

Checkpoints (model, optimizers, step, RNG) go to ``--run-dir`` (default
``runs/<stage>``); ``--resume`` continues from ``last.pt`` there; ``--init`` starts
from a weights file; ``--export`` writes the best checkpoint to a safetensors file.
Multi-GPU/multi-process: launch with ``torchrun --nproc_per_node N -m bdcodec.train``.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import random
import sys
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

from .diffusion import BlurSchedule
from .effort import native_bf16
from .model import BDCodecModel, ModelConfig
from .metrics import find_lpips_weights, lpips_model, lpips_shifted, periodic_structure_tiles, psnr_tensor
from .weights import DECODER_PARTS, ENCODER_PARTS, lineage, load_model, save_model

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}


def list_images(folder: str | os.PathLike) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTS)


def _decode_image(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def load_images(source, crop: int = 0, limit: int | None = None) -> list[np.ndarray]:
    """uint8 (H, W, 3) arrays from a folder of images or a pack file (see :func:`pack`).

    Images whose short side is below ``crop`` are upscaled to it.
    """
    source = Path(source)
    arrays = []
    if source.is_file():
        with tarfile.open(source) as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)[:limit]
            for m in members:
                arrays.append(_decode_image(tar.extractfile(m).read()))
    elif source.is_dir():
        for p in list_images(source)[:limit]:
            arrays.append(_decode_image(p.read_bytes()))
    else:
        raise SystemExit(f"no training data at {source}")
    if not arrays:
        raise SystemExit(f"no images in {source}")
    out = []
    for a in arrays:
        h, w = a.shape[:2]
        if min(h, w) < crop:
            scale = crop / min(h, w)
            im = Image.fromarray(a).resize((math.ceil(w * scale), math.ceil(h * scale)), Image.BICUBIC)
            a = np.asarray(im)
        out.append(a)
    return out


class Crops:
    """Random crops and horizontal flips from images kept as uint8 tensors on the training device.

    The images are decoded once; on a GPU they live in its memory and a batch is cut
    there, so the data path costs no host work.  Crop positions come from a CPU
    generator whose state is saved with the checkpoints.
    """

    def __init__(self, images: list[np.ndarray], crop: int, device, seed: int = 0):
        self.images = [torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).contiguous().to(device)
                       for a in images]
        self.crop, self.device = crop, device
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self):
        return len(self.images)

    def batch(self, n: int) -> torch.Tensor:
        c = self.crop
        which = torch.randint(len(self.images), (n,), generator=self.gen).tolist()
        pos = torch.rand(n, 3, generator=self.gen, dtype=torch.float64).tolist()
        out = torch.empty(n, 3, c, c, dtype=torch.uint8, device=self.device)
        for k, (i, (u, v, f)) in enumerate(zip(which, pos)):
            img = self.images[i]
            h, w = img.shape[-2:]
            top, left = int(u * (h - c + 1)), int(v * (w - c + 1))
            patch = img[:, top : top + c, left : left + c]
            out[k] = patch.flip(-1) if f < 0.5 else patch
        return out.float().div_(255.0)


def pack(folder, out, max_side: int = 512, quality: int = 76, fmt: str = "avif", jobs: int | None = None) -> dict:
    """Pack a folder of training photos into one tar of compressed images.

    Each image is scaled (Lanczos) so that its long side is at most ``max_side`` and
    stored as AVIF 4:4:4 (or WebP/JPEG) at ``quality``: the 680 training photos fit a
    file small enough to travel with a GPU job, at about 40 dB against the scaled
    originals (measured on the training set), well above what the codec is trained
    to reach.  The tar is written to a temporary name and renamed when complete.
    """
    import concurrent.futures

    if not Path(folder).is_dir():
        raise SystemExit(f"pack: no such folder: {folder}")
    paths = list_images(folder)
    if not paths:
        raise SystemExit(f"pack: no images in {folder}")
    out = Path(out)
    if not out.parent.is_dir():
        raise SystemExit(f"pack: output folder {out.parent} does not exist")
    fmt = fmt.lower()
    suffix = {"avif": ".avif", "webp": ".webp", "jpeg": ".jpg"}[fmt]
    work = [(str(p), max_side, quality, fmt) for p in paths]
    tmp = out.with_name(out.name + ".tmp")
    try:
        with concurrent.futures.ProcessPoolExecutor(jobs) as pool, tarfile.open(tmp, "w") as tar:
            for p, data in zip(paths, pool.map(_pack_one, work, chunksize=8)):
                info = tarfile.TarInfo(p.stem + suffix)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    except (OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"pack: {exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    return {"images": len(paths), "bytes": out.stat().st_size}


def _pack_one(job) -> bytes:
    path, max_side, quality, fmt = job
    try:
        im = Image.open(path)
        im = im.convert("RGB")
    except (OSError, ValueError) as exc:
        from .imageio import error_reason

        raise ValueError(f"{path}: cannot read image ({error_reason(exc)})") from None
    if max(im.size) > max_side:
        s = max_side / max(im.size)
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.LANCZOS)
    buf = io.BytesIO()
    if fmt == "avif":
        im.save(buf, "AVIF", quality=quality, subsampling="4:4:4", speed=6)
    elif fmt == "webp":
        im.save(buf, "WEBP", quality=quality, method=6)
    else:
        im.save(buf, "JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def pack_main(argv):
    ap = argparse.ArgumentParser(prog="python -m bdcodec.train pack",
                                 description="Pack training photos into one file that training reads like a folder.")
    ap.add_argument("--data", required=True, help="folder of training photos")
    ap.add_argument("--out", required=True, help="pack file to write (a tar of compressed images)")
    ap.add_argument("--max-side", type=int, default=512, help="scale images so the long side is at most this")
    ap.add_argument("--quality", type=int, default=76)
    ap.add_argument("--format", choices=["avif", "webp", "jpeg"], default="avif")
    ap.add_argument("--jobs", type=int, default=None, help="worker processes (default: all cores)")
    args = ap.parse_args(argv)
    t0 = time.time()
    res = pack(args.data, args.out, args.max_side, args.quality, args.format, args.jobs)
    print(f"packed {res['images']} images into {args.out}: {res['bytes'] / 1e6:.1f} MB, {time.time() - t0:.0f} s")


def load_val(folder, limit: int) -> list[torch.Tensor]:
    out = []
    for p in list_images(folder)[:limit]:
        with Image.open(p) as im:
            arr = np.asarray(im.convert("RGB"))
        out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).float().unsqueeze(0) / 255.0)
    return out


def _use_bf16(choice: str, device: torch.device) -> bool:
    if choice != "auto":
        return choice == "on"
    return device.type == "cuda" or native_bf16(device.type)


def rd_terms(model: BDCodecModel, x: torch.Tensor, level: float, out: dict | None = None):
    out = out if out is not None else model(x, level)
    n = x.shape[0] * x.shape[2] * x.shape[3]
    bpp = sum(-torch.log2(lik).sum() for lik in out["likelihoods"].values()) / n
    mse = F.mse_loss(out["x_bar"], x)
    return out, bpp, mse


class PatchDiscriminator(torch.nn.Module):
    """A conditional PatchGAN for the diffusion stage's adversarial term (training only, never exported).

    It sees an image and the fidelity reconstruction x̄ it was decoded from (both in [−1, 1]) and scores
    every 70×70-px patch; spectral norm keeps it Lipschitz, so a light hinge loss stays stable beside LPIPS.
    """

    def __init__(self, ch: int = 64):
        super().__init__()
        sn = torch.nn.utils.parametrizations.spectral_norm
        layers, cin = [], 6
        for cout, stride in ((ch, 2), (2 * ch, 2), (4 * ch, 2), (4 * ch, 1)):
            layers += [sn(torch.nn.Conv2d(cin, cout, 4, stride, 1)), torch.nn.LeakyReLU(0.2, inplace=True)]
            cin = cout
        layers.append(sn(torch.nn.Conv2d(cin, 1, 4, 1, 1)))
        self.net = torch.nn.Sequential(*layers)

    def forward(self, img: torch.Tensor, x_bar: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([img, x_bar], 1))


def lattice_loss(x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """How far the periodic structure of ``x0`` exceeds that of ``x`` (N,3,H,W in 0..1), averaged over
    64-px squares (:func:`~bdcodec.metrics.periodic_structure_tiles`, 8-px phases); a decode smoother
    than its target costs nothing."""
    return F.relu(periodic_structure_tiles(x0) - periodic_structure_tiles(x.to(x0.dtype))).mean()


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["pack"]:
        return pack_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m bdcodec.train", description=__doc__.split("\n")[0])
    ap.add_argument("--stage", choices=["rd", "encoder", "diffusion", "both", "distill"], default="rd",
                    help="both: rd, then diffusion on its best latents, within one --minutes budget")
    ap.add_argument("--data", default="../shared/data/train", help="folder of images or a pack file")
    ap.add_argument("--val", default="../shared/data/kodak")
    ap.add_argument("--val-limit", type=int, default=4)
    ap.add_argument("--val-every", type=int, default=500)
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--init", default=None, help="start from this weights file (default: shipped weights if present)")
    ap.add_argument("--scratch", action="store_true", help="start from random initialisation")
    ap.add_argument("--resume", action="store_true", help="continue from <run-dir>/last.pt")
    ap.add_argument("--steps", type=int, default=100000)
    ap.add_argument("--minutes", type=float, default=None,
                    help="wall-time budget of the whole run, data loading included (with --stage both: both stages)")
    ap.add_argument("--rd-share", type=float, default=0.6, help="--stage both: share of --minutes for stage rd")
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--lr-final", type=float, default=3e-5,
                    help="cosine decay target, reached at --steps or, on one process, at --minutes if that comes first")
    ap.add_argument("--diffusion-lr", type=float, default=None, help="--stage both: learning rate of stage diffusion")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ckpt-minutes", type=float, default=5.0)
    ap.add_argument("--msssim", action="store_true", help="MS-SSIM distortion instead of MSE (rd stage)")
    ap.add_argument("--no-global-context", action="store_true", help="ablation: drop the Transformer context")
    ap.add_argument("--even-chunks", action="store_true", help="ablation: even channel chunks")
    ap.add_argument("--lpips-weights", default=None, help="AlexNet features file for LPIPS (diffusion stage)")
    ap.add_argument("--lpips-weight", type=float, default=0.5)
    ap.add_argument("--lpips-shift", type=int, default=16,
                    help="diffusion stage: drop a random 0..N-1 rows and columns before LPIPS, so the decoder's "
                         "pixel phases never line up with AlexNet's stride-4/8/16 sampling grid (1: off)")
    ap.add_argument("--lattice-weight", type=float, default=0.0,
                    help="diffusion stage: weight of the periodic structure (8 px, per 64-px tile) of x0 beyond "
                         "the target's")
    ap.add_argument("--gan-weight", type=float, default=0.0,
                    help="stage diffusion: weight of a hinge adversarial term from a conditional PatchGAN (0: none)")
    ap.add_argument("--t-min", type=float, default=0.0,
                    help="stage diffusion: draw training times from [T_MIN, 1) (the sampler's first step is at t = 1)")
    ap.add_argument("--mse-weight", type=float, default=0.1,
                    help="decoder 2: weight of the preconditioned (EDM-normalised) squared error")
    ap.add_argument("--encoder-parts", default=None,
                    help="--stage encoder: comma-separated parts to train (default: all of g_a.,h_a.,gain)")
    ap.add_argument("--outer", type=int, default=None,
                    help="--stage distill: channels of the narrower g_a first and g_s last stage, taught by the init's")
    ap.add_argument("--decoder", type=int, choices=[1, 2], default=None,
                    help="stage diffusion: start a fresh diffusion decoder of this design on the init's codec")
    ap.add_argument("--den-resize", action="store_true",
                    help="stage diffusion, decoder 1: turn the sub-pixel convolutions of the texture branch and the "
                         "denoiser into convolution + nearest upsampling (each kernel the mean of its phases)")
    ap.add_argument("--export", default=None, help="write the best checkpoint to this safetensors file and exit")
    ap.add_argument("--out", default=None, help="after training, write the best checkpoint to this safetensors file")
    ap.add_argument("--shard-mb", type=float, default=None,
                    help="with --export/--out: split weights into shards of at most this many MiB")
    ap.add_argument("--data-limit", type=int, default=None)
    ap.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                    help="bf16 autocast: auto = on for CUDA and for CPUs with native bf16 (AVX512-BF16/AMX)")
    args = ap.parse_args(argv)
    t_process = time.time()

    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed + rank)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)

    shard = int(args.shard_mb * 2**20) if args.shard_mb else None
    root = Path(args.run_dir or ("runs" if args.stage == "both" else f"runs/{args.stage}"))
    if args.export:
        run_dir = root / "diffusion" if args.stage == "both" else root
        _export(run_dir / "best.pt", args.export, shard)
        return
    root.mkdir(parents=True, exist_ok=True)

    data = None
    if args.stage == "both":
        deadline = t_process + args.minutes * 60 if args.minutes else None
        rd_done = root / "rd" / "best.safetensors"
        if not (args.resume and rd_done.exists()):
            rd_minutes = None if deadline is None else args.minutes * args.rd_share - (time.time() - t_process) / 60
            data = train_stage(args, "rd", root / "rd", args.init, rd_minutes, device, distributed, rank, world)
            if rank == 0:
                _export(root / "rd" / "best.pt", rd_done, None)
            if distributed:
                dist.barrier()
        lr = args.diffusion_lr or args.lr
        left = None if deadline is None else (deadline - time.time()) / 60
        train_stage(argparse.Namespace(**{**vars(args), "lr": lr, "scratch": False}), "diffusion",
                    root / "diffusion", str(rd_done), left, device, distributed, rank, world, data)
        final = root / "diffusion" / "best.pt"
        if not final.exists():  # no time was left for the diffusion stage
            final = root / "rd" / "best.pt"
    else:
        minutes = None if args.minutes is None else args.minutes - (time.time() - t_process) / 60
        train_stage(args, args.stage, root, args.init, minutes, device, distributed, rank, world)
        final = root / "best.pt"
    if args.out and rank == 0:
        _export(final, args.out, shard)
    if distributed:
        dist.destroy_process_group()


def _export(ckpt_path: Path, out, shard: int | None):
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    model = BDCodecModel(ModelConfig.from_json(ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    wid = save_model(model, out, ckpt["record"], max_shard_bytes=shard, parent=ckpt["record"].get("parent"))
    print(f"exported {ckpt_path} (step {ckpt['step']}) to {out}, weights id {wid}", flush=True)


def train_stage(args, stage: str, run_dir: Path, init: str | None, minutes: float | None, device,
                distributed: bool, rank: int, world: int, images: list[np.ndarray] | None = None):
    """Train one stage into ``run_dir`` for ``args.steps`` steps or ``minutes``; returns the decoded images."""
    run_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    # -- model -----------------------------------------------------------------------------
    record = {"stages": []}
    init = None if args.scratch else (init or _default_init())
    if init:
        model, meta = load_model(init, trainable=True)
        record = json.loads(meta.get("training", "{}")) or record
        record.setdefault("stages", [])
        record["parent"] = lineage(init)  # lets the export read the init's files if the codec stays
        cfg = model.cfg
        if getattr(args, "decoder", None) and args.decoder != cfg.decoder:
            model, cfg = _new_decoder(model, args.decoder)
            record["stages"].append({"stage": "new diffusion decoder", "decoder": args.decoder,
                                     "note": "texture branch and denoiser start from random initialisation"})
        if getattr(args, "den_resize", False) and (stage != "diffusion" or cfg.decoder != 1):
            raise SystemExit(f"--den-resize: for --stage diffusion on a decoder of design 1 (this one is design "
                             f"{cfg.decoder})" if stage == "diffusion" else "--den-resize: for --stage diffusion")
        if getattr(args, "den_resize", False) and not cfg.den_resize:
            model, cfg = _resized_decoder(model)
            record["stages"].append({"stage": "resized diffusion decoder",
                                     "note": "sub-pixel convolutions of the texture branch and the denoiser turned "
                                             "into convolution + nearest upsampling, kernels the means of their phases"})
    else:
        cfg = ModelConfig()
        if args.no_global_context or args.even_chunks:
            kw = {}
            if args.no_global_context:
                kw["global_context"] = False
            if args.even_chunks:
                kw["chunks"] = tuple([cfg.M // 4] * 4)
            cfg = ModelConfig(**{**json.loads(cfg.to_json()), **kw})
        model = BDCodecModel(cfg)
    teacher = None
    if stage == "distill":  # a narrower g_a and g_s learn to give what the init's give; the rest is the init's
        if not init or not args.outer:
            raise SystemExit("--stage distill needs --init (the teacher) and --outer")
        if distributed:
            raise SystemExit("--stage distill runs in one process (it is cheap; no torchrun)")
        teacher = model.to(device).eval().requires_grad_(False)
        cfg = dataclasses.replace(cfg, N_outer=args.outer)
        model = narrowed(teacher, cfg)
    model.to(device).train()

    if stage == "distill":
        model.requires_grad_(False)
        train_params = list(model.g_a.parameters()) + list(model.g_s.parameters())
        for p in train_params:
            p.requires_grad_(True)
    elif stage == "rd":
        train_params = [p for n, p in model.named_parameters()
                        if not n.startswith(DECODER_PARTS) and not n.endswith("quantiles")]
    elif stage == "encoder":  # the R-D loss through a frozen decoder: every file decodes as before
        model.requires_grad_(False)
        parts = tuple(args.encoder_parts.split(",")) if args.encoder_parts else ENCODER_PARTS
        if not set(parts) <= set(ENCODER_PARTS):
            raise SystemExit(f"--encoder-parts: choose among {','.join(ENCODER_PARTS)}")
        train_params = [p for n, p in model.named_parameters() if n.startswith(parts)]
        for p in train_params:
            p.requires_grad_(True)
    else:
        model.requires_grad_(False)
        model.texture.requires_grad_(True)
        model.denoiser.requires_grad_(True)
        train_params = list(model.texture.parameters()) + list(model.denoiser.parameters())
    opt = torch.optim.Adam(train_params, lr=args.lr)
    aux_opt = torch.optim.Adam([model.entropy_bottleneck.quantiles], lr=1e-3) if stage == "rd" else None
    disc = disc_opt = None
    if stage == "diffusion" and args.gan_weight > 0:
        disc = PatchDiscriminator().to(device)
        disc_opt = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(0.5, 0.9))
    step, best, history = 0, float("inf"), []
    resumed_stage = None
    if images is None:
        images = load_images(args.data, args.crop, args.data_limit)
    crops = Crops(images, args.crop, device, seed=args.seed * 1_000_003 + rank)
    if args.resume and (run_dir / "last.pt").exists():
        ckpt = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        if aux_opt and ckpt.get("aux_opt"):
            aux_opt.load_state_dict(ckpt["aux_opt"])
        if disc is not None and ckpt.get("disc"):
            disc.load_state_dict(ckpt["disc"])
            disc_opt.load_state_dict(ckpt["disc_opt"])
        step, best, history, record = ckpt["step"], ckpt["best"], ckpt["history"], ckpt["record"]
        if record["stages"] and record["stages"][-1]["stage"] == stage:
            resumed_stage = record["stages"][-1]
            record = {**record, "stages": record["stages"][:-1]}
        torch.set_rng_state(ckpt["rng"])
        if ckpt.get("crop_rng") is not None and rank == 0:
            crops.gen.set_state(ckpt["crop_rng"])
        print(f"resumed from {run_dir / 'last.pt'} at step {step}")
    ddp_model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if distributed else model
    ddp_disc = torch.nn.parallel.DistributedDataParallel(disc) if distributed and disc is not None else disc

    lpips_fn = None
    if stage == "diffusion":
        path = find_lpips_weights(args.lpips_weights)
        if path:
            try:
                lpips_fn = lpips_model(path).to(device)
            except ImportError:
                print("lpips package not installed: training without the perceptual term")
        else:
            print("no LPIPS weights found: training without the perceptual term")
    ms_ssim = None
    if args.msssim:
        from pytorch_msssim import ms_ssim

    schedule = BlurSchedule.for_config(cfg)
    val = load_val(args.val, args.val_limit) if rank == 0 else []
    print(f"stage {stage}: {sum(p.numel() for p in train_params)/1e6:.2f} M trainable parameters, "
          f"{len(crops)} training images, crop {args.crop}, batch {args.batch} x {world}, device {device}"
          + (f", {minutes:.1f} minutes" if minutes else ""), flush=True)

    use_bf16 = _use_bf16(args.bf16, device)
    print(f"precision: {'bf16 autocast' if use_bf16 else 'fp32'}", flush=True)
    last_ckpt = time.time()
    stage_rec = {"stage": stage, "data": str(args.data), "images": len(crops), "crop": args.crop,
                 "batch": args.batch * world,
                 "start_step": step, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "lambdas": list(cfg.lambdas), "precision": "bf16" if use_bf16 else "fp32"}
    if stage == "diffusion":
        stage_rec.update(lpips_weight=args.lpips_weight if lpips_fn else 0, gan_weight=args.gan_weight,
                         t_min=args.t_min, lattice_weight=args.lattice_weight,
                         **({"lpips_shift": args.lpips_shift} if lpips_fn else {}),
                         **({"mse_weight": args.mse_weight} if cfg.decoder == 2 else {}))
    if stage == "distill":
        stage_rec.update(outer=cfg.N_outer, teacher=record["parent"]["reads"][0])
    if resumed_stage:
        stage_rec.update(start_step=resumed_stage["start_step"], started=resumed_stage["started"])
    stage_rec["minutes_before"] = (resumed_stage or {}).get("minutes", 0.0)
    try:
        from tqdm import tqdm
        bar = tqdm(total=args.steps, initial=step, disable=rank != 0 or not sys.stderr.isatty(), mininterval=10,
                   dynamic_ncols=True)
    except ImportError:
        bar = None
    rng = random.Random(args.seed * 7919 + step + 104729 * rank)
    if minutes is not None and minutes <= 0:
        print(f"stage {stage}: no time left, skipped", flush=True)
        return images
    stop = False
    t_train = time.time()
    t_rate, n_rate = time.time(), 0
    while step < args.steps and not stop:
        x = crops.batch(args.batch)
        level = rng.uniform(0, cfg.levels - 1)
        lam = model.lmbda(level)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            if stage == "distill":
                with torch.no_grad():
                    out = teacher(x, level)
                y_t = out["y"]
                y_s = model.g_a(x).float()
                x_s = model.g_s(out["y_hat"]).float()
                mse_y = F.mse_loss(y_s, y_t)
                mse_x = F.mse_loss(x_s, out["x_bar"])
                loss = mse_y / y_t.pow(2).mean() + mse_x / out["x_bar"].var()
                stats = {"psnr": mse_x, "y_rel": mse_y / y_t.pow(2).mean()}
            elif stage in ("rd", "encoder"):
                out, bpp, mse = rd_terms(model, x, level, ddp_model(x, level))
                if ms_ssim is not None:
                    dist_term = 1 - ms_ssim(out["x_bar"].float().clamp(0, 1), x, data_range=1.0)
                    loss = bpp + lam * 255**2 / 60 * dist_term  # keeps the MSE lambdas in the same bpp range
                else:
                    loss = bpp + lam * 255**2 * mse
                stats = {"bpp": bpp, "psnr": mse}
            else:
                with torch.no_grad():
                    model.eval()  # frozen codec: rounded z, as at decode time (the denoiser has no BN/dropout)
                    out = model(x, level)
                    x_bar = out["x_bar"].clamp(0, 1)
                t = args.t_min + (1 - args.t_min) * torch.rand(x.shape[0], device=device)
                z_t = schedule.diffuse(x * 2 - 1, t, torch.randn_like(x))
                pred = ddp_model.module if distributed else model
                x0, c_out = schedule.denoise(pred.denoiser, z_t, t, pred.texture(out["y_hat"]), x_bar * 2 - 1)
                x0_01 = (x0 + 1) / 2
                l1 = F.l1_loss(x0_01, x)
                if c_out is None:
                    loss = l1
                else:  # EDM: the squared error of x0 divided by c_out^2 weighs every noise level alike
                    loss = args.mse_weight * (((x0.float() - (x * 2 - 1)) / c_out.float()) ** 2).mean()
                if lpips_fn is not None:  # at a random offset: see --lpips-shift
                    dy, dx = (rng.randrange(args.lpips_shift) for _ in range(2)) if args.lpips_shift > 1 else (0, 0)
                    loss = loss + args.lpips_weight * lpips_fn(x0_01[..., dy:, dx:].float(), x[..., dy:, dx:])
                stats = {"l1": l1, "psnr": F.mse_loss(x0_01.detach().float().clamp(0, 1), x)}
                if args.lattice_weight > 0:
                    lat = lattice_loss(x0_01.float(), x)
                    loss = loss + args.lattice_weight * lat
                    stats["lattice"] = lat.detach()
                if disc is not None:
                    disc.requires_grad_(False)
                    loss = loss - args.gan_weight * disc(x0, x_bar * 2 - 1).float().mean()
                    disc.requires_grad_(True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(train_params, 1.0)
        frac = step / max(args.steps, 1)
        if minutes and not distributed:  # ranks' clocks differ: under DDP the schedule follows steps only
            frac = max(frac, (time.time() - t_train) / max(minutes * 60 - (t_train - t_start), 1e-3))
        frac = min(frac, 1.0)
        for g in opt.param_groups:
            g["lr"] = args.lr_final + 0.5 * (args.lr - args.lr_final) * (1 + math.cos(math.pi * frac))
        opt.step()
        if disc is not None:  # hinge loss on real crops against the detached samples, in one pass
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                xb = (x_bar * 2 - 1).repeat(2, 1, 1, 1)
                d_real, d_fake = ddp_disc(torch.cat([x * 2 - 1, x0.detach()]), xb).float().chunk(2)
                d_loss = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
            disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_opt.step()
            stats["d_hinge"] = d_loss.detach()
        if aux_opt is not None:
            aux_opt.zero_grad(set_to_none=True)
            model.aux_loss().backward()
            aux_opt.step()
        step += 1
        n_rate += x.shape[0] * world
        if minutes and time.time() - t_start > minutes * 60:
            stop = True
        if bar:
            bar.update(1)
        if rank == 0 and (step % args.val_every == 0 or stop or step == args.steps):
            stats = {k: v.item() for k, v in stats.items()}
            stats["psnr"] = 10 * math.log10(1 / max(stats["psnr"], 1e-12))
            rate = n_rate / (time.time() - t_rate)
            metrics = validate(model, val, "rd" if stage == "distill" else stage, schedule, device, lpips_fn)
            metrics.update(step=step, minutes=(time.time() - t_start) / 60, images_per_s=round(rate, 1),
                           **{f"train_{k}": v for k, v in stats.items()})
            history.append(metrics)
            print(json.dumps(metrics), flush=True)
            score = metrics["score"]
            rec = dict(record)
            rec["stages"] = record["stages"] + [_stage_entry(stage_rec, step, t_start, metrics)]
            if score < best:
                best = score
                _save(run_dir / "best.pt", model, opt, aux_opt, step, best, history, rec, crops, disc, disc_opt)
            _plot(history, run_dir / "curves.png")
            t_rate, n_rate = time.time(), 0
        if rank == 0 and (time.time() - last_ckpt > args.ckpt_minutes * 60 or stop or step == args.steps):
            rec = dict(record)
            rec["stages"] = record["stages"] + [_stage_entry(stage_rec, step, t_start, history[-1] if history else None)]
            _save(run_dir / "last.pt", model, opt, aux_opt, step, best, history, rec, crops, disc, disc_opt)
            last_ckpt = time.time()
    if bar:
        bar.close()
    return images


def narrowed(model: BDCodecModel, cfg: ModelConfig) -> BDCodecModel:
    """A model of ``cfg`` holding ``model``'s tensors, each cut to its new shape (the first channels).

    Only g_a's first and g_s's last stage change width with ``N_outer``; the first channels of a
    sub-pixel convolution's output are those of the first output channels after the shuffle, so
    every cut keeps channels that belong together.
    """
    new = BDCodecModel(cfg, trainable=model.trainable)
    state = new.state_dict()
    for name, t in model.state_dict().items():
        if name in state and t.shape != state[name].shape:
            t = t[tuple(slice(0, n) for n in state[name].shape)]
        state[name] = t
    new.load_state_dict(state)
    return new


def _new_decoder(model: BDCodecModel, decoder: int) -> tuple[BDCodecModel, ModelConfig]:
    """The same codec with a freshly initialised diffusion decoder of design ``decoder``
    (its schedule fields take this version's defaults)."""
    fields = {k: getattr(ModelConfig(), k) for k in ("decoder", "sigma_blur_max", "logsnr_min", "logsnr_max",
                                                     "data_std")}
    cfg = ModelConfig.from_json(json.dumps({**json.loads(model.cfg.to_json()), **fields, "decoder": decoder}))
    new = BDCodecModel(cfg, trainable=True)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(DECODER_PARTS)}
    missing, unexpected = new.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith(DECODER_PARTS) for k in missing), (missing, unexpected)
    return new, cfg


# decoder 1's sub-pixel convolutions: the texture branch's two upsampling blocks and the denoiser's up path
SUBPEL = ("texture.1.subpel_conv.0", "texture.1.upsample.0", "texture.2.subpel_conv.0", "texture.2.upsample.0",
          "denoiser.up")


def _resized_decoder(model: BDCodecModel) -> tuple[BDCodecModel, ModelConfig]:
    """The same model with decoder 1's sub-pixel convolutions (conv to 4C channels, then PixelShuffle(2)) made
    convolutions to C channels followed by nearest upsampling, each kernel the mean of its four phase kernels."""
    cfg = dataclasses.replace(model.cfg, den_resize=True)
    new = BDCodecModel(cfg, trainable=True)
    state = model.state_dict()
    for name in SUBPEL:
        for k in ("weight", "bias"):
            t = state[f"{name}.{k}"]
            state[f"{name}.{k}"] = t.reshape(t.shape[0] // 4, 4, *t.shape[1:]).mean(1)  # channel c*4 + phase
    new.load_state_dict(state)
    return new, cfg


def _stage_entry(stage_rec: dict, step: int, t_start: float, val: dict | None) -> dict:
    entry = {k: v for k, v in stage_rec.items() if k != "minutes_before"}
    entry.update(steps=step - stage_rec["start_step"], total_step=step,
                 minutes=round(stage_rec["minutes_before"] + (time.time() - t_start) / 60, 2))
    if val:
        entry["val"] = val
    return entry


def _default_init() -> str | None:
    from .weights import default_weights_path

    p = default_weights_path()
    return str(p) if p.exists() else None


@torch.no_grad()
def validate(model: BDCodecModel, val: list[torch.Tensor], stage: str, schedule: BlurSchedule, device,
             lpips_fn=None) -> dict:
    """bpp (estimated, and real from the coder), PSNR, MS-SSIM and LPIPS at the lowest, middle and
    highest rate.  The score is the mean R-D cost (stage rd) or the mean LPIPS (stage diffusion)."""
    from .model import pad_to

    from pytorch_msssim import ms_ssim

    from .codec import DEFAULT_STEPS, DEFAULT_TEMPERATURE, Codec

    model.eval()
    model.entropy_bottleneck.update(force=True)
    codec = Codec(device="cpu", model=model) if device.type == "cpu" else None
    res = {}
    score = 0.0
    levels = [0.0, (model.cfg.levels - 1) / 2, float(model.cfg.levels - 1)]
    for level in levels:
        bpps, psnrs, real, msssim, lps = [], [], [], [], []
        for x in val:
            if codec is not None and stage in ("rd", "encoder"):  # the latent's real size at this level, from the coder
                real.append(8 * codec.latent_bytes(x, level) / (x.shape[2] * x.shape[3]))
            x = x.to(device)
            xp = pad_to(x, 64)
            out = model(xp, level)
            padded_bpp = rd_terms(model, xp, level, out)[1].item()
            bpp = padded_bpp * xp.shape[2] * xp.shape[3] / (x.shape[2] * x.shape[3])  # per image pixel
            x_bar = out["x_bar"][..., : x.shape[2], : x.shape[3]].clamp(0, 1)
            if stage == "diffusion":
                gen = torch.Generator().manual_seed(0)
                cond = {"texture": model.texture(out["y_hat"]), "x_bar": out["x_bar"].clamp(0, 1) * 2 - 1}
                x0 = schedule.sample(model.denoiser, cond, cond["x_bar"], DEFAULT_STEPS, DEFAULT_TEMPERATURE, gen)
                x_bar = ((x0 + 1) / 2)[..., : x.shape[2], : x.shape[3]].clamp(0, 1)
            bpps.append(bpp)
            psnrs.append(psnr_tensor(x_bar, x))
            if min(x.shape[-2:]) > 160:
                msssim.append(float(ms_ssim(x_bar, x, data_range=1.0)))
            if lpips_fn is not None:
                lps.append(lpips_shifted(lpips_fn, x_bar, x))
        b, p = float(np.mean(bpps)), float(np.mean(psnrs))
        res[f"bpp@{level:g}"] = b
        res[f"psnr@{level:g}"] = p
        if real:
            res[f"real_bpp@{level:g}"] = float(np.mean(real))
        if msssim:
            res[f"msssim@{level:g}"] = float(np.mean(msssim))
        if lps:
            res[f"lpips@{level:g}"] = float(np.mean(lps))
        mse = 10 ** (-p / 10)
        score += float(np.mean(lps)) if (lps and stage == "diffusion") else b + model.lmbda(level) * 255**2 * mse
    res["score"] = score / len(levels)
    model.train()
    return res


def _save(path: Path, model, opt, aux_opt, step, best, history, record, crops=None, disc=None, disc_opt=None):
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "disc": disc.state_dict() if disc else None, "disc_opt": disc_opt.state_dict() if disc_opt else None,
                "aux_opt": aux_opt.state_dict() if aux_opt else None, "step": step, "best": best,
                "history": history, "record": record, "config": model.cfg.to_json(),
                "rng": torch.get_rng_state(), "crop_rng": crops.gen.get_state() if crops else None}, tmp)
    os.replace(tmp, path)


def _plot(history: list[dict], path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    steps = [h["step"] for h in history]
    keys = sorted({k.split("@")[1] for h in history for k in h if k.startswith("bpp@")})
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for k in keys:
        axes[0].plot(steps, [h.get(f"bpp@{k}") for h in history], label=f"level {k}")
        axes[1].plot(steps, [h.get(f"psnr@{k}") for h in history], label=f"level {k}")
    axes[2].plot(steps, [h["score"] for h in history])
    score = "mean LPIPS" if any(k.startswith("lpips@") for k in history[-1]) else "mean R-D cost"
    for ax, title in zip(axes, ["bpp (validation, estimated)", "PSNR dB (validation)", score]):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
