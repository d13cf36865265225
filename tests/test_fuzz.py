import time

import numpy as np

from bdcodec.errors import BdcError

from .fuzz_bdc import _seeds, mutate


def test_mutated_files_decode_or_fail_with_bdcerror(codec):
    """A bounded run of tests/fuzz_bdc.py in CI: every case decodes or raises BdcError."""
    seeds = _seeds(codec)
    rng = np.random.default_rng(1234)
    t_end = time.time() + 40
    n = 0
    while n < 400 and time.time() < t_end:
        data = mutate(seeds[n % len(seeds)], rng)
        t0 = time.perf_counter()
        try:
            codec.decode(data, mode="fidelity", max_pixels=4096 * 4096)
        except BdcError:
            pass
        assert time.perf_counter() - t0 < 10, data.hex()
        n += 1
    assert n >= 50
