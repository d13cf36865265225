"""Write a half-size copy of a weights file, to carry as the --init of an R-D or distill stage.

    python scripts/half-weights.py IN.safetensors OUT.safetensors

Convolution and linear weights of more than 1000 values are stored in fp16; training loads them into its
fp32 parameters.  Everything else stays fp32: the GDN parameters (their pedestal, 2^-36, is 0 in fp16, and
training then turns NaN within a few steps), the z entropy bottleneck, bounds and buffers.

The copy is a different codec (its weights are rounded), so it gets its own weights id and reads no
earlier weights' files: weights trained from it never claim to decode files made with IN.  Do not start a
diffusion-only stage from it when the result should keep reading IN's files.
"""

import os
import sys

from safetensors import safe_open
from safetensors.torch import save_file

from bdcodec.errors import BdcError
from bdcodec.weights import read_metadata, tensors_id


def halved(name, t):
    return (t.is_floating_point() and t.numel() > 1000 and name.endswith((".weight", ".bias"))
            and "gdn" not in name and not name.startswith("entropy_bottleneck."))


def main(src, dst):
    if os.path.realpath(src) == os.path.realpath(dst):
        sys.exit("half-weights: OUT must not be IN")
    try:
        read_metadata(src)
    except BdcError as exc:
        sys.exit(f"half-weights: {exc}")
    with safe_open(src, framework="pt") as f:
        meta = dict(f.metadata() or {})
        state = {k: f.get_tensor(k) for k in f.keys()}
    state = {k: (t.half() if halved(k, t) else t).contiguous() for k, t in state.items()}
    meta.pop("reads", None)
    meta["weights_id"] = tensors_id({k: t.float() if t.is_floating_point() else t for k, t in state.items()})
    save_file(state, dst, metadata=meta)
    print(f"{dst}: weights id {meta['weights_id']}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/half-weights.py IN.safetensors OUT.safetensors")
    main(*sys.argv[1:])
