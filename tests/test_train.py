import json
import os
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFilter

from bdcodec.train import main as train_main
from bdcodec.weights import load_model, read_metadata


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, n, size in (("train", 4, (96, 80)), ("val", 1, (64, 64))):
        (root / split).mkdir()
        for i in range(n):
            x = np.linspace(0, 1, size[1])[None, :, None] * rng.uniform(50, 255, (1, 1, 3))
            img = np.clip(x + rng.normal(0, 8, (*size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / split / f"{i}.png")
    return root


def _args(data, run_dir, *extra):
    return ["--data", str(data / "train"), "--val", str(data / "val"), "--val-limit", "1", "--crop", "64",
            "--batch", "2", "--val-every", "2", "--run-dir", str(run_dir), *extra]


def test_rd_then_diffusion_resume_and_export(data, tmp_path):
    rd = tmp_path / "rd"
    train_main(_args(data, rd, "--scratch", "--steps", "2"))
    assert (rd / "last.pt").exists() and (rd / "best.pt").exists() and (rd / "curves.png").exists()
    train_main(_args(data, rd, "--scratch", "--steps", "3", "--minutes", "30", "--resume"))
    import torch

    ckpt = torch.load(rd / "last.pt", weights_only=False)
    assert ckpt["step"] == 3 and len(ckpt["history"]) >= 2
    train_main(["--run-dir", str(rd), "--export", str(tmp_path / "rd.safetensors")])
    diff = tmp_path / "diff"
    diffusion = ("--stage", "diffusion", "--init", str(tmp_path / "rd.safetensors"), "--gan-weight", "0.1",
                 "--t-min", "0.5", "--lattice-weight", "2", "--lpips-weights", str(tmp_path / "none.pth"))
    train_main(_args(data, diff, *diffusion, "--steps", "2"))
    first = torch.load(diff / "last.pt", weights_only=False)
    train_main(_args(data, diff, *diffusion, "--steps", "3", "--resume"))
    ckpt = torch.load(diff / "last.pt", weights_only=False)
    assert ckpt["step"] == 3 and "d_hinge" in json.dumps(ckpt["history"]) and "lattice" in json.dumps(ckpt["history"])
    d0, d1 = first["disc"], ckpt["disc"]  # the discriminator is checkpointed and keeps learning on resume
    assert d0.keys() == d1.keys() and any(not torch.equal(d0[k], d1[k]) for k in d0)
    out = tmp_path / "full.safetensors"
    train_main(["--stage", "diffusion", "--run-dir", str(diff), "--export", str(out)])
    meta = read_metadata(out)
    record = json.loads(meta["training"])
    assert [s["stage"] for s in record["stages"]] == ["rd", "diffusion"]
    assert record["stages"][0]["total_step"] == 3
    assert record["stages"][1]["gan_weight"] == 0.1 and record["stages"][1]["t_min"] == 0.5
    assert record["stages"][1]["lattice_weight"] == 2
    # only the diffusion decoder changed, so the new weights read the files of the R-D stage's
    assert json.loads(meta["reads"]) == [read_metadata(tmp_path / "rd.safetensors")["weights_id"]]
    assert not any(k.startswith("disc") for k in load_model(out)[0].state_dict())
    model, _ = load_model(out)
    assert model.cfg.chunks == (16, 16, 32, 64)


def test_encoder_stage_trains_only_the_encoder(data, tmp_path):
    """Stage ``encoder``: every tensor a decode uses is the init's, and the export reads the init's files."""
    import torch

    from bdcodec.weights import ENCODER_PARTS, save_model
    from bdcodec.model import BDCodecModel

    torch.manual_seed(0)
    init = tmp_path / "init.safetensors"
    save_model(BDCodecModel(), init, {"stages": []})
    train_main(_args(data, tmp_path / "enc", "--stage", "encoder", "--init", str(init),
                     "--steps", "2", "--lr", "1e-3", "--out", str(tmp_path / "enc.safetensors")))
    before = load_model(init, trainable=True)[0].state_dict()
    after, meta = load_model(tmp_path / "enc.safetensors", trainable=True)
    changed = {k for k, v in after.state_dict().items() if k not in before or not torch.equal(v, before[k])}
    assert changed and all(k.startswith(ENCODER_PARTS) for k in changed), sorted(changed)
    assert any(k.startswith("g_a.") for k in changed) and any(k.startswith("h_a.") for k in changed)
    assert json.loads(meta["reads"]) == [read_metadata(init)["weights_id"]]


def test_distill_stage_teaches_a_narrower_g_a_and_g_s_and_keeps_the_rest(data, tmp_path):
    """Stage ``distill``: only g_a and g_s learn, at the new width; the export is a codec of its own."""
    import torch

    from bdcodec.codec import Codec
    from bdcodec.model import BDCodecModel, ModelConfig
    from bdcodec.train import narrowed
    from bdcodec.weights import save_model

    torch.manual_seed(0)
    teacher = BDCodecModel()
    cut = narrowed(teacher, ModelConfig(N_outer=16))
    assert cut.g_s[-1][0].weight.shape[1] == 16 and cut.g_a[0].conv1.weight.shape[0] == 16
    assert torch.equal(cut.g_s[-1][0].weight, teacher.g_s[-1][0].weight[:, :16])
    init = tmp_path / "init.safetensors"
    save_model(teacher, init, {"stages": []})
    out = tmp_path / "narrow.safetensors"
    train_main(_args(data, tmp_path / "dist", "--stage", "distill", "--outer", "16", "--init", str(init),
                     "--steps", "2", "--lr", "1e-3", "--out", str(out)))
    model, meta = load_model(out, trainable=True)
    assert model.cfg.N_outer == 16 and "reads" not in meta
    assert json.loads(meta["training"])["stages"][-1]["outer"] == 16
    before = load_model(init, trainable=True)[0].state_dict()
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if v.shape != before[k].shape
               or not torch.equal(v, before[k])}
    assert changed == {"g_a", "g_s"}
    codec = Codec(out, device="cpu")  # the runtime builds the narrow model from the weights' config
    px = np.full((40, 56, 3), 120, np.uint8)
    assert codec.decode(codec.encode(px, quality=30), mode="fidelity")[0].shape == px.shape
    assert "N_outer" not in json.loads(read_metadata(init)["config"])  # default widths: config as before
    with pytest.raises(SystemExit, match="--outer"):
        train_main(_args(data, tmp_path / "bad", "--stage", "distill", "--init", str(init), "--steps", "1"))


def test_pack_then_both_stages_in_one_budget_with_sharded_export(data, tmp_path):
    """The GPU path's code on the CPU: pack file, on-device crops, rd then diffusion, sharded export."""
    import tarfile

    packed = tmp_path / "train.tar"
    train_main(["pack", "--data", str(data / "train"), "--out", str(packed), "--max-side", "64", "--jobs", "1"])
    with tarfile.open(packed) as tar:
        names = tar.getnames()
    assert sorted(names) == ["0.avif", "1.avif", "2.avif", "3.avif"]
    from bdcodec.train import load_images

    imgs = load_images(packed)
    assert [a.shape for a in imgs] == [(64, 53, 3)] * 4  # 96x80 scaled to a long side of 64
    ref = load_images(data / "train")
    small = [np.asarray(Image.fromarray(a).resize((53, 64), Image.LANCZOS), dtype=float) for a in ref]
    mse = np.mean([((a - b) ** 2).mean() for a, b in zip(imgs, small)])
    assert 10 * np.log10(255**2 / mse) > 30  # a faithful copy (these test images are noise-heavy)
    out = tmp_path / "w.safetensors"
    train_main(["--stage", "both", "--data", str(packed), "--val", str(data / "val"), "--val-limit", "1",
                "--crop", "64", "--batch", "2", "--steps", "2", "--val-every", "1", "--minutes", "20",
                "--run-dir", str(tmp_path / "run"), "--out", str(out), "--shard-mb", "16",
                "--lpips-weights", str(tmp_path / "none.pth")])
    assert len(list(tmp_path.glob("w-0000*-of-00002.safetensors"))) == 2
    model, meta = load_model(out)
    record = json.loads(meta["training"])
    assert [s["stage"] for s in record["stages"][-2:]] == ["rd", "diffusion"]
    assert record["stages"][-1]["val"]["images_per_s"] > 0
    assert (tmp_path / "run" / "rd" / "best.safetensors").exists()


def test_pack_refuses_bad_input_in_one_line_and_leaves_no_file(data, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_text("not an image")
    for folder, out, msg in ((tmp_path / "missing", tmp_path / "p.tar", "no such folder"),
                             (data / "train", tmp_path / "no" / "p.tar", "does not exist"),
                             (tmp_path / "in", tmp_path / "p.tar", "a.png: cannot read image")):
        with pytest.raises(SystemExit, match=msg):
            train_main(["pack", "--data", str(folder), "--out", str(out), "--jobs", "1"])
    assert not list(tmp_path.glob("p.tar*"))


def test_crops_are_reproducible_and_cover_flips():
    import torch

    from bdcodec.train import Crops

    cols = np.arange(50, dtype=np.uint8)[None, None, :, None] * 5
    img = np.broadcast_to(cols + np.arange(40, dtype=np.uint8)[None, :, None, None], (2, 40, 50, 3))
    a, b = Crops(list(img), 16, "cpu", seed=3), Crops(list(img), 16, "cpu", seed=3)
    xa, xb = a.batch(64), b.batch(64)
    assert xa.shape == (64, 3, 16, 16) and xa.dtype == torch.float32 and torch.equal(xa, xb)
    flipped = (xa[:, :, :, 0] > xa[:, :, :, -1]).all(dim=(1, 2))  # columns increase unless flipped
    assert 0 < int(flipped.sum()) < 64


def test_ablation_switches_build_other_models(data, tmp_path):
    train_main(_args(data, tmp_path / "abl", "--scratch", "--steps", "1", "--no-global-context", "--even-chunks"))
    train_main(["--run-dir", str(tmp_path / "abl"), "--export", str(tmp_path / "abl.safetensors")])
    model, _ = load_model(tmp_path / "abl.safetensors")
    assert not model.cfg.global_context and model.cfg.chunks == (32, 32, 32, 32)
    assert len(model.entropy.g_gs) == 0


def test_two_process_ddp_on_cpu(data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "bdcodec.train", *_args(data, tmp_path / "ddp", "--scratch", "--steps", "2", "--threads", "1")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "ddp" / "last.pt").exists()
    assert "batch 2 x 2" in res.stdout


def test_bf16_autocast_keeps_likelihoods_in_fp32_and_close_to_fp32():
    import torch

    from bdcodec.model import BDCodecModel
    from bdcodec.train import _use_bf16, rd_terms

    assert not _use_bf16("off", torch.device("cpu")) and _use_bf16("on", torch.device("cpu"))
    torch.manual_seed(0)
    model = BDCodecModel().eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        _, bpp32, mse32 = rd_terms(model, x, 2.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, bpp16, mse16 = rd_terms(model, x, 2.0)
    assert all(lik.dtype == torch.float32 for lik in out["likelihoods"].values())
    assert out["x_bar"].dtype == torch.float32
    assert abs(bpp16.item() - bpp32.item()) < 0.05 * bpp32.item()
    assert abs(mse16.item() - mse32.item()) < 0.05 * mse32.item()


def test_lattice_loss_pays_for_a_drawn_lattice_and_not_for_content():
    import torch

    from bdcodec.train import lattice_loss

    photo = np.asarray(Image.open(Path(__file__).parent.parent / "examples" / "kodim23.png").convert("RGB"))
    photo = photo[:192, :256].astype(np.float32)
    yy, xx = np.mgrid[:192, :256]
    lattice = 3.0 * ((xx % 8 == 3) | (yy % 8 == 5))[..., None]  # thin lines every 8 px, 3 grey levels
    drawn = np.clip(photo + lattice, 0, 255)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a) / 255).permute(2, 0, 1)[None].float()  # noqa: E731
    assert float(lattice_loss(t(photo), t(photo))) < 1e-4
    assert 0.3 < 255 * float(lattice_loss(t(drawn), t(photo))) < 3
    smooth = np.asarray(Image.fromarray(photo.astype(np.uint8)).filter(ImageFilter.GaussianBlur(1)), np.float32)
    assert 255 * float(lattice_loss(t(smooth), t(photo))) < 0.05  # a decode that lost detail draws no lattice
    assert 255 * float(lattice_loss(t(np.clip(smooth + lattice, 0, 255)), t(photo))) > 0.5
    local = photo.copy()  # a lattice whose sign flips between the halves: no global phase pattern
    local[:, :128] += 3.0 * (xx[:, :128] % 8 == 3)[..., None]
    local[:, 128:] -= 3.0 * (xx[:, 128:] % 8 == 3)[..., None]
    assert 255 * float(lattice_loss(t(np.clip(local, 0, 255)), t(photo))) > 0.3
    x0 = t(drawn).requires_grad_(True)
    lattice_loss(x0, t(photo)).backward()
    assert torch.isfinite(x0.grad).all() and x0.grad.abs().sum() > 0
