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
    m2, meta = load_model(tmp_path / "w.safetensors", trainable=True)
    assert meta["weights_id"] == wid and m2.cfg == m.cfg
    assert list(m2.state_dict()) == list(m.state_dict())
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    # the coding model keeps of the hyperprior only its tables, and needs no CompressAI
    coder, _ = load_model(tmp_path / "w.safetensors")
    full = m.state_dict()
    kept = {k for k in coder.state_dict() if k.startswith("entropy_bottleneck.")}
    assert kept == {f"entropy_bottleneck.{k}" for k in ("quantiles", "_offset", "_quantized_cdf", "_cdf_length")}
    assert not any(k.startswith("gaussian.") for k in coder.state_dict())
    for k, b in coder.state_dict().items():
        assert torch.equal(full[k], b), k


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


def test_sharded_weights_join_and_refuse_missing_or_mixed_shards(tmp_path):
    torch.manual_seed(0)
    m = BDCodecModel()
    wid = save_model(m, tmp_path / "w.safetensors", {"stages": []}, max_shard_bytes=8 * 2**20)
    shards = sorted(tmp_path.glob("w-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (tmp_path / "w.safetensors").exists()
    assert all(s.stat().st_size <= 8 * 2**20 for s in shards) and sum(s.stat().st_size for s in shards) > 24 * 2**20
    for name in (tmp_path / "w.safetensors", shards[1]):  # the plain name or any shard
        m2, meta = load_model(name)
        assert meta["weights_id"] == wid
        assert all(torch.equal(m.state_dict()[k], b) for k, b in m2.state_dict().items())
    # a shard of other weights in the set is caught by the id check
    other = BDCodecModel()
    save_model(other, tmp_path / "o.safetensors", {"stages": []}, max_shard_bytes=8 * 2**20)
    shards[0].write_bytes(sorted(tmp_path.glob("o-*-of-*.safetensors"))[0].read_bytes())
    with pytest.raises(BdcError, match="do not join"):
        load_model(tmp_path / "w.safetensors")
    shards[-1].unlink()
    with pytest.raises(BdcError, match="shard missing"):
        load_model(tmp_path / "w.safetensors")


def test_a_retrained_diffusion_decoder_reads_the_files_of_its_parent_and_nothing_else(tmp_path):
    import numpy as np

    from bdcodec.codec import Codec
    from bdcodec.weights import lineage

    torch.manual_seed(0)
    m = BDCodecModel()
    pid = save_model(m, tmp_path / "parent.safetensors", {"stages": []})
    parent = lineage(tmp_path / "parent.safetensors")
    assert parent["reads"] == [pid]
    with torch.no_grad():
        next(m.denoiser.parameters()).add_(0.01)
    cid = save_model(m, tmp_path / "child.safetensors", {"stages": []}, parent=parent)
    assert cid != pid and json.loads(read_metadata(tmp_path / "child.safetensors")["reads"]) == [pid]
    with torch.no_grad():  # a decoder retrained again reads the files of both
        next(m.texture.parameters()).add_(0.01)
    save_model(m, tmp_path / "grandchild.safetensors", {"stages": []}, parent=lineage(tmp_path / "child.safetensors"))
    assert json.loads(read_metadata(tmp_path / "grandchild.safetensors")["reads"]) == [cid, pid]
    with torch.no_grad():
        next(m.g_s.parameters()).add_(0.01)
    save_model(m, tmp_path / "other.safetensors", {"stages": []}, parent=parent)
    assert "reads" not in read_metadata(tmp_path / "other.safetensors")

    px = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    old = Codec(tmp_path / "parent.safetensors", "cpu", threads=1)
    data = old.encode(px, quality=0, mode="fidelity")
    want, _ = old.decode(data)
    got, _ = Codec(tmp_path / "child.safetensors", "cpu", threads=1).decode(data)
    assert np.array_equal(got, want)
    with pytest.raises(BdcError, match=f"made with weights {pid}"):
        Codec(tmp_path / "other.safetensors", "cpu", threads=1).decode(data)


def test_a_retrained_encoder_reads_the_files_of_its_parent(tmp_path):
    """g_a, h_a and the gains never run in a decode: weights that differ only there read the parent's
    files, to the same pixels, and write files of their own id."""
    import numpy as np

    from bdcodec import container
    from bdcodec.codec import Codec
    from bdcodec.weights import lineage

    torch.manual_seed(0)
    m = BDCodecModel()
    pid = save_model(m, tmp_path / "parent.safetensors", {"stages": []})
    with torch.no_grad():
        for part in (m.h_a, m.g_a):
            next(part.parameters()).add_(0.01)
        m.gain.mul_(1.01)
    cid = save_model(m, tmp_path / "child.safetensors", {"stages": []}, parent=lineage(tmp_path / "parent.safetensors"))
    assert json.loads(read_metadata(tmp_path / "child.safetensors")["reads"]) == [pid]
    px = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    parent, child = (Codec(tmp_path / f"{n}.safetensors", "cpu", threads=1) for n in ("parent", "child"))
    data = parent.encode(px, quality=0, mode="fidelity")
    assert np.array_equal(child.decode(data)[0], parent.decode(data)[0])
    assert container.unpack(child.encode(px, quality=0, mode="fidelity"))[0].weights_id == cid


def test_a_halved_copy_keeps_gdn_in_fp32_and_reads_nothing_of_its_source(tmp_path):
    import runpy

    from .conftest import ROOT

    half = runpy.run_path(str(ROOT / "scripts" / "half-weights.py"))
    torch.manual_seed(0)
    src, dst = tmp_path / "w.safetensors", tmp_path / "h.safetensors"
    save_model(BDCodecModel(), src, {"stages": []}, parent=None)
    meta = read_metadata(src)
    save_file(load_file(str(src)), str(src), metadata={**meta, "reads": json.dumps(["0badc0de"])})
    half["main"](str(src), str(dst))
    state, hmeta = load_file(str(dst)), read_metadata(dst)
    assert state["g_a.6.weight"].dtype == torch.float16
    assert all(v.dtype != torch.float16 for k, v in state.items() if "gdn" in k or k.startswith("entropy_bottleneck."))
    assert state["g_a.0.gdn.beta_reparam.pedestal"].item() > 0  # 0 in fp16: training turns NaN
    assert hmeta["weights_id"] != meta["weights_id"] and "reads" not in hmeta
    model, _ = load_model(dst, trainable=True)
    model.entropy_bottleneck.update(force=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())
