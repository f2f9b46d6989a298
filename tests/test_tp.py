"""Tensor parallelism over gloo: torchrun runs of 2 and 3 CPU processes against single-process output."""
import json
import os
import subprocess
import sys

import pytest
import torch

from checkpoint import load_model
from conftest import REPO, save_tiny_hf, tiny_hf_config
from decoding import generate, speculative_generate
from quantized import quantize_model
from sampling import SamplingParams

GREEDY = SamplingParams()
TIMEOUT = 600  # no test may hang: a stuck collective fails the test instead


@pytest.fixture(autouse=True)
def float_activations(monkeypatch):
    """Quantized layers with float32 activations, in the ranks (the environment torchrun passes on)
    and in the single-process references. With int8 activations (the default) a rank's partial sums
    in another order move an activation by a last bit, which can move its int8 code by a whole step:
    the ranks then differ from one process by ~1% of the logits (measured 1.3% on SmolLM2 int8),
    as compiled graphs differ from eager ones, too much to tell a sharding bug from rounding."""
    import cpu_kernels
    monkeypatch.setenv("LAYERSKIP_CPU_ACTIVATIONS", "float")
    monkeypatch.setattr(cpu_kernels, "ACTIVATIONS", "float")


def torchrun(n, *args, env=None, timeout=TIMEOUT):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **(env or {})})


def run_worker(n, checkpoint, jobs, out_dir, env=None):
    """Runs tp_worker.py on n ranks; returns (the run, each rank's report or None), the report with its
    "logits" (which every rank writes before generating) whenever the rank got that far."""
    out_dir.mkdir(parents=True, exist_ok=True)
    r = torchrun(n, REPO / "tests" / "tp_worker.py", checkpoint, out_dir, json.dumps(jobs), env=env)
    reports = []
    for i in range(n):
        report = json.loads((out_dir / f"rank{i}.json").read_text()) if (out_dir / f"rank{i}.json").exists() else None
        logits = out_dir / f"rank{i}.logits.json"
        if logits.exists():
            report = {**(report or {}), "logits": json.loads(logits.read_text())}
        reports.append(report)
    return r, reports


def check_ranks(r, ranks, checkpoint, jobs):
    """Every rank's prompt logits equal the single process's (checked first: they explain a failed
    run), then its greedy output, token for token."""
    refs = {job["name"]: single_process(checkpoint, job) for job in jobs}
    for job in jobs:
        for rank in ranks:
            assert rank is not None and "logits" in rank, r.stderr[-3000:]
            assert_logits_close(rank["logits"][job["name"]], refs[job["name"]][1].logits, job["name"])
    assert r.returncode == 0, r.stderr[-3000:]
    for job in jobs:
        for rank in ranks:
            assert rank["results"][job["name"]] == refs[job["name"]][0], job["name"]
    return refs


def single_process(checkpoint, job):
    model = load_model(checkpoint)
    if job.get("quantize"):
        q = job["quantize"]
        quantize_model(model, "int8" if q == "int8" else "int4", 32 if q == "int8" else int(q.split("-g")[1]))
    model.setup_caches(1, job["cache"])
    prompt = torch.tensor(job["prompt"])
    with torch.no_grad():
        model.logits = model(prompt[None], torch.arange(len(prompt)))[0, -1]
    if job["strategy"] == "autoregressive":
        return generate(model, prompt, job["n"], GREEDY, exit_layer=job.get("exit_layer"))[0][0].tolist(), model
    return speculative_generate(model, prompt, job["n"], GREEDY, job["k"], exit_layer=job["exit_layer"])[0][0].tolist(), model


def jobs_for(prompt, n, cache, exit_layer, k, variants):
    jobs = []
    for quant, compiled in variants:
        # compiled: the self-speculative draft and verify graphs hold every layer's all-reduces already
        for strategy in ("self_speculative",) if compiled else ("autoregressive", "self_speculative"):
            jobs.append({"name": f"{strategy}-{quant}-{'compiled' if compiled else 'eager'}", "prompt": prompt,
                         "n": n, "strategy": strategy, "exit_layer": exit_layer if strategy != "autoregressive" else None,
                         "k": k, "cache": cache, "quantize": quant, "compile": compiled})
    return jobs


def assert_logits_close(rank_logits, ref, name):
    """Partial sums over ranks change only the float32 summation order: a missing or doubled
    all-reduce, or a wrong shard, moves the logits by far more than this."""
    err = (torch.tensor(rank_logits) - ref).abs().max() / ref.abs().max()
    assert err < 1e-4, (name, err.item())


@pytest.fixture(scope="module")
def tiny_tp_checkpoint(tmp_path_factory):
    from convert_hf_checkpoint import convert
    d = tmp_path_factory.mktemp("tp_tiny")
    # 4 heads, 2 KV heads; weights 10x the default init, so logits are spread far beyond the float32
    # rounding that a different summation order (partial sums over ranks) introduces
    save_tiny_hf(d, tiny_hf_config(intermediate_size=128, num_hidden_layers=3, initializer_range=0.2))
    return convert(d)


@pytest.mark.slow
def test_tiny_two_ranks_equal_single_process(tiny_tp_checkpoint, tmp_path):
    """fp32 and int8 eager, int4 compiled; autoregressive and self-speculative; 2 gloo ranks."""
    jobs = jobs_for([5, 17, 33, 2, 9], 24, 64, 2, 3, [(None, False), ("int8", False), ("int4-g32", True)])
    jobs.append({**jobs[0], "name": "early-exit", "exit_layer": 1})
    r, ranks = run_worker(2, tiny_tp_checkpoint, jobs, tmp_path / "out")
    refs = check_ranks(r, ranks, tiny_tp_checkpoint, jobs)
    assert "graph break" not in r.stderr.lower()
    # each rank holds half of the blocks' weights and half of the KV cache (jobs[0]: fp32)
    full = refs[jobs[0]["name"]][1]
    full_weights = sum(t.numel() * t.element_size() for n, t in full.named_parameters() if n.startswith("layers."))
    full_cache = sum(b.numel() * b.element_size() for n, b in full.named_buffers() if "cache" in n)
    for rank in ranks:
        norms = 2 * 3 * 64 * 4  # the two RMSNorm weights of each of 3 layers are replicated
        assert rank["weight_bytes"] - norms == (full_weights - norms) // 2
        assert rank["cache_bytes"] == full_cache // 2


@pytest.mark.slow
def test_smollm2_three_ranks_equal_single_process(smollm2_dir, tmp_path):
    """The real model (9 heads, 3 KV heads: one KV head per rank), fp32 and int8 self-speculation,
    eager (int4, compiled and autoregressive runs are covered on the tiny model: three processes on
    CI's two cores are slow)."""
    from tokenizer import load_tokenizer
    prompt = load_tokenizer(smollm2_dir).encode("def fibonacci(n):\n")
    # self-speculative only: its draft and verify passes run every layer that autoregressive decoding
    # does (autoregressive decoding over ranks is covered on the tiny model)
    jobs = jobs_for(prompt, 8, 64, 20, 3, [(None, False)])[1:]
    jobs.append({**jobs[0], "name": "self_speculative-int8", "quantize": "int8"})
    r, ranks = run_worker(3, smollm2_dir / "checkpoint.safetensors", jobs, tmp_path / "out")
    check_ranks(r, ranks, smollm2_dir, jobs)
    # 576-wide blocks split in 3: each rank holds a third of their weights (norms replicated)
    block_weights = 30 * (576 * (576 + 2 * 192) + 576 * 576 + 3 * 576 * 1536) * 4
    for rank in ranks:
        assert abs(rank["weight_bytes"] - 30 * 2 * 576 * 4 - block_weights / 3) < 1e-6 * block_weights


@pytest.mark.slow
def test_unshardable_world_size_fails_on_every_rank(tiny_smol_dir):
    """4 heads over 3 ranks: refused up front with the reason, by every rank that gets that far, via
    generate.py. (torchrun stops the other ranks as soon as one exits: a rank still importing torch
    then ends without a word, so only the first to fail is sure to speak; 1 run in 3 on 2 cores.)"""
    r = torchrun(3, "generate.py", "--checkpoint_path", tiny_smol_dir, "--prompt", "hi", "--max_new_tokens", "4",
                 timeout=180)
    assert r.returncode != 0
    said = [rank for rank in range(3)
            if f"error (rank {rank}): cannot shard this model over 3 ranks: 4 attention heads" in r.stderr]
    assert said, r.stderr[-3000:]
    assert r.stderr.count("error (rank") == len(said), r.stderr[-3000:]  # no rank says anything else


@pytest.mark.slow
def test_generate_cli_tensor_parallel_prints_once(tiny_smol_dir):
    r = torchrun(2, "generate.py", "--checkpoint_path", tiny_smol_dir, "--prompt", "Hello", "--max_new_tokens", "8",
                 "--temperature", "0", "--num_samples", "1", "--generation_strategy", "self_speculative",
                 "--exit_layer", "1", "--num_speculations", "2", timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tensor parallel over 2 ranks" in r.stderr and "acceptance rate" in r.stderr
    from tokenizer import load_tokenizer
    tok = load_tokenizer(tiny_smol_dir)
    model = load_model(tiny_smol_dir)
    model.setup_caches(1, 64)
    ids = torch.tensor(tok.encode("Hello"))
    out, _ = speculative_generate(model, ids, 8, GREEDY, 2, exit_layer=1, stop_ids=tok.stop_ids)
    out = out[0].tolist()
    assert r.stdout == tok.decode(out[:-1] if out[-1] in tok.stop_ids else out) + "\n"  # once: rank 1 is silent


@pytest.mark.slow
def test_quantized_self_draft_under_tensor_parallelism_equals_single_process_greedy(tiny_smol_dir):
    """The int8 copy is made from the whole model on every rank, then sharded like it. Three prompts
    batched two rows at a time (every rank schedules the same rows: their tokens agree) print what
    one process prints running them one at a time."""
    common = ["--checkpoint_path", tiny_smol_dir, "--prompt", "Hello", "--prompt", "The sea is", "--prompt",
              "Once upon a time", "--max_new_tokens", "12", "--temperature", "0", "--num_samples", "1"]
    r = torchrun(2, "generate.py", *common, "--generation_strategy", "self_speculative", "--draft_quantize", "int8",
                 "--num_speculations", "3", "--batch_size", "2", timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Draft: int8 copy of layers [0, 3)" in r.stderr and "acceptance rate" in r.stderr
    assert "3 prompts, 2 at a time" in r.stderr
    single = subprocess.run([sys.executable, str(REPO / "generate.py"), *map(str, common), "--batch_size", "1"],
                            capture_output=True, text=True, timeout=180)
    assert single.returncode == 0 and r.stdout == single.stdout and r.stdout.count("--- prompt") == 3


@pytest.mark.slow
def test_adaptive_speculation_under_tensor_parallelism_equals_single_process_greedy(tiny_smol_dir, tmp_path):
    """Every rank must choose the same (E, k) and stop drafting at the same draft: rank 0's step
    costs decide, and probes and confidences come from the gathered logits."""
    common = ["--checkpoint_path", tiny_smol_dir, "--prompt", "Hello", "--max_new_tokens", "24", "--temperature", "0",
              "--num_samples", "1"]
    r = torchrun(2, "generate.py", *common, "--generation_strategy", "self_speculative", "--exit_layer", "auto",
                 "--num_speculations", "auto", env={"LAYERSKIP_CACHE": str(tmp_path)}, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "chosen per round" in r.stderr
    single = subprocess.run([sys.executable, str(REPO / "generate.py"), *map(str, common)], capture_output=True,
                            text=True, timeout=180)
    assert single.returncode == 0 and r.stdout == single.stdout


@pytest.mark.slow
def test_rank_failure_ends_every_rank(tiny_tp_checkpoint, tmp_path):
    jobs = jobs_for([5, 6, 7], 6, 32, 2, 2, [(None, False)])
    r, ranks = run_worker(2, tiny_tp_checkpoint, jobs, tmp_path / "out", env={"TP_WORKER_FAIL_RANK": "1"})
    assert r.returncode != 0
    assert "rank 1 failed on purpose" in r.stderr
    assert [rank.keys() for rank in ranks] == [{"logits"}, {"logits"}]  # neither rank finished its jobs


@pytest.mark.slow
def test_batched_adaptive_speculation_under_tensor_parallelism_equals_single_process_greedy(tiny_smol_dir, tmp_path):
    """auto over batched rounds: rank 0's round costs per bucket of rows decide and the clocks do
    not (no timing under tensor parallelism), so every rank runs the same (E, k) each round."""
    common = ["--checkpoint_path", tiny_smol_dir, "--prompt", "Hello", "--prompt", "The sea is", "--max_new_tokens",
              "10", "--temperature", "0", "--num_samples", "1"]
    r = torchrun(2, "generate.py", *common, "--generation_strategy", "self_speculative", "--exit_layer", "auto",
                 "--num_speculations", "auto", "--batch_size", "2", env={"LAYERSKIP_CACHE": str(tmp_path)}, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 rows at once; step costs measured" in r.stderr and ", rounds " in r.stderr
    single = subprocess.run([sys.executable, str(REPO / "generate.py"), *map(str, common), "--batch_size", "1"],
                            capture_output=True, text=True, timeout=180)
    assert single.returncode == 0 and r.stdout == single.stdout and r.stdout.count("--- prompt") == 2


@pytest.mark.slow
@pytest.mark.parametrize("source, batch_size", [("ngram", "1"), ("ngram", "2"), ("auto", "2")])
def test_ngram_drafts_under_tensor_parallelism_equal_single_process_greedy(tiny_smol_dir, source, batch_size):
    """Drafts from the text (and, with auto, the int8 self-draft too): clocks do not decide under
    tensor parallelism (SourceChooser), so every rank verifies the same proposals each round, one
    sequence at a time and batched; auto runs the model's rounds too (tried once, then kept where
    they yield more: on this tiny model they take every round)."""
    common = ["--checkpoint_path", tiny_smol_dir, "--prompt", "one two three one two three one two", "--prompt",
              "a b c d a b c d a b", "--max_new_tokens", "16", "--temperature", "0", "--num_samples", "1",
              "--generation_strategy", "self_speculative", "--draft_source", source, "--ngram_tokens", "4"]
    if source == "auto":
        common += ["--draft_quantize", "int8", "--num_speculations", "2"]
    r = torchrun(2, "generate.py", *common, "--batch_size", batch_size, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("draft sources: ngram" in r.stderr or ", ngram" in r.stderr) if source == "ngram" else \
        "acceptance rate" in r.stderr
    single = subprocess.run([sys.executable, str(REPO / "generate.py"), *map(str, common), "--batch_size", "1"],
                            capture_output=True, text=True, timeout=180)
    assert single.returncode == 0 and r.stdout == single.stdout and r.stdout.count("--- prompt") == 2
