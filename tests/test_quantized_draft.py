"""Self-speculation with drafts from a quantized copy of the model's own layers (--draft_quantize):
greedy output equals the full-precision model's greedy decoding, sampling keeps its distribution,
and the draft's KV cache is its own or the model's (Transformer.share_caches, the engine's way)."""
import re

import pytest
import torch

from conftest import assert_varied, block_graphs, regional_graphs
from decoding import generate, speculative_generate
from steps import compile_steps, draft_step
from quantized import Int4Linear, Int8Linear, quantized_copy
from sampling import SamplingParams
from test_decoding import GREEDY, rand_prompt, random_model, run_cli


@pytest.mark.parametrize("scheme", [("int8", 128), ("int4", 32)])
@pytest.mark.parametrize("exit_layer", [1, 2, 3, 4])
@pytest.mark.parametrize("cache", ["own", "the model's"])
def test_tiny_quantized_draft_greedy_equals_autoregressive(scheme, exit_layer, cache):
    """Every E, the whole model (E = L = 4) included, and k from 1 to past the token budget's
    rounds; the draft with a cache of its own, or drafting into the model's (as the engine sets it
    up: Transformer.share_caches), where no round catches up."""
    model = random_model()
    draft = quantized_copy(model, *scheme, n_layers=exit_layer if exit_layer % 2 else None)  # E < layers too
    model.setup_caches(1, 128)
    if cache == "own":
        draft.setup_caches(1, 128)
    else:
        draft.share_caches(model)
    histogram_ends = [0, 0]
    for k in (1, 2, 3, 4, 6, 12):
        for seed in range(2):
            prompt = rand_prompt(5 + seed, seed=seed)
            ref, _ = generate(model, prompt, 30, GREEDY)
            assert_varied(ref[0, len(prompt):])
            out, stats = speculative_generate(model, prompt, 30, GREEDY, k, exit_layer=exit_layer, draft_model=draft)
            assert out.tolist() == ref.tolist(), (k, seed)
            if cache != "own":
                assert stats.catch_ups == 0
            histogram_ends[0] += stats.accepted_histogram[0]
            histogram_ends[1] += sum(stats.accepted_histogram[1:])
    assert histogram_ends[1] > 0  # drafts were kept
    if exit_layer < 4:
        assert histogram_ends[0] > 0  # and rejected at once


def test_a_draft_sharing_the_model_caches_holds_none_of_its_own():
    model = random_model()
    draft = quantized_copy(model, "int8", n_layers=2)
    model.setup_caches(2, 64)
    assert not draft.shares_caches_with(model)
    draft.share_caches(model)
    assert draft.shares_caches_with(model) and (draft.max_batch_size, draft.max_seq_length) == (2, 64)
    assert all(d.attention.kv_cache is m.attention.kv_cache for d, m in zip(draft.layers, model.layers))
    assert draft.rope_cos is model.rope_cos and draft.causal_mask is model.causal_mask
    model.setup_caches(3, 64)  # new caches: the draft shares them only once told again
    assert not draft.shares_caches_with(model)
    draft.share_caches(model)
    assert draft.shares_caches_with(model) and draft.max_batch_size == 3
    draft.setup_caches(3, 64)  # the same size: caches of its own all the same
    assert not draft.shares_caches_with(model) and not draft.borrows_caches
    assert all(d.attention.kv_cache is not m.attention.kv_cache for d, m in zip(draft.layers, model.layers))


def test_quantized_copy_shares_only_what_it_does_not_quantize():
    model = random_model()
    draft = quantized_copy(model, "int8", n_layers=2)
    assert len(draft.layers) == 2 and isinstance(draft.output, Int8Linear)
    assert isinstance(draft.layers[1].feed_forward.w13, Int8Linear)
    assert draft.tok_embeddings.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
    assert draft.norm.weight.data_ptr() == model.norm.weight.data_ptr()
    assert isinstance(quantized_copy(model, "int4", 32).layers[3].attention.wo, Int4Linear)
    assert isinstance(model.layers[0].attention.wqkv.weight, torch.nn.Parameter)  # the model is untouched
    with pytest.raises(ValueError, match="5 layers of a 4-layer model"):
        quantized_copy(model, "int8", n_layers=5)


def test_the_draft_never_touches_the_models_kv_cache():
    model = random_model()
    draft = quantized_copy(model, "int8")
    model.setup_caches(1, 64)
    draft.setup_caches(1, 64)
    caches = lambda m: [t for layer in m.layers for t in (layer.attention.kv_cache.k_cache,  # noqa: E731
                                                           layer.attention.kv_cache.v_cache)]
    model_ptrs = {t.data_ptr() for t in caches(model)}
    assert not model_ptrs & {t.data_ptr() for t in caches(draft)}
    prompt = rand_prompt(6)
    generate(model, prompt, 1, GREEDY)  # the model's prefill: its cache holds the prompt
    before = [t.clone() for t in caches(model)]
    # everything the loop asks of the draft: its prefill, draft steps, a catch-up step
    generate(draft, prompt, 12, GREEDY, exit_layer=3)
    x = torch.tensor([[7]])
    for pos in range(18, 22):
        x = draft_step(draft, x, torch.tensor([pos]), GREEDY, 3)[0]
    assert all(torch.equal(a, b) for a, b in zip(before, caches(model)))
    assert caches(draft)[0][0, :, :22].abs().sum() > 0  # the draft did write its own
    # and a whole generation leaves the model's cache as greedy decoding does on the positions kept
    ref, _ = generate(model, prompt, 20, GREEDY)
    kept = [t[:, :, :len(prompt) + 19].clone() for t in caches(model)]
    for t in caches(model):
        t.zero_()
    out, _ = speculative_generate(model, prompt, 20, GREEDY, 3, draft_model=draft)
    assert out.tolist() == ref.tolist()
    assert all(torch.allclose(a, b[:, :, :a.shape[2]], atol=1e-5) for a, b in zip(kept, caches(model)))


def test_a_draft_in_the_models_cache_leaves_what_greedy_decoding_leaves():
    """Drafting into the model's cache, the draft's keys and values at the drafted positions are
    all rewritten by the verify passes: at every kept position the cache ends as greedy
    decoding leaves it (the n-gram and plain rounds of auto, verified over every layer, too)."""
    model = random_model()
    draft = quantized_copy(model, "int8")
    model.setup_caches(1, 64)
    draft.share_caches(model)
    caches = [t for layer in model.layers for t in (layer.attention.kv_cache.k_cache, layer.attention.kv_cache.v_cache)]
    prompt = torch.tensor((rand_prompt(8).tolist() * 2)[:12])  # repeats: n-gram proposals too
    ref, _ = generate(model, prompt, 20, GREEDY)
    kept = [t[:, :, :len(prompt) + 19].clone() for t in caches]
    for source in ("model", "auto"):
        for t in caches:
            t.normal_(0, 1e3)
        out, stats = speculative_generate(model, prompt, 20, GREEDY, 3, draft_model=draft, draft_source=source)
        assert out.tolist() == ref.tolist() and stats.catch_ups == 0 and stats.accepted_per_round
        assert all(torch.allclose(a, b[:, :, :a.shape[2]], atol=1e-5) for a, b in zip(kept, caches)), source


@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(0.8, top_k=3)])
def test_quantized_draft_sampling_matches_autoregressive_distribution(params):
    """test_decoding's sampling test with an int4 draft of one layer (it disagrees often)."""
    from test_decoding import check_speculative_sampling
    E = 1
    model = random_model(n_layers=3, vocab=8, dim=32, seed=3, scale=0.35)
    draft = quantized_copy(model, "int4", 32, n_layers=E)
    model.setup_caches(1, 16)
    draft.share_caches(model) if params.top_k else draft.setup_caches(1, 16)  # the model's cache, or its own
    check_speculative_sampling(model, draft, params, exit_layer=E, draft_model=draft)


@pytest.mark.slow
def test_tiny_compiled_quantized_draft_equals_autoregressive_without_recompiling():
    model = random_model(dim=56, vocab=88)  # a shape no other test compiles
    draft = quantized_copy(model, "int8")
    model.setup_caches(1, 96)
    draft.setup_caches(1, 96)
    steps = compile_steps(torch.device("cpu"))
    before = block_graphs()
    for i in range(3):
        prompt = rand_prompt(4 + 3 * i, vocab=88, seed=i)
        ref, _ = generate(model, prompt, 30, GREEDY)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            out, stats = speculative_generate(model, prompt, 30, GREEDY, 3, exit_layer=3, draft_model=draft,
                                              steps=steps)
        assert out.tolist() == ref.tolist()
        assert stats.acceptance_rate > 0 and stats.catch_ups > 0
    # the layers' graphs of the draft step, the catch-up (2 rows; compiled with the draft's prefill,
    # not in the middle of the loop) and the verify pass over the 4 float layers (4 rows), made once
    assert block_graphs() - before == regional_graphs((0, 3, 1), (0, 3, 2)) + regional_graphs((0, 4, 4)) == 3


@pytest.mark.slow
def test_smollm2_quantized_drafts_equal_autoregressive(smollm2, smollm2_dir):
    """Eager: int8 and int4 drafts of the whole model drafting into its cache (the engine's way),
    and an int8 draft of 24 layers with its own, on real prompts."""
    from test_decoding import SMOL_PROMPTS
    from tokenizer import load_tokenizer
    tok = load_tokenizer(smollm2_dir)
    smollm2.setup_caches(1, 160)
    for scheme, E, k in [(("int8", 128), None, 4), (("int4", 32), None, 3), (("int8", 128), 24, 2)]:
        draft = quantized_copy(smollm2, *scheme, n_layers=E)
        draft.share_caches(smollm2) if E is None else draft.setup_caches(1, 160)
        for text in SMOL_PROMPTS[1:3]:
            prompt = torch.tensor(tok.encode(text))
            ref, _ = generate(smollm2, prompt, 24, GREEDY)
            out, stats = speculative_generate(smollm2, prompt, 24, GREEDY, k, exit_layer=E, draft_model=draft)
            assert out.tolist() == ref.tolist(), (scheme, E, k)
            if E is None:  # the model's own weights, all of them, draft well
                assert stats.acceptance_rate > 0.6, stats.acceptance_rate


@pytest.mark.slow
def test_smollm2_compiled_quantized_draft_equals_autoregressive(smollm2, smollm2_dir, smollm2_steps):
    """Compiled: an int8 copy of 6 layers drafts into the model's cache (small graphs, quick to
    compile), the float32 model verifies through its 30 layers; the second prompt reuses every
    graph."""
    from test_decoding import SMOL_PROMPTS
    from tokenizer import load_tokenizer
    tok = load_tokenizer(smollm2_dir)
    smollm2.setup_caches(1, 160)
    draft = quantized_copy(smollm2, "int8", n_layers=6)
    draft.share_caches(smollm2)
    for i, text in enumerate(SMOL_PROMPTS[3:5]):
        prompt = torch.tensor(tok.encode(text))
        ref, _ = generate(smollm2, prompt, 24, GREEDY)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            out, _ = speculative_generate(smollm2, prompt, 24, GREEDY, 3, draft_model=draft, steps=smollm2_steps)
        assert out.tolist() == ref.tolist()


@pytest.mark.slow
def test_cli_quantized_draft_matches_autoregressive(tiny_smol_dir):
    common = ["--checkpoint_path", str(tiny_smol_dir), "--prompt", "Hello", "--max_new_tokens", "24",
              "--num_samples", "1", "--temperature", "0"]
    ar = run_cli(*common)
    spec = run_cli(*common, "--generation_strategy", "self_speculative", "--draft_quantize", "int8",
                   "--num_speculations", "4")
    assert ar.returncode == 0 and spec.returncode == 0, spec.stderr
    assert spec.stdout == ar.stdout
    assert "Draft: int8 copy of layers [0, 3) and the LM head" in spec.stderr
    assert "acceptance rate" in spec.stderr


@pytest.mark.parametrize("flags, message", [
    (["--draft_quantize", "int8"], "--draft_quantize needs --generation_strategy self_speculative"),
    (["--generation_strategy", "self_speculative", "--draft_quantize", "int9"], "unknown quantization 'int9'"),
    (["--generation_strategy", "self_speculative", "--draft_quantize", "int8", "--exit_layer", "4"],
     r"--exit_layer must be in \[1, 3\]"),
    (["--generation_strategy", "self_speculative", "--exit_layer", "3"], r"--exit_layer must be in \[1, 2\]"),
])
def test_cli_refuses_impossible_draft_options(tiny_smol_dir, flags, message):
    r = run_cli("--checkpoint_path", str(tiny_smol_dir), "--max_new_tokens", "4", *flags)
    assert r.returncode != 0 and re.search(message, r.stderr), r.stderr
