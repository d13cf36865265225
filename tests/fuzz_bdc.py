"""Fuzz the .bdc decoder.

Mutation run (no extra packages): mutates, truncates and extends valid files and
decodes each one with the shipped weights; every case must either decode or fail
with BdcError, within a time limit::

    python tests/fuzz_bdc.py --cases 10000

Coverage-guided run of the container parser with atheris (``pip install atheris``)::

    python tests/fuzz_bdc.py --atheris -atheris_runs=100000
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def _seeds(codec) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for h, w, q in ((1, 1, 50), (16, 24, 10), (40, 33, 90)):
        out.append(codec.encode(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), quality=q))
    return out


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    blob = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        op = rng.integers(0, 5)
        if op == 0 and blob:  # flip bits
            blob[rng.integers(0, len(blob))] ^= int(rng.integers(1, 256))
        elif op == 1 and blob:  # truncate
            blob = blob[: rng.integers(0, len(blob))]
        elif op == 2:  # extend
            blob += rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
        elif op == 3 and blob:  # overwrite a run
            i = int(rng.integers(0, len(blob)))
            n = int(rng.integers(1, 9))
            blob[i : i + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        elif op == 4 and len(blob) > 8:  # re-seal the CRC so the inner checks are reached
            import struct
            import zlib

            body = bytes(blob[:-4])
            blob = bytearray(body + struct.pack("<I", zlib.crc32(body)))
    return bytes(blob)


def run_mutations(cases: int, seed: int, limit_s: float) -> int:
    from bdcodec.codec import Codec
    from bdcodec.errors import BdcError

    codec = Codec(device="cpu")
    seeds = _seeds(codec)
    rng = np.random.default_rng(seed)
    ok = clean = crashes = hangs = 0
    t_start = time.time()
    for i in range(cases):
        data = mutate(seeds[i % len(seeds)], rng)
        t0 = time.perf_counter()
        try:
            codec.decode(data, mode="fidelity", max_pixels=4096 * 4096)
            ok += 1
        except BdcError:
            clean += 1
        except Exception as exc:  # anything else is a bug
            crashes += 1
            print(f"case {i}: {type(exc).__name__}: {exc} (input {data.hex()})", file=sys.stderr)
        if time.perf_counter() - t0 > limit_s:
            hangs += 1
            print(f"case {i}: took {time.perf_counter() - t0:.1f} s (input {data.hex()})", file=sys.stderr)
    print(f"{cases} cases in {time.time() - t_start:.0f} s: {ok} decoded, {clean} refused with BdcError, "
          f"{crashes} crashes, {hangs} hangs")
    return 1 if crashes or hangs else 0


def run_atheris(argv: list[str]) -> None:
    import atheris

    with atheris.instrument_imports():
        from bdcodec import container
        from bdcodec.errors import BdcError

    def one_input(data: bytes) -> None:
        try:
            container.unpack(data, max_pixels=10**8)
        except BdcError:
            pass

    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit-s", type=float, default=10.0, help="a case slower than this counts as a hang")
    ap.add_argument("--atheris", action="store_true")
    args, rest = ap.parse_known_args()
    if args.atheris:
        run_atheris([sys.argv[0], *rest])
    else:
        sys.exit(run_mutations(args.cases, args.seed, args.limit_s))
