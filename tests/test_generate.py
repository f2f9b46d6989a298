"""Generation: greedy parity with transformers, compiled without recompiles, sampling filters, the CLI."""
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from decoding import compile_steps, generate
from sampling import SamplingParams, logits_to_probs, sample

GREEDY = SamplingParams()
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived",
    "Question: What is 17 * 23? Answer:",
]


def hf_greedy(hf, prompt_ids, n, stop_ids=()):
    """transformers' greedy continuation; with no stop_ids it always runs n tokens (-1 never matches)."""
    out = hf.generate(prompt_ids[None], max_new_tokens=n, do_sample=False, pad_token_id=0,
                      eos_token_id=sorted(stop_ids) or -1)
    return out[0].tolist()


@pytest.fixture(scope="module")
def smollm2_tok(smollm2_dir):
    from tokenizer import load_tokenizer
    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def smollm2_hf_greedy(smollm2_hf, smollm2_tok):
    """(prompt ids, transformers' 64-token greedy continuation) for each of PROMPTS, computed once."""
    prompts = [torch.tensor(smollm2_tok.encode(text)) for text in PROMPTS]
    return [(prompt, hf_greedy(smollm2_hf, prompt, 64)) for prompt in prompts]


def test_tiny_greedy_matches_transformers(tiny_checkpoint):
    model, hf = tiny_checkpoint()
    model.setup_caches(1, 64)
    for seed in range(3):
        prompt = torch.randint(3, 96, (7,), generator=torch.Generator().manual_seed(seed))
        ours, stats = generate(model, prompt, 40, GREEDY, stop_ids={2})
        assert ours[0].tolist() == hf_greedy(hf, prompt, 40, {2})
    assert stats.new_tokens == ours.shape[1] - 7


def test_stops_at_stop_token_and_keeps_it(tiny_checkpoint):
    model, _ = tiny_checkpoint()
    model.setup_caches(1, 64)
    prompt = torch.randint(3, 96, (5,))
    free, _ = generate(model, prompt, 30, GREEDY)
    stop = free[0, 5 + 10].item()  # the 11th generated token becomes a stop token
    first = free[0, 5:].tolist().index(stop)
    stopped, stats = generate(model, prompt, 30, GREEDY, stop_ids={stop})
    assert stopped[0].tolist() == free[0, : 5 + first + 1].tolist()
    assert stats.new_tokens == first + 1


def test_prompt_longer_than_cache_is_a_clear_error(tiny_checkpoint):
    model, _ = tiny_checkpoint()
    model.setup_caches(1, 16)
    with pytest.raises(ValueError, match="KV cache holds 16"):
        generate(model, torch.zeros(12, dtype=torch.long), 5, GREEDY)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(model, torch.zeros(4, dtype=torch.long), 0, GREEDY)


def test_smollm2_greedy_matches_transformers(smollm2, smollm2_hf_greedy):
    smollm2.setup_caches(1, 160)
    for prompt, ref in smollm2_hf_greedy:
        ours, _ = generate(smollm2, prompt, 64, GREEDY)
        assert len(ref) == len(prompt) + 64
        assert ours[0].tolist() == ref


def test_smollm2_compiled_greedy_matches_transformers_without_recompiling(smollm2, smollm2_hf_greedy,
                                                                        smollm2_steps):
    smollm2.setup_caches(1, 160)
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for i, (prompt, ref) in enumerate(smollm2_hf_greedy):
        # After the first generation compiled the step, any recompilation is an error.
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            ours, _ = generate(smollm2, prompt, 64, GREEDY, steps=smollm2_steps)
        assert ours[0].tolist() == ref
    # At most one graph for the decode step (none if an earlier test compiled it), for every
    # prompt length and position.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before <= 1


def test_greedy_is_deterministic_and_sampling_is_seeded(tiny_checkpoint):
    model, _ = tiny_checkpoint()
    model.setup_caches(1, 64)
    prompt = torch.randint(3, 96, (5,))
    a, _ = generate(model, prompt, 20, GREEDY)
    b, _ = generate(model, prompt, 20, GREEDY)
    assert torch.equal(a, b)
    hot = SamplingParams(temperature=1.5, top_k=50, top_p=0.95)
    torch.manual_seed(3)
    c, _ = generate(model, prompt, 20, hot)
    torch.manual_seed(3)
    d, _ = generate(model, prompt, 20, hot)
    assert torch.equal(c, d) and not torch.equal(c, a)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(temperature=1.0, top_p=0.8), SamplingParams(temperature=0.6, top_k=20, top_p=0.5),
])
def test_filters_match_transformers_warpers(params):
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    warpers = LogitsProcessorList([TemperatureLogitsWarper(params.temperature)])
    if params.top_k:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p:
        warpers.append(TopPLogitsWarper(params.top_p))
    torch.manual_seed(0)
    logits = torch.randn(4, 100) * 3
    ref = warpers(None, logits.clone()).softmax(-1)
    torch.testing.assert_close(logits_to_probs(logits, params), ref)


def test_sampling_draws_from_the_filtered_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    params = SamplingParams(temperature=1.0, top_k=3)
    draws = torch.cat([sample(logits, params) for _ in range(20000)]).flatten()
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    torch.testing.assert_close(freq, logits_to_probs(logits, params)[0], atol=0.015, rtol=0)
    assert freq[3:].sum() == 0


def run_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "generate.py"), *args], capture_output=True, text=True,
                          timeout=600)


def test_cli_generates_greedy_text_on_the_default_model(smollm2_dir, smollm2_hf, smollm2_tok):
    r = run_cli("--checkpoint_path", str(smollm2_dir), "--prompt", PROMPTS[0], "--max_new_tokens", "12",
                "--num_samples", "2", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    prompt = torch.tensor(smollm2_tok.encode(PROMPTS[0]))
    expected = smollm2_tok.decode(hf_greedy(smollm2_hf, prompt, 12, smollm2_tok.stop_ids))
    assert r.stdout.count(expected) == 2
    for key in ("tokens/s", "bandwidth", "GB/s", "peak memory"):
        assert key in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--checkpoint_path", "/nonexistent/ckpt"], "checkpoint not found"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--top_p", "2"], "CUDA is not available"
     if not torch.cuda.is_available() else "top_p"),
    (["--top_p", "1.5"], "top_p must be in"),
    (["--compile_prefill"], "needs --compile"),
    (["--max_new_tokens", "0"], "max_new_tokens must be >= 1"),
    (["--max_seq_length", "8", "--prompt", "20"], "KV cache holds 8"),
])
def test_cli_bad_input_gives_a_clear_message(smollm2_dir, args, message):
    r = run_cli("--checkpoint_path", str(smollm2_dir), *args)
    assert r.returncode != 0
    assert message in r.stderr and "Traceback" not in r.stderr


def test_cli_compiled_prints_compile_time_separately(tiny_smol_dir):
    r = run_cli("--checkpoint_path", str(tiny_smol_dir), "--prompt", "Hello", "--max_new_tokens", "8",
                "--num_samples", "2", "--compile")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("Compilation time:") == 1
    assert r.stderr.count("Sample ") == 2


def test_cli_random_prompt_and_profile(tiny_smol_dir, tmp_path):
    trace = tmp_path / "trace.json"
    r = run_cli("--checkpoint_path", str(tiny_smol_dir), "--prompt", "20", "--max_new_tokens", "5",
                "--num_samples", "1", "--profile", str(trace))
    assert r.returncode == 0, r.stderr
    assert "prefill 20 tokens" in r.stderr
    assert trace.stat().st_size > 1000 and "aten::" in trace.read_text()


def test_cli_interactive_chat_streams_replies(tiny_smol_dir):
    r = subprocess.run([sys.executable, str(REPO / "generate.py"), "--checkpoint_path", str(tiny_smol_dir),
                        "--interactive", "--max_new_tokens", "6", "--temperature", "0", "--max_seq_length", "256"],
                       input="Hi there!\nAnd again?\n\n", capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("> ") == 3  # two turns, then the empty line ends the chat
    assert r.stderr.count("tokens/s]") == 2


def test_compiled_prefill_handles_new_prompt_lengths_without_recompiling(tiny_checkpoint):
    model, hf = tiny_checkpoint()
    model.setup_caches(1, 64)
    steps = compile_steps(torch.device("cpu"), compile_prefill=True)
    for i, length in enumerate([5, 9, 17, 30]):
        prompt = torch.randint(3, 96, (length,), generator=torch.Generator().manual_seed(length))
        with torch._dynamo.config.patch(error_on_recompile=i > 1):  # lengths 5 and 9: dynamic graph made
            ours, _ = generate(model, prompt, 10, GREEDY, steps=steps)
        assert ours[0].tolist() == hf_greedy(hf, prompt, 10)
