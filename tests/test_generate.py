"""Generation: greedy parity with transformers, compiled without recompiles, the tiny-temperature limit, the CLI."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CPU_LAYERS_PER_GRAPH, REPO, assert_varied, block_graphs, compiled_graphs, regional_graphs
from decoding import generate
from steps import compile_steps, prefill
from sampling import SamplingParams, logits_to_probs

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


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2_transformers")
def test_smollm2_greedy_matches_transformers(smollm2, smollm2_hf_greedy):
    smollm2.setup_caches(1, 160)
    for prompt, ref in smollm2_hf_greedy:
        ours, _ = generate(smollm2, prompt, 64, GREEDY)
        assert len(ref) == len(prompt) + 64
        assert ours[0].tolist() == ref


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2_transformers")
def test_smollm2_compiled_greedy_matches_transformers_without_recompiling(smollm2, smollm2_hf_greedy,
                                                                        smollm2_steps):
    smollm2.setup_caches(1, 160)
    before = block_graphs()
    for i, (prompt, ref) in enumerate(smollm2_hf_greedy):
        # After the first generation compiled the step, any recompilation is an error.
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            ours, _ = generate(smollm2, prompt, 64, GREEDY, steps=smollm2_steps)
        assert ours[0].tolist() == ref
    # The layers' graph of the decode step (regional: one for every run of 6 of the 30 layers), for
    # every prompt length and position: made here, or by an earlier test of the same session (the
    # graphs are shared); but made.
    assert block_graphs() >= 1
    assert block_graphs() - before <= regional_graphs((0, 30, 1), size=CPU_LAYERS_PER_GRAPH) == 1


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


def test_tiny_temperatures_are_the_greedy_limit(tiny_checkpoint):
    """logits / T overflows for tiny T (every logit inf, softmax NaN): the probabilities must be the
    limit instead, all mass on the argmax, and generation greedy."""
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 5
    for t in (1e-30, 1e-45):
        probs = logits_to_probs(logits, SamplingParams(temperature=t, top_k=10, top_p=0.9))
        assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), 50).float())
    model, _ = tiny_checkpoint()
    model.setup_caches(1, 64)
    prompt = torch.randint(3, 96, (6,), generator=torch.Generator().manual_seed(0))
    greedy, _ = generate(model, prompt, 20, GREEDY)
    assert generate(model, prompt, 20, SamplingParams(temperature=1e-30))[0].tolist() == greedy.tolist()


def run_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "generate.py"), *args], capture_output=True, text=True,
                          timeout=600)


def test_first_run_prepares_the_default_model_then_generates(tiny_smol_dir, tmp_path, monkeypatch, capsys):
    """The README's first command on a fresh clone: the default checkpoint is not there yet, so
    generate.py prepares it (here a stand-in writes the tiny model where the real one goes), then
    loads it and answers; the tensor-parallel hook and the preparation are different things."""
    import shutil

    import generate
    import hub
    target = tmp_path / "checkpoints" / "SmolLM2-135M-Instruct"
    prepared = []

    def stand_in(out_dir=None, source=None):
        prepared.append(Path(out_dir))
        shutil.copytree(tiny_smol_dir, out_dir)
        return Path(out_dir)
    monkeypatch.setattr(hub, "DEFAULT_CHECKPOINT", target)
    monkeypatch.setattr(hub, "prepare_default_model", stand_in)
    generate.main(["--prompt", "Hi", "--chat", "--max_new_tokens", "4", "--temperature", "0"])
    assert prepared == [target]
    out, err = capsys.readouterr()
    assert "not prepared yet; preparing it" in err and "Sample 1:" in err
    assert out.startswith("user: Hi\nassistant: ")
    generate.main(["--prompt", "Hi", "--max_new_tokens", "2"])  # prepared: not again
    assert prepared == [target]
    shutil.rmtree(target)
    with pytest.raises(FileNotFoundError, match="run `python scripts/prepare_smollm2.py` once, then torchrun"):
        hub.find_checkpoint(target, world_size=2)  # ranks must not race to write one folder


@pytest.mark.slow
def test_cli_chat_prints_the_message_and_the_reply(smollm2_dir, smollm2_hf, smollm2_tok):
    """--chat on the real model: the user's message and transformers' greedy reply to the chat template,
    without the template's markup, the default system prompt or the end-of-turn token."""
    message = "Write a haiku about the sea."
    r = run_cli("--checkpoint_path", str(smollm2_dir), "--prompt", message, "--chat", "--max_new_tokens", "40",
                "--temperature", "0")
    assert r.returncode == 0, r.stderr
    ids = torch.tensor(smollm2_tok.encode_chat([{"role": "user", "content": message}]))
    reply = hf_greedy(smollm2_hf, ids, 40, smollm2_tok.stop_ids)[len(ids):]
    if reply[-1] in smollm2_tok.stop_ids:
        reply = reply[:-1]
    assert r.stdout == f"user: {message}\nassistant: {smollm2_tok.decode(reply).strip()}\n"
    assert len(reply) > 5 and "<|im" not in r.stdout and smollm2_tok.default_system not in r.stdout
    assert r.stderr.count("Sample 1:") == 1 and "tokens/s" in r.stderr


@pytest.mark.slow
def test_cli_generates_greedy_text_on_the_default_model(smollm2_dir, smollm2_hf, smollm2_tok):
    r = run_cli("--checkpoint_path", str(smollm2_dir), "--prompt", PROMPTS[0], "--max_new_tokens", "12",
                "--num_samples", "2", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    prompt = torch.tensor(smollm2_tok.encode(PROMPTS[0]))
    expected = smollm2_tok.decode(hf_greedy(smollm2_hf, prompt, 12, smollm2_tok.stop_ids))
    assert r.stdout.count(expected) == 2
    for key in ("tokens/s", "bandwidth", "GB/s", "peak memory"):
        assert key in r.stderr


@pytest.fixture(scope="module")
def tiny_smol(tiny_smol_dir):
    """(model, tokenizer) of the tiny CLI model, in this process: the CLI's text is checked against it."""
    from checkpoint import load_model
    from tokenizer import load_tokenizer
    model = load_model(tiny_smol_dir)
    model.setup_caches(1, 256)
    return model, load_tokenizer(tiny_smol_dir)


def greedy_text(tiny_smol, ids, n, with_prompt=False) -> str:
    """What the CLI prints: the greedy continuation of ids (after ids, if with_prompt), without a final stop token."""
    model, tok = tiny_smol
    out, _ = generate(model, torch.tensor(ids), n, GREEDY, stop_ids=tok.stop_ids)
    new = out[0, len(ids):].tolist()
    assert_varied(new)
    if new[-1] in tok.stop_ids:
        new = new[:-1]
    return tok.decode((list(ids) if with_prompt else []) + new)


@pytest.mark.slow
def test_cli_compiled_prints_compile_time_separately_and_a_second_run_compiles_nothing(tiny_smol_dir, tiny_smol,
                                                                                        tmp_path, monkeypatch):
    """With inductor's caches in a fresh folder: the first process compiles the one layers' graph
    (and says so), the second finds it in the cache and compiles nothing."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    text = greedy_text(tiny_smol, tiny_smol[1].encode("Hello"), 8, with_prompt=True)
    for run, how in enumerate(("compiled", "from the cache")):
        r = run_cli("--checkpoint_path", str(tiny_smol_dir), "--prompt", "Hello", "--max_new_tokens", "8",
                    "--num_samples", "2", "--compile", "--temperature", "0")
        assert r.returncode == 0, r.stderr
        assert r.stderr.count("Compilation time:") == 1
        assert r.stderr.count("Sample ") == 2
        assert r.stdout == f"{text}\n{text}\n"  # compiled greedy == eager greedy, both samples
        # the tiny model's 3 layers: one graph for the decode step's one row, announced once
        assert r.stderr.count("compiling the graph of 3 layers x 1 row") == 1, r.stderr
        assert re.search(rf"\.\.\. {how} in [0-9.]+ s", r.stderr), (run, r.stderr)


@pytest.mark.slow
@pytest.mark.parametrize("draft", ["int8 self-draft", "separate draft", "none, several prompts"])
def test_compiled_warm_up_is_a_few_rounds_and_compiles_every_graph(tiny_smol_dir, draft):
    """A compiled run's untimed first generation is a few rounds, not the whole budget
    (engine.warmup_tokens), and still meets every graph, none in the timed samples: the int8
    self-draft's one-row draft step (it drafts into the model's cache: no catch-up) and the verify
    pass; a separate draft model's one-row draft step, its two-row catch-up in the second round
    (it has a cache of its own) and the verify pass. Three prompts two at a time warm up on two,
    and the one-row step the third prompt runs alone is compiled then too."""
    from decoding import Strategy
    from engine import warmup_tokens
    assert warmup_tokens(Strategy(), 500) == 3 * 4 + 2
    assert warmup_tokens(Strategy(name="self_speculative", exit_layer=2, num_speculations=6), 500) == 3 * 7 + 2
    assert warmup_tokens(Strategy(name="self_speculative", draft_source="ngram", ngram_tokens=10), 500) == 35
    assert warmup_tokens(Strategy(), 5) == 5
    source = {"int8 self-draft": ["--generation_strategy", "self_speculative", "--draft_quantize", "int8"],
              "separate draft": ["--generation_strategy", "speculative", "--draft_checkpoint_path", str(tiny_smol_dir)]
              }.get(draft, [])
    prompts = ["--prompt", "Hello", "--prompt", "The sea", "--prompt", "Once", "--batch_size", "2"] \
        if "several" in draft else ["--prompt", "Hello"]
    r = run_cli("--checkpoint_path", str(tiny_smol_dir), *prompts, "--max_new_tokens", "60",
                "--compile", "--temperature", "0", *source, *(["--num_speculations", "3"] if source else []))
    assert r.returncode == 0, r.stderr
    before, after = r.stderr.split("Compilation time:")
    # int8 x 1 row and float32 x 4 rows; float32 x 1, x 2 and x 4 rows; the decode step of 2
    # sequences and, narrowed to the first row, of 1
    assert before.count("compiling the graph of") == {"int8 self-draft": 2, "separate draft": 3}.get(draft, 2), before
    assert "compiling" not in after, after


def test_cli_random_prompt_and_profile(tiny_smol_dir, tiny_smol, tmp_path):
    trace = tmp_path / "trace.json"
    r = run_cli("--checkpoint_path", str(tiny_smol_dir), "--prompt", "20", "--max_new_tokens", "5",
                "--profile", str(trace), "--temperature", "0", "--seed", "7")
    assert r.returncode == 0, r.stderr
    assert "prefill 20 tokens" in r.stderr
    ids = torch.randint(0, tiny_smol[1].vocab_size, (20,), generator=torch.Generator().manual_seed(7)).tolist()
    assert r.stdout == greedy_text(tiny_smol, ids, 5, with_prompt=True) + "\n"
    assert trace.stat().st_size > 1000 and "aten::" in trace.read_text()


def test_cli_reports_a_run_of_one_token(tiny_smol_dir, tiny_smol):
    """One new token (the budget, or an end of text at once) has no decode speed: it says so, not a crash."""
    r = run_cli("--checkpoint_path", str(tiny_smol_dir), "--prompt", "20", "--max_new_tokens", "1",
                "--temperature", "0", "--seed", "7")
    assert r.returncode == 0, r.stderr
    assert "Sample 1: 1 tokens" in r.stderr and "decode nan tokens/s" in r.stderr


def test_cli_interactive_chat_streams_replies(tiny_smol_dir, tiny_smol):
    r = subprocess.run([sys.executable, str(REPO / "generate.py"), "--checkpoint_path", str(tiny_smol_dir),
                        "--interactive", "--max_new_tokens", "6", "--temperature", "0", "--max_seq_length", "256"],
                       input="Hi there!\nAnd again?\n\n", capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("> ") == 3  # two turns, then the empty line ends the chat
    assert r.stderr.count("tokens/s]") == 2
    first = greedy_text(tiny_smol, tiny_smol[1].encode_chat([{"role": "user", "content": "Hi there!"}]), 6)
    assert r.stdout.startswith(f"> {first}> ")  # the reply streamed, without its end-of-turn token


@pytest.mark.slow
def test_compiled_prefill_handles_new_prompt_lengths_without_recompiling(tiny_checkpoint):
    model, hf = tiny_checkpoint()
    model.setup_caches(1, 64)
    steps = compile_steps(torch.device("cpu"), compile_prefill=True)
    before = compiled_graphs(prefill)
    # (up to 16 tokens would be a second graph: model.Linear's few-row path, fixed_order_attention)
    for i, length in enumerate([17, 23, 30]):
        prompt = torch.randint(3, 96, (length,), generator=torch.Generator().manual_seed(length))
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            ours, _ = generate(model, prompt, 10, GREEDY, steps=steps)
        assert ours[0].tolist() == hf_greedy(hf, prompt, 10)
        assert_varied(ours[0, length:])
    assert compiled_graphs(prefill) - before == 1  # one graph, dynamic in the prompt length


def test_several_prompts_print_what_each_prints_alone(tiny_smol_dir, tmp_path, capsys, monkeypatch):
    """--prompt repeated and --prompt_file (plain and JSON lines), batched two rows at a time, eager
    and compiled, autoregressive and speculative (shared cache, a quantized self-draft's own, and
    auto's batched policy over both): each prompt's text is what generate.py prints for that prompt
    alone."""
    import generate
    monkeypatch.setenv("LAYERSKIP_CACHE", str(tmp_path / "costs"))  # auto's step costs: measured here
    texts = ["Hi there", "The sea is", 'A "quoted" line', "Once upon a time, long ago"]
    (tmp_path / "p.txt").write_text(f"{texts[1]}\n\n" + json.dumps({"prompt": texts[2], "id": 7}) + f"\n{texts[3]}\n")
    common = ["--checkpoint_path", str(tiny_smol_dir), "--max_new_tokens", "12", "--temperature", "0"]
    alone = []
    for t in texts:
        generate.main([*common, "--prompt", t])
        alone.append(capsys.readouterr().out.strip())
    spec = ["--generation_strategy", "self_speculative", "--num_speculations", "3"]
    auto = [*spec[:2], "--num_speculations", "auto"]
    for extra in ([], ["--compile"], [*spec, "--exit_layer", "2"], [*spec, "--draft_quantize", "int8"],
                  [*auto, "--exit_layer", "auto"], [*auto, "--draft_quantize", "int8"]):
        generate.main([*common, "--prompt", texts[0], "--prompt_file", str(tmp_path / "p.txt"), "--batch_size", "2",
                       *extra])
        out, err = capsys.readouterr()
        parts = [p.strip() for p in out.split("--- prompt ")[1:]]
        assert [p.split("\n", 1)[1] for p in parts] == alone, extra
        assert [p.split("\n", 1)[0] for p in parts] == [f"{i} of 4" for i in range(1, 5)]
        assert "Sample 1: 4 prompts, 2 at a time: 48 tokens" in err
        assert ("2 rows at once; step costs measured" in err) == ("auto" in extra)
        if "auto" in extra:  # the policy's choice, plain steps included, from the costs it measured
            assert re.search(r"rounds (plain|E=\S+ k=\d) \d+%", err), err
        else:
            assert ("acceptance rate" in err) == (extra[:1] == spec[:1])
