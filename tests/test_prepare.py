"""The embedded default model: GGUF -> Hugging Face layout -> our checkpoint."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from hub import download_gguf, undo_rope_permute


def test_config_describes_smollm2(smollm2_dir):
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["vocab_size"], cfg["rope_theta"], cfg["tie_word_embeddings"]) == (30, 576, 9, 3, 49152, 100000.0, True)
    assert cfg["rms_norm_eps"] == 1e-5


@pytest.mark.slow
def test_weights_equal_transformers_own_gguf_loader(smollm2_dir, tmp_path):
    """transformers reads GGUF files itself (undoing llama.cpp's Q/K row order its own way): our
    dequantized Hugging Face weights must be identical to what it loads."""
    from transformers import AutoModelForCausalLM
    gguf_path = download_gguf(tmp_path)  # pip's cache makes this second download cheap
    ref = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    ref_state = ref.state_dict()
    ours = load_file(str(smollm2_dir / "model.safetensors"))
    assert set(ours) | {"lm_head.weight"} == set(ref_state)
    for name, tensor in ours.items():
        assert torch.equal(tensor, ref_state[name]), name


def test_undo_rope_permute_inverts_llama_cpp_permutation():
    n_heads, head_dim, cols = 3, 8, 5
    w = np.arange(n_heads * head_dim * cols, dtype=np.float32).reshape(n_heads * head_dim, cols)
    # llama.cpp's converter: per head, interleave the two rotary halves row by row.
    permuted = w.reshape(n_heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(undo_rope_permute(permuted, n_heads), w)
    assert not np.array_equal(permuted, w)


def test_tokenizer_splits_every_digit(smollm2_dir):
    from tokenizer import load_tokenizer
    tok = load_tokenizer(smollm2_dir)
    ids = tok.encode("In 2024, 1234567 people paid $99.95 each")
    pieces = [tok.decode([i]) for i in ids]
    digits = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digits == list("2024") + list("1234567") + list("9995")
    assert not tok.add_bos and tok.eos_id == 2 and tok.chat_format == "chatml"


def test_prepare_from_a_local_wheel_is_atomic(tmp_path, monkeypatch):
    import hub

    def fails(gguf_path, out_dir):
        (out_dir).mkdir(parents=True)
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise ValueError("simulated failure")
    monkeypatch.setattr(hub, "gguf_to_hf", fails)
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    target = tmp_path / "out" / "SmolLM2"
    with pytest.raises(ValueError, match="simulated"):
        hub.prepare_default_model(target, fake)
    assert not target.exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_prepare_cli_rejects_a_missing_source(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_smollm2.py"), "--source",
                        str(tmp_path / "nope.whl"), "--output_dir", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "does not exist" in r.stderr
    assert not (tmp_path / "o").exists()
