"""Pretrained weights: safetensors files whose metadata carries config and provenance.

Metadata keys (all strings):

- ``format``: weights format version (``"1"``);
- ``config``: :class:`~bdcodec.model.ModelConfig` as JSON;
- ``training``: JSON training record (data, steps, lambda range, date, compute);
- ``weights_id``: 8 hex digits, a hash of the tensors, written into every ``.bdc``
  file so that a file is never decoded with the wrong model.

Weights are found, in order, at ``--weights PATH``, ``$BDCODEC_WEIGHTS``, and the
``bdcodec.shipped`` package (the repository's ``weights/`` folder, installed with the
package by ``pip install .`` and mapped in place by ``pip install -e .``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .errors import BdcError

__all__ = ["DEFAULT_NAME", "FORMAT", "default_weights_path", "read_metadata", "save_model", "load_model", "tensors_id"]

DEFAULT_NAME = "bdcodec-base.safetensors"
FORMAT = "1"


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


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a weights file, without loading its tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise BdcError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types
        raise BdcError(f"not a safetensors weights file: {path} ({exc})") from None
    if meta.get("format") != FORMAT or "config" not in meta or "weights_id" not in meta:
        raise BdcError(f"{path} is not a bdcodec weights file (format {meta.get('format')!r})")
    return meta


def save_model(model, path: str | os.PathLike, training: dict) -> str:
    """Write ``model`` as fp32 safetensors with config and training record; returns its weights id."""
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return wid


def load_model(path: str | os.PathLike | None = None):
    """Load a :class:`~bdcodec.model.BDCodecModel` in eval mode; returns ``(model, metadata)``."""
    from safetensors.torch import load_file

    from .model import BDCodecModel, ModelConfig

    path = Path(path) if path else default_weights_path()
    meta = read_metadata(path)
    try:
        cfg = ModelConfig.from_json(meta["config"])
    except (ValueError, TypeError) as exc:
        raise BdcError(f"{path}: weights config does not match this version of bdcodec: {exc}") from None
    model = BDCodecModel(cfg)
    state = load_file(str(path))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise BdcError(f"{path}: tensors do not match the config: {first}") from None
    model.eval()
    return model, meta
