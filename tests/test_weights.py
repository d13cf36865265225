import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from bdcodec.errors import BdcError
from bdcodec.model import BDCodecModel, ModelConfig
from bdcodec.weights import default_weights_path, load_model, read_metadata, save_model, tensors_id


def test_shipped_weights_carry_config_record_and_a_matching_id():
    path = default_weights_path()
    meta = read_metadata(path)
    assert tensors_id(load_file(str(path))) == meta["weights_id"]
    record = json.loads(meta["training"])
    assert record["stages"] and all("total_step" in s and "data" in s for s in record["stages"])
    cfg = ModelConfig.from_json(meta["config"])
    assert sum(cfg.chunks) == cfg.M and len(set(cfg.chunks)) > 1  # uneven chunks
    assert all(v.dtype in (torch.float32, torch.int32) for v in load_file(str(path)).values())


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    m = BDCodecModel()
    wid = save_model(m, tmp_path / "w.safetensors", {"stages": []})
    m2, meta = load_model(tmp_path / "w.safetensors")
    assert meta["weights_id"] == wid and m2.cfg == m.cfg
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k


def test_bad_weights_files_are_refused_in_one_line(tmp_path):
    with pytest.raises(BdcError, match="not found"):
        load_model(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(BdcError, match="not a safetensors"):
        load_model(junk)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(plain))
    with pytest.raises(BdcError, match="not a bdcodec weights file"):
        load_model(plain)
    with pytest.raises(ValueError, match="does not know"):
        ModelConfig.from_json(json.dumps({"N": 64, "flux_capacitor": 1}))
