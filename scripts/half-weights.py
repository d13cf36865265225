"""Write a half-size copy of a weights file, to carry as the --init of an R-D or distill stage.

    python scripts/half-weights.py [-f] IN.safetensors OUT.safetensors

Convolution and linear weights of more than 1000 values are stored in fp16; training loads them into its
fp32 parameters.  Everything else stays fp32: the GDN parameters (their pedestal, 2^-36, is 0 in fp16, and
training then turns NaN within a few steps), the z entropy bottleneck, bounds and buffers.

The copy is a different codec (its weights are rounded), so it gets its own weights id and reads no
earlier weights' files: weights trained from it never claim to decode files made with IN.  Do not start a
diffusion-only stage from it when the result should keep reading IN's files.  OUT is not replaced unless
-f is given.
"""

import argparse
import os
import sys

from safetensors import safe_open
from safetensors.torch import save

from bdcodec.errors import BdcError
from bdcodec.imageio import write_output
from bdcodec.weights import read_metadata, tensors_id


def halved(name, t):
    return (t.is_floating_point() and t.numel() > 1000 and name.endswith((".weight", ".bias"))
            and "gdn" not in name and not name.startswith("entropy_bottleneck."))


def main(src, dst, force=False):
    if os.path.realpath(src) == os.path.realpath(dst):
        sys.exit("half-weights: OUT must not be IN")
    try:
        read_metadata(src)
        with safe_open(src, framework="pt") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
        state = {k: (t.half() if halved(k, t) else t).contiguous() for k, t in state.items()}
        meta.pop("reads", None)
        meta["weights_id"] = tensors_id({k: t.float() if t.is_floating_point() else t for k, t in state.items()})
        write_output(dst, save(state, metadata=meta), replace=force)
    except BdcError as exc:
        sys.exit(f"half-weights: {exc}")
    print(f"{dst}: weights id {meta['weights_id']}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python scripts/half-weights.py", description=__doc__.splitlines()[0])
    ap.add_argument("-f", "--force", action="store_true", help="replace OUT if it exists")
    ap.add_argument("src", metavar="IN.safetensors")
    ap.add_argument("dst", metavar="OUT.safetensors")
    args = ap.parse_args()
    main(args.src, args.dst, args.force)
