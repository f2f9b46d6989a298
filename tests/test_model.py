"""Logits parity with transformers' LlamaForCausalLM, and the layer-range API."""
import pytest
import torch

from model import ModelArgs, rope_inv_freq

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}

CONFIGS = {
    "gqa": {},
    "mha": {"num_key_value_heads": 4},
    "tied": {"tie_word_embeddings": True},
    "llama3_rope": {"rope_parameters": {"rope_theta": 500000.0, **LLAMA3_ROPE}},
    "unusual_theta_mqa": {"rope_parameters": {"rope_type": "default", "rope_theta": 1234.5},
                          "num_key_value_heads": 1},
    "head_dim_not_dim_over_heads": {"head_dim": 32},
}


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers_prefill_and_decode(tiny_checkpoint, name):
    model, hf = tiny_checkpoint(**CONFIGS[name])
    torch.manual_seed(1)
    ids = torch.randint(0, 96, (2, 40))
    with torch.no_grad():
        ref = hf(ids).logits
        model.setup_caches(2, 64)
        prefill = model(ids[:, :32], torch.arange(32))
        assert rel_err(prefill, ref[:, :32]) < 1e-4
        for pos in range(32, 40):  # decode steps, one token at a time, through the KV cache
            step = model(ids[:, pos:pos + 1], torch.tensor([pos]))
            assert rel_err(step[:, 0], ref[:, pos]) < 1e-4
        assert rel_err(model(ids), ref) < 1e-4  # cache-free path (training / scoring)


def test_smollm2_logits_match_transformers(smollm2, smollm2_hf):
    ids = torch.tensor([[504, 3458, 282, 4649, 314, 260, 1345, 30, 378, 4209, 28, 9891]])
    with torch.no_grad():
        ref = smollm2_hf(torch.cat([ids, ids.flip(1)], 1)).logits
        smollm2.setup_caches(1, 32)
        out = smollm2(ids, torch.arange(12))
        assert rel_err(out[:, -1], ref[:, 11]) < 1e-4
        for i, tok in enumerate(ids.flip(1)[0, :6]):
            step = smollm2(tok.view(1, 1), torch.tensor([12 + i]))
            assert rel_err(step[:, 0], ref[:, 12 + i]) < 1e-4


def test_llama3_rope_frequencies_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=1024,
                      rope_parameters={"rope_theta": 500000.0, **LLAMA3_ROPE})
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = rope_inv_freq(ModelArgs.from_hf_config(cfg.to_dict()))
    torch.testing.assert_close(ours, ref)
    assert not torch.allclose(ours, rope_inv_freq(ModelArgs.from_hf_config({**cfg.to_dict(), "rope_parameters": {
        "rope_type": "default", "rope_theta": 500000.0}})))


def test_both_config_shapes_give_the_same_args():
    from conftest import tiny_hf_config
    new = tiny_hf_config(rope_parameters={"rope_theta": 500000.0, **LLAMA3_ROPE})
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    old["rope_theta"] = 500000.0
    old["rope_scaling"] = dict(LLAMA3_ROPE)
    assert ModelArgs.from_hf_config(new) == ModelArgs.from_hf_config(old)
    legacy_type_key = {**old, "rope_scaling": {**{k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"},
                                               "type": "llama3"}}
    assert ModelArgs.from_hf_config(legacy_type_key) == ModelArgs.from_hf_config(new)
    args = ModelArgs.from_hf_config(new)
    assert args.rope_theta == 500000.0 and args.rope_scaling["rope_type"] == "llama3"


@pytest.mark.parametrize("bad, match", [
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "only Llama"),
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "unsupported rope_type"),
    ({"num_key_value_heads": 3}, "not a multiple"),
])
def test_bad_configs_are_refused(bad, match):
    from conftest import tiny_hf_config
    with pytest.raises(ValueError, match=match):
        ModelArgs.from_hf_config(tiny_hf_config(**bad))


def test_a_prefill_in_chunks_into_a_long_cache_reads_every_written_position(tiny_checkpoint):
    """An eager prefill of more than FIXED_ORDER_ROWS tokens attends over the positions written so
    far only (run_layers narrows the mask, the attention the keys): a second chunk must still see
    the first, and a cache far longer than the prompt changes nothing."""
    model, hf = tiny_checkpoint()
    torch.manual_seed(2)
    ids = torch.randint(0, 96, (1, 40))
    with torch.no_grad():
        ref = hf(ids).logits
        model.setup_caches(1, model.args.max_position_embeddings)
        first = model(ids[:, :20], torch.arange(20))
        second = model(ids[:, 20:], torch.arange(20, 40))
    assert model.max_seq_length >= 3 * 40
    assert rel_err(first, ref[:, :20]) < 1e-4 and rel_err(second, ref[:, 20:]) < 1e-4


def test_layer_ranges_compose_to_the_full_model(tiny_checkpoint):
    model, _ = tiny_checkpoint()
    ids = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        model.setup_caches(1, 16)
        full = model(ids, torch.arange(10))
        model.setup_caches(1, 32)  # fresh cache
        h = model.embed(ids)
        h = model.run_layers(h, torch.arange(10), 0, 1)
        h = model.run_layers(h, torch.arange(10), 1, 4)
        torch.testing.assert_close(model.head(h), full)


def test_decoding_without_setup_caches_is_a_clear_error(tiny_checkpoint):
    model, _ = tiny_checkpoint()
    with pytest.raises(RuntimeError, match="setup_caches"):
        model(torch.zeros(1, 1, dtype=torch.long), torch.tensor([0]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.setup_caches(1, 10_000)


def test_loaded_float_weights_are_packed_and_a_tied_table_is_the_heads(tiny_checkpoint, tmp_path):
    """load_model packs float32 linears into the kernels' lanes layout (model.Linear.pack); a tied
    embedding table is then the head's packed tensor, from which Transformer.embed gathers a
    token's row exactly. Quantizing such a model in memory gives the model that quantizing the
    [N, K] weights gives (load_model(..., trainable=True) keeps that layout)."""
    import cpu_kernels
    from checkpoint import load_model
    from convert_hf_checkpoint import convert
    from quantized import Int8Linear, quantize_model
    if not cpu_kernels.float_lanes():
        pytest.skip("this build has the rows' layout only")
    model, hf = tiny_checkpoint(tie_word_embeddings=True)
    assert model.output.weight.dim() == 3 and model.layers[0].feed_forward.w13.weight.dim() == 3
    assert model.tok_embeddings.weight is model.output.weight
    table = hf.get_input_embeddings().weight.detach()
    idx = torch.tensor([[0, 5, 17, 95], [3, 3, 64, 1]])
    assert torch.equal(model.embed(idx), table[idx])
    plain = load_model(convert(tmp_path / "hf"), trainable=True)
    assert plain.output.weight.shape == (96, 64)
    quantize_model(model, "int8")
    quantize_model(plain, "int8")
    assert isinstance(model.output, Int8Linear) and torch.equal(model.tok_embeddings.weight, table)
    with torch.no_grad():
        assert torch.equal(model(idx), plain(idx))


def test_a_packed_model_keeps_no_mapping_of_its_checkpoint(tiny_checkpoint, tmp_path):
    """Packed float32 weights are new memory: load_model reads the tensors into memory of their own,
    so no view of the file's mapping (a norm's) keeps the packed-over pages mapped; a trainable load
    keeps the lazy mapping."""
    import gc
    import os
    import cpu_kernels
    from checkpoint import load_model
    if not cpu_kernels.float_lanes() or not os.path.exists("/proc/self/maps"):
        pytest.skip("needs the lanes layout and Linux's /proc")
    model, _ = tiny_checkpoint()
    path = next(tmp_path.rglob("checkpoint.safetensors"))
    gc.collect()

    def mapped():
        with open("/proc/self/maps") as f:
            return str(path.resolve()) in f.read()
    assert model.layers[0].attention.wo.weight.dim() == 3 and not mapped()
    plain = load_model(path, trainable=True)
    assert plain.norm.weight.dim() == 1 and mapped()
