"""Pretrained weights: safetensors files whose metadata carries config and provenance.

Metadata keys (all strings):

- ``format``: weights format version (``"1"``);
- ``config``: :class:`~bdcodec.model.ModelConfig` as JSON;
- ``training``: JSON training record (data, steps, lambda range, date, compute);
- ``weights_id``: 8 hex digits, a hash of the tensors, written into every ``.bdc``
  file so that a file is never decoded with the wrong model;
- ``reads`` (optional): JSON list of the ids of earlier weights whose files these
  weights decode exactly as those did in fidelity mode: the same tensors but for the
  diffusion decoder (texture branch and denoiser), which only renders the perceptual
  decode, and the encoder's (g_a, h_a and the gains), which no
  decode runs.  A retrained diffusion decoder or encoder so keeps every existing file
  readable.

A model larger than a transfer limit can be written as shards
``NAME-00001-of-00002.safetensors`` ...: each holds some of the tensors and the
same metadata; ``load_model("NAME.safetensors")`` (or any shard's path) joins them
and checks the joined tensors against the weights id.

Weights are found, in order, at ``--weights PATH``, ``$BDCODEC_WEIGHTS``, and the
``bdcodec.shipped`` package (the repository's ``weights/`` folder, installed with the
package by ``pip install .`` and mapped in place by ``pip install -e .``).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from pathlib import Path

from .errors import BdcError

__all__ = ["DEFAULT_NAME", "DECODER_PARTS", "ENCODER_PARTS", "FORMAT", "codec_id", "default_weights_path", "lineage",
           "read_metadata", "reads", "save_model", "load_model", "tensors_id", "weight_files"]

DEFAULT_NAME = "bdcodec-base.safetensors"
FORMAT = "1"
# The tensors of the diffusion decoder: everything else decides what a file's bytes mean.
DECODER_PARTS = ("denoiser.", "texture.")
#: Tensors only the encoder uses: files decode the same whatever they hold.
ENCODER_PARTS = ("g_a.", "h_a.", "gain")


def default_weights_path() -> Path:
    env = os.environ.get("BDCODEC_WEIGHTS")
    if env:
        return Path(env)
    try:
        from importlib.resources import files

        candidate = Path(str(files("bdcodec.shipped") / DEFAULT_NAME))
        if candidate.exists():
            return candidate
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parent.parent / "weights" / DEFAULT_NAME


def tensors_id(state: dict) -> str:
    """Hash of the tensors (names, shapes, dtypes and bytes), as 8 hex digits."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].contiguous().cpu()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:8]


def codec_id(state: dict) -> str:
    """:func:`tensors_id` of the tensors a fidelity decode uses: not the diffusion decoder's, nor the encoder's."""
    return tensors_id({k: v for k, v in state.items() if not k.startswith(DECODER_PARTS + ENCODER_PARTS)})


def reads(meta: dict) -> list[str]:
    """The ids of earlier weights whose files the weights with metadata ``meta`` decode."""
    try:
        ids = json.loads(meta.get("reads", "[]"))
    except ValueError:
        return []
    return [i for i in ids if isinstance(i, str) and re.fullmatch(r"[0-9a-f]{8}", i)]


def lineage(path: str | os.PathLike) -> dict:
    """What :func:`save_model` needs to let weights trained from ``path`` read its files:
    ``{"codec_id": ..., "reads": [path's id, *what path reads]}``."""
    meta = read_metadata(path)
    return {"codec_id": codec_id(_load_state(path)), "reads": [meta["weights_id"], *reads(meta)]}


_SHARD = re.compile(r"^(?P<stem>.+)-(?P<k>\d{5})-of-(?P<n>\d{5})\.safetensors$")


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The files that make up the weights at ``path``: the file itself, or all its shards.

    ``path`` may name a single file, one shard, or the unsharded name whose shards
    ``STEM-0000k-of-0000n.safetensors`` lie beside it.  A missing shard is an error.
    """
    path = Path(path)
    m = _SHARD.match(path.name)
    if m is None:
        if path.is_file():
            return [path]
        stem = path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.name
        found = sorted(f for f in path.parent.glob(f"{glob.escape(stem)}-*-of-*.safetensors")
                       if (m := _SHARD.match(f.name)) and m["stem"] == stem)
        if not found:
            raise BdcError(f"weights file not found: {path}")
        m = _SHARD.match(found[0].name)
    n = int(m["n"])
    files = [path.parent / f"{m['stem']}-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise BdcError(f"weights shard missing: {path.parent / missing[0]} ({n} shards expected)")
    return files


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a weights file (the first shard of sharded weights), without loading tensors."""
    from safetensors import safe_open

    path = weight_files(path)[0]
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types
        raise BdcError(f"not a safetensors weights file: {path} ({exc})") from None
    if meta.get("format") != FORMAT or "config" not in meta or "weights_id" not in meta:
        raise BdcError(f"{path} is not a bdcodec weights file (format {meta.get('format')!r})")
    return meta


def save_model(model, path: str | os.PathLike, training: dict, max_shard_bytes: int | None = None,
               parent: dict | None = None) -> str:
    """Write ``model`` as fp32 safetensors with config and training record; returns its weights id.

    ``parent`` is the :func:`lineage` of the weights training started from: when only the
    diffusion decoder changed since, the new weights read the files of the parent and of
    everything it reads.

    With ``max_shard_bytes``, weights larger than that are split by tensor into shards
    ``STEM-0000k-of-0000n.safetensors`` of at most that size each (header included).
    """
    import torch
    from safetensors.torch import save_file

    model.entropy_bottleneck.update(force=True)
    state = {k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).contiguous().cpu()
             for k, v in model.state_dict().items()}
    wid = tensors_id(state)
    meta = {
        "format": FORMAT,
        "config": model.cfg.to_json(),
        "training": json.dumps(training, sort_keys=True),
        "weights_id": wid,
    }
    if parent and parent.get("reads") and codec_id(state) == parent.get("codec_id"):
        meta["reads"] = json.dumps([i for i in parent["reads"] if i != wid])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    groups = _split(state, max_shard_bytes, len(json.dumps(meta))) if max_shard_bytes else [list(state)]
    if len(groups) == 1:
        targets = [path]
    else:
        stem = path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.name
        targets = [path.parent / f"{stem}-{k:05d}-of-{len(groups):05d}.safetensors" for k in range(1, len(groups) + 1)]
    for names, target in zip(groups, targets):
        tmp = target.with_name(target.name + ".tmp")
        save_file({k: state[k] for k in names}, str(tmp), metadata=meta)
        os.replace(tmp, target)
    return wid


def _split(state: dict, limit: int, meta_bytes: int) -> list[list[str]]:
    """Tensor names in groups whose files, header included, stay within ``limit`` bytes."""
    budget = limit - meta_bytes - 4096  # the header: metadata, then about 100 bytes per tensor
    groups, size = [[]], 0
    for name in state:
        n = state[name].numel() * state[name].element_size() + 160 + len(name)
        if n > budget:
            raise ValueError(f"tensor {name} ({n} bytes) does not fit a shard of {limit} bytes")
        if size + n > budget and groups[-1]:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    return groups


def _load_state(path) -> dict:
    """The tensors of the weights at ``path``, their shards joined."""
    from safetensors.torch import load_file

    state = {}
    for f in weight_files(path):
        state.update(load_file(str(f)))
    return state


def load_model(path: str | os.PathLike | None = None, trainable: bool = False):
    """Load a :class:`~bdcodec.model.BDCodecModel` in eval mode; returns ``(model, metadata)``.

    ``trainable=True`` builds the training model (with CompressAI's entropy models).
    """
    from .model import BDCodecModel, ModelConfig

    path = Path(path) if path else default_weights_path()
    meta = read_metadata(path)
    try:
        cfg = ModelConfig.from_json(meta["config"])
    except (ValueError, TypeError) as exc:
        raise BdcError(f"{path}: weights config does not match this version of bdcodec: {exc}") from None
    model = BDCodecModel(cfg, trainable=trainable)
    state = _load_state(path)
    if len(weight_files(path)) > 1 and tensors_id(state) != meta["weights_id"]:
        raise BdcError(f"{path}: shards do not join to weights {meta['weights_id']} (mixed or damaged shards)")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise BdcError(f"{path}: tensors do not match the config: {first}") from None
    model.eval()
    return model, meta
