"""convert_hf_checkpoint.py: every input layout, and bad input that must fail cleanly."""
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from checkpoint import CheckpointError, load_model, read_metadata
from conftest import REPO, save_tiny_hf, tiny_hf_config
from convert_hf_checkpoint import convert


def logits_equal(model, hf, vocab=96):
    ids = torch.randint(0, vocab, (1, 12))
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids)
    return ((out - ref).abs().max() / ref.abs().max()).item() < 1e-4


def leftovers(d):
    """Files a failed conversion must not leave behind."""
    return [p.name for p in d.iterdir() if p.name == "checkpoint.safetensors" or ".tmp" in p.name]


def test_sharded_safetensors(tmp_path):
    hf = save_tiny_hf(tmp_path, tiny_hf_config(), max_shard_size="60KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert logits_equal(load_model(convert(tmp_path)), hf)


@pytest.mark.parametrize("tied, legacy", [(False, False), (True, False), (False, True)])
def test_pytorch_bin(tmp_path, tied, legacy):
    """pytorch_model.bin in the zip format (memory-mapped) and the legacy pre-1.6 format (read whole)."""
    hf = save_tiny_hf(tmp_path, tiny_hf_config(tie_word_embeddings=tied), safe_serialization=False, legacy_bin=legacy)
    assert not list(tmp_path.glob("*.safetensors"))
    assert ((tmp_path / "pytorch_model.bin").read_bytes()[:4] == b"PK\x03\x04") is not legacy
    out = convert(tmp_path)
    assert logits_equal(load_model(out), hf)
    with safe_open(str(out), "pt") as f:  # a tied head is stored once
        assert ("output.weight" in f.keys()) is not tied


def test_old_config_shape_and_output_dir(tmp_path):
    cfg = tiny_hf_config()
    del cfg["rope_parameters"]
    cfg.update(rope_theta=5000.0, rope_scaling={"type": "linear", "factor": 2.0})
    hf = save_tiny_hf(tmp_path / "hf", cfg)
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    out = convert(tmp_path / "hf", tmp_path / "ours", dtype="bfloat16")
    assert out.parent == tmp_path / "ours"
    assert (tmp_path / "ours" / "tokenizer.json").is_file() and (tmp_path / "ours" / "config.json").is_file()
    meta = read_metadata(out)
    assert meta["config"]["rope_theta"] == 5000.0
    assert meta["config"]["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    model = load_model(out, dtype=torch.float32)
    assert model.tok_embeddings.weight.dtype == torch.float32
    with safe_open(str(out), "pt") as f:
        assert f.get_tensor("norm.weight").dtype == torch.bfloat16
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():  # bf16 storage: close, not exact
        ref, got = hf(ids).logits, model(ids)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 3e-2


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert(tmp_path)


def test_missing_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_hf_config()))
    with pytest.raises(FileNotFoundError, match="no weights"):
        convert(tmp_path)


def test_missing_shard(tmp_path):
    save_tiny_hf(tmp_path, tiny_hf_config(), max_shard_size="60KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        convert(tmp_path)
    assert leftovers(tmp_path) == []


def test_unknown_architecture_is_refused_before_reading_weights(tmp_path):
    save_tiny_hf(tmp_path, tiny_hf_config())
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture"):
        convert(tmp_path)
    assert leftovers(tmp_path) == []


def test_truncated_safetensors(tmp_path):
    save_tiny_hf(tmp_path, tiny_hf_config())
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        convert(tmp_path)
    assert leftovers(tmp_path) == []


def test_shape_mismatch_with_config(tmp_path):
    save_tiny_hf(tmp_path, tiny_hf_config())
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape"):
        convert(tmp_path)
    assert leftovers(tmp_path) == []


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickles_are_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(tiny_hf_config()))
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.norm.weight": _Evil()}, f)
    with pytest.raises(ValueError, match="weights-only"):
        convert(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import checkpoint
    save_tiny_hf(tmp_path, tiny_hf_config())

    def dies_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "save_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        convert(tmp_path)
    assert leftovers(tmp_path) == []


def test_loading_a_plain_safetensors_file_is_refused(tmp_path):
    save_tiny_hf(tmp_path, tiny_hf_config())
    with pytest.raises(CheckpointError, match="not a layerskip-llama checkpoint"):
        load_model(tmp_path / "model.safetensors")


def test_corrupt_converted_checkpoint_is_refused(tmp_path):
    save_tiny_hf(tmp_path, tiny_hf_config())
    out = convert(tmp_path)
    out.write_bytes(out.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(out)


def test_cli_reports_errors_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "convert_hf_checkpoint.py"), "--checkpoint_dir", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "error:" in r.stderr and "config.json" in r.stderr and "Traceback" not in r.stderr
