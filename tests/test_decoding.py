"""Early exit, self-speculative (LayerSkip) and two-model speculative decoding."""
import copy
import math
import subprocess
import sys

import pytest
import torch

from conftest import CPU_LAYERS_PER_GRAPH, REPO, assert_varied, block_graphs, compiled_graphs, regional_graphs
from decoding import MAX_SPECULATIONS, generate, speculative_generate
from steps import Steps, compile_steps, decode_one_token, draft_step, verify_step
from model import ModelArgs, Transformer, run_blocks
from sampling import SamplingParams, logits_to_probs, speculative_accept

GREEDY = SamplingParams()
SMOL_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived",
    "Question: What is 17 * 23? Answer:",
    "import numpy as np\n\ndef normalize(x):\n",
    "<|im_start|>user\nGive me three tips for staying healthy.<|im_end|>\n<|im_start|>assistant\n",
    "SELECT name, COUNT(*) FROM users GROUP BY",
]
# The first five prompts run eagerly, one (exit_layer, num_speculations) each: E=1, E=L-1 and k=1
# all appear, and every k > 1 meets rounds that draft past the remaining token budget (chosen
# cheap: an eager round costs about k * E / 30 + 1 full forward passes). The other two run
# compiled, where every new (E, k) costs a draft and a verify graph (together about as long to
# compile as the whole model, ~75 s on CI's two cores): the first compiles them, the second must reuse them.
SMOL_EAGER_CONFIGS = [(1, 1), (29, 2), (1, 3), (29, 1), (8, 4)]
SMOL_COMPILED_CONFIG = (20, 3)
SMOL_TOKENS = 32  # per prompt: every config meets several rounds, rejections and accepted drafts


def random_model(n_layers=4, vocab=96, dim=64, seed=0, scale=0.15, depth_decay=0.5) -> Transformer:
    """A small random model shaped like a LayerSkip checkpoint: weights of std `scale` (large enough
    that greedy output varies instead of repeating one token), and each layer's residual branches
    (wo, w2) scaled by depth_decay**layer, so that deeper exits agree more with the full model
    (acceptance ~30% at E=1, ~80% at E=3 of 4: rounds both accept and reject)."""
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                                  intermediate_size=2 * dim, max_position_embeddings=512))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, scale)
        for i, layer in enumerate(model.layers):
            layer.attention.wo.weight.mul_(depth_decay ** i)
            layer.feed_forward.w2.weight.mul_(depth_decay ** i)
    return model.eval()


def rand_prompt(n, vocab=96, seed=0):
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- greedy equality


@pytest.mark.parametrize("exit_layer", [1, 2, 3])
@pytest.mark.parametrize("k", [1, 2, 3, 5, 12])
def test_tiny_self_speculative_greedy_equals_autoregressive(exit_layer, k):
    model = random_model()
    model.setup_caches(1, 128)
    histogram = [0] * (k + 1)
    for seed in range(3):
        prompt = rand_prompt(5 + seed, seed=seed)
        ref, _ = generate(model, prompt, 40, GREEDY)
        assert_varied(ref[0, len(prompt):])
        out, stats = speculative_generate(model, prompt, 40, GREEDY, k, exit_layer=exit_layer)
        assert out.tolist() == ref.tolist()
        assert stats.new_tokens == 40 and stats.rounds >= 1
        histogram = [a + b for a, b in zip(histogram, stats.accepted_histogram)]
    assert histogram[0] > 0 and sum(histogram[1:]) > 0  # rounds that rejected at once, and rounds that kept drafts


@pytest.mark.parametrize("k", [1, 4])
def test_tiny_two_model_speculative_greedy_equals_autoregressive(k):
    model, draft = random_model(seed=0), random_model(n_layers=2, seed=1)
    model.setup_caches(1, 128)
    draft.setup_caches(1, 128)
    for seed in range(3):
        prompt = rand_prompt(6, seed=seed)
        ref, _ = generate(model, prompt, 40, GREEDY)
        out, stats = speculative_generate(model, prompt, 40, GREEDY, k, draft_model=draft)
        assert out.tolist() == ref.tolist()
    # a draft model identical to the target accepts everything
    twin = copy.deepcopy(model)
    twin.setup_caches(1, 128)
    out, stats = speculative_generate(model, prompt, 40, GREEDY, k, draft_model=twin)
    assert out.tolist() == generate(model, prompt, 40, GREEDY)[0].tolist()
    assert stats.acceptance_rate == 1.0


def test_cache_slots_are_written_before_they_are_read():
    """Garbage in every cache slot beforehand changes nothing: no round reads a position it (or an
    earlier round) did not write, so rejected drafts' stale keys/values cannot leak either."""
    model = random_model()
    prompt = rand_prompt(7)
    model.setup_caches(1, 128)
    ref, _ = generate(model, prompt, 40, GREEDY)
    for k in (2, 5):
        model.setup_caches(1, 129)  # fresh caches ...
        for layer in model.layers:  # ... full of large garbage
            layer.attention.kv_cache.k_cache.normal_(0, 1e3)
            layer.attention.kv_cache.v_cache.normal_(0, 1e3)
        out, stats = speculative_generate(model, prompt, 40, GREEDY, k, exit_layer=2)
        assert out.tolist() == ref.tolist()
        assert stats.accepted_histogram[0] > 0  # rejections happened


@pytest.fixture(scope="module")
def smol_reference(smollm2, smollm2_dir):
    """Greedy autoregressive continuations (SMOL_TOKENS) of SMOL_PROMPTS (eager decoding, itself
    checked against transformers in test_generate.py)."""
    from tokenizer import load_tokenizer
    tok = load_tokenizer(smollm2_dir)
    smollm2.setup_caches(1, 160)
    prompts = [torch.tensor(tok.encode(p)) for p in SMOL_PROMPTS]
    return prompts, [generate(smollm2, p, SMOL_TOKENS, GREEDY)[0] for p in prompts]


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2_speculation")
def test_smollm2_self_speculative_greedy_equals_autoregressive(smollm2, smol_reference):
    assert smollm2.args.n_layers == 30
    smollm2.setup_caches(1, 160)
    accepted = 0
    for prompt, ref, (E, k) in zip(*smol_reference, SMOL_EAGER_CONFIGS):
        assert_varied(ref[0, len(prompt):])
        out, stats = speculative_generate(smollm2, prompt, SMOL_TOKENS, GREEDY, k, exit_layer=E)
        assert out.tolist() == ref.tolist(), (E, k)
        assert stats.new_tokens == SMOL_TOKENS
        accepted += sum(stats.accepted_per_round)
    assert accepted > 0
    # k (the most allowed) far beyond the remaining budget from the very first round
    for prompt, ref in list(zip(*smol_reference))[:2]:
        out, _ = speculative_generate(smollm2, prompt, 5, GREEDY, MAX_SPECULATIONS, exit_layer=20)
        assert out.tolist() == ref[:, :len(prompt) + 5].tolist()


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2_speculation")
def test_smollm2_compiled_self_speculation_equals_autoregressive_without_recompiling(smollm2, smol_reference,
                                                                                    smollm2_steps):
    smollm2.setup_caches(1, 160)
    E, k = SMOL_COMPILED_CONFIG
    before = block_graphs()
    for i, (prompt, ref) in enumerate(list(zip(*smol_reference))[5:]):
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            out, stats = speculative_generate(smollm2, prompt, SMOL_TOKENS, GREEDY, k, exit_layer=E,
                                              steps=smollm2_steps)
        assert out.tolist() == ref.tolist(), (E, k)
        assert sum(stats.accepted_per_round) > 0
    # the layers' graphs of the draft steps and the verify pass, reused across rounds, positions and
    # prompts: made here, or by an earlier SmolLM2 test of the session (they are shared); but made
    expected = regional_graphs((0, E, 1), (E, 30, k + 1), size=CPU_LAYERS_PER_GRAPH)
    assert 0 <= block_graphs() - before <= expected and block_graphs() >= expected


@pytest.mark.slow
@pytest.mark.parametrize("layers_per_graph", [CPU_LAYERS_PER_GRAPH, 0], ids=["regional", "whole"])
def test_tiny_compiled_strategies_do_not_recompile(layers_per_graph):
    """Regional compilation at the CPU's shipped run length and whole-step graphs (CUDA's)."""
    # a shape no other test compiles (nothing else compiles whole steps on CPU): the graphs counted are this test's;
    # whole steps on 2 layers (each graph holds every layer: half the compile time of 4)
    n_layers = 4 if layers_per_graph else 2
    E = n_layers // 2
    model = random_model(n_layers=n_layers, dim=48 if layers_per_graph else 64, vocab=80)
    model.setup_caches(1, 128)
    steps = compile_steps(torch.device("cpu"), layers_per_graph=layers_per_graph)
    fns = (decode_one_token, draft_step, verify_step, run_blocks)
    before = [compiled_graphs(f) for f in fns]
    for i in range(3):
        prompt = rand_prompt(4 + 3 * i, vocab=80, seed=i)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            ref, _ = generate(model, prompt, 30, GREEDY, steps=steps)
            ee, _ = generate(model, prompt, 30, GREEDY, steps=steps, exit_layer=E)
            out, _ = speculative_generate(model, prompt, 30, GREEDY, 3, exit_layer=E, steps=steps)
        assert_varied(ref[0, len(prompt):])
        assert out.tolist() == ref.tolist()
        assert ee.tolist() == generate(model, prompt, 30, GREEDY, exit_layer=E)[0].tolist()
    # exactly, reused across prompts and positions: whole, one graph each for decode (full and early
    # exit), draft and verify; regional, one per run of layers and rows (depth 4, E = 2, k = 3)
    graphs = [compiled_graphs(f) - b for f, b in zip(fns, before)]
    if layers_per_graph == 0:
        assert graphs == [2, 1, 1, 0]
    else:
        assert graphs == [0, 0, 0, regional_graphs((0, 4, 1), (0, 2, 1), (2, 4, 4), size=layers_per_graph)]
        assert graphs[3] == 3  # runs of 4, 2 (1 row) and 2 (4 rows)
        # the steps after each generation's first went straight to inductor's graphs, not through dynamo
        assert steps.decode.layer_graph.group[0].direct_calls > 3 * 2 * 25


@pytest.mark.slow
def test_tiny_compiled_two_model_speculation_catches_the_draft_up_without_recompiling():
    """After a round that accepts every draft, the draft model is fed the last draft (catch-up) by
    the same compiled draft graph: that input was a strided view once, which recompiled under the
    loop's no-guard stance and crashed `generate.py --generation_strategy speculative --compile`."""
    model = random_model(dim=40, vocab=72)  # a shape no other test compiles
    twin = copy.deepcopy(model)  # accepts every draft, so every round after the first catches up
    model.setup_caches(1, 64)
    twin.setup_caches(1, 64)
    steps = compile_steps(torch.device("cpu"))
    prompt = rand_prompt(5, vocab=72)
    out, stats = speculative_generate(model, prompt, 20, GREEDY, 3, draft_model=twin, steps=steps)
    assert out.tolist() == generate(model, prompt, 20, GREEDY)[0].tolist()
    assert stats.acceptance_rate == 1.0 and stats.rounds > 2


# ---------------------------------------------------------------- early exit


def test_early_exit_equals_a_truncated_model():
    model = random_model(n_layers=5, depth_decay=1.0)  # every layer matters: an early exit must differ
    for E in (1, 3, 4):
        truncated = copy.deepcopy(model)
        truncated.layers = truncated.layers[:E]
        truncated.args = copy.replace(model.args, n_layers=E) if hasattr(copy, "replace") else \
            ModelArgs(**{**model.args.__dict__, "n_layers": E})
        for m in (model, truncated):
            m.setup_caches(1, 64)
        prompt = rand_prompt(6, seed=E)
        ours, _ = generate(model, prompt, 20, GREEDY, exit_layer=E)
        ref, _ = generate(truncated, prompt, 20, GREEDY)
        assert ours.tolist() == ref.tolist()
        full, _ = generate(model, prompt, 20, GREEDY)
        assert E == 5 or ours.tolist() != full.tolist()


# ---------------------------------------------------------------- work done per token


def test_early_layers_run_exactly_once_per_verified_position():
    model = random_model(n_layers=6)
    model.setup_caches(1, 128)
    seen = [0] * 6
    for i, layer in enumerate(model.layers):
        layer.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, seen[i] + args[0].shape[1]))
    E, k, T = 2, 4, 9
    draft_calls = []
    steps = Steps(draft=lambda *a: draft_calls.append(1) or draft_step(*a))
    out, stats = speculative_generate(model, rand_prompt(T), 50, GREEDY, k, exit_layer=E, steps=steps)
    # the prompt once, then per round: each draft step's token, and the newest draft in the verify
    # pass (k + 1 positions in a full round; fewer in the last, which drafts only up to the budget)
    early = T + len(draft_calls) + stats.rounds
    assert seen[:E] == [early] * E  # early layers never recompute what the drafts already did
    # late layers: [last kept, d1..dk] per round, padded to k + 1 in the last; against plain
    # decoding, (k+1)/(accepted+1) times the work, no more
    assert seen[E:] == [T + stats.rounds * (k + 1)] * (6 - E)
    assert stats.rounds == len(stats.accepted_per_round) and stats.new_tokens == 50


# ---------------------------------------------------------------- sampling


def _chi2_critical(df, z=3.09):  # Wilson-Hilferty approximation of the 0.999 quantile
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(observed, expected_probs):
    """Pearson's statistic and degrees of freedom; infinite if a token of probability 0 was drawn."""
    n = observed.sum()
    expected = expected_probs * n
    support = expected_probs > 0
    df = int(support.sum()) - 1
    if observed[~support].sum() > 0:
        return math.inf, df
    return (((observed - expected)[support]) ** 2 / expected[support]).sum().item(), df


@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(0.7, top_k=4), SamplingParams(1.3, top_p=0.7)])
@pytest.mark.parametrize("closeness", [0.0, 0.8])
def test_speculative_accept_outputs_follow_the_target(params, closeness):
    """Each emitted position is distributed as the full model's filtered distribution there, for a
    draft unlike the target (most drafts rejected) and one close to it (where drawing the
    replacement from p instead of max(0, p - q) would show)."""
    torch.manual_seed(0)
    V, k, n = 10, 3, 20000
    target = torch.randn(k + 1, V) * 2
    draft_logits = closeness * target[:k] + (1 - closeness) * torch.randn(k, V) * 2
    q = logits_to_probs(draft_logits, params)
    p = logits_to_probs(target, params)
    first, second = torch.zeros(V), torch.zeros(V)
    for _ in range(n):
        drafts = torch.multinomial(q, 1)[:, 0]
        a, nxt = speculative_accept(drafts, q, target, params)
        emitted = drafts[:a].tolist() + nxt.tolist()
        first[emitted[0]] += 1
        if len(emitted) > 1:
            second[emitted[1]] += 1
    for observed, expected in ((first, p[0]), (second, p[1])):
        stat, df = chi2(observed, expected)
        assert stat < _chi2_critical(df)
    stat, df = chi2(first, q[0])  # the test can tell: "always accept" would emit q, which fails
    assert stat > 3 * _chi2_critical(df)


def check_speculative_sampling(model, draft_logits, params, **draft):
    """End to end on a tiny model with an 8-token vocabulary (prompt [1, 5, 2], k = 2): the 2nd and
    3rd generated tokens (the 1st comes from the prefill) of speculative_generate(..., **draft) are
    distributed as under autoregressive sampling, and told apart from the draft's own distribution
    (draft_logits(tokens) -> the draft's logits for every position)."""
    V, k, n = model.args.vocab_size, 2, 1200
    prompt = torch.tensor([1, 5, 2])
    # Exact autoregressive distribution of (x1, x2, x3), and the "always accept the draft" one.
    seqs = torch.cartesian_prod(torch.arange(V), torch.arange(V), torch.arange(V))
    full = torch.cat([prompt.expand(len(seqs), 3), seqs], 1)
    with torch.no_grad():
        p = logits_to_probs(model(full)[:, 2:5], params)
        q = logits_to_probs(draft_logits(full)[:, 2:5], params)
    joint = p[:, 0].gather(1, seqs[:, :1])[:, 0] * p[:, 1].gather(1, seqs[:, 1:2])[:, 0] * \
        p[:, 2].gather(1, seqs[:, 2:])[:, 0]
    wrong = p[:, 0].gather(1, seqs[:, :1])[:, 0] * q[:, 1].gather(1, seqs[:, 1:2])[:, 0] * \
        q[:, 2].gather(1, seqs[:, 2:])[:, 0]
    counts = torch.zeros(2, V)
    torch.manual_seed(1234)
    for _ in range(n):
        out, _ = speculative_generate(model, prompt, 3, params, k, **draft)
        counts[0, out[0, 4]] += 1
        counts[1, out[0, 5]] += 1
    for pos in (0, 1):
        marginal = torch.zeros(V).index_add_(0, seqs[:, pos + 1], joint)
        stat, df = chi2(counts[pos], marginal)
        assert stat < _chi2_critical(df), (pos, stat)
    wrong_marginal = torch.zeros(V).index_add_(0, seqs[:, 1], wrong)
    stat, df = chi2(counts[0], wrong_marginal)
    assert stat > 3 * _chi2_critical(df)  # a rule that ignored the full model would fail here


@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(0.8, top_k=3), SamplingParams(1.2, top_p=0.75)])
def test_self_speculative_sampling_matches_autoregressive_distribution(params):
    E = 1
    model = random_model(n_layers=3, vocab=8, dim=32, seed=3, scale=0.35)
    model.setup_caches(1, 16)
    check_speculative_sampling(model, lambda t: model.head(model.run_layers(model.embed(t), None, 0, E)), params,
                               exit_layer=E)


# ---------------------------------------------------------------- edge cases


def test_stop_token_inside_a_draft_and_budget_mid_round():
    model = random_model()
    model.setup_caches(1, 128)
    prompt = rand_prompt(5)
    ref, _ = generate(model, prompt, 40, GREEDY)
    stop = ref[0, 5 + 13].item()  # the 14th new token ends generation
    expected = ref[0, : 5 + ref[0, 5:].tolist().index(stop) + 1].tolist()
    for k in (3, 6):
        out, _ = speculative_generate(model, prompt, 40, GREEDY, k, exit_layer=3, stop_ids={stop})
        assert out[0].tolist() == expected
    for budget in range(1, 12):
        out, stats = speculative_generate(model, prompt, budget, GREEDY, 5, exit_layer=3)
        assert out[0].tolist() == ref[0, :5 + budget].tolist() and stats.new_tokens == budget


@pytest.mark.parametrize("draft_model", [False, True])
def test_no_round_drafts_past_the_token_budget(draft_model):
    """With r tokens still to produce a round drafts at most r - 1 (the full model's token is the
    r-th; k = 12 here, budgets 1..15); the verify pass keeps its fixed shape and the output is unchanged."""
    model = random_model()
    drafter = random_model(n_layers=2, seed=1) if draft_model else None
    for m in (model, drafter):
        if m is not None:
            m.setup_caches(1, 64)
    prompt = rand_prompt(6)
    ref, _ = generate(model, prompt, 15, GREEDY)
    drafted_at = []

    def counting_draft(m, x, input_pos, params, exit_layer=None, taps=()):
        drafted_at.append(int(input_pos))
        return draft_step(m, x, input_pos, params, exit_layer, taps)
    steps = Steps(draft=counting_draft)
    kw = {"draft_model": drafter} if draft_model else {"exit_layer": 2}
    for budget in range(1, 16):
        drafted_at.clear()
        out, stats = speculative_generate(model, prompt, budget, GREEDY, 12, steps=steps, **kw)
        assert out[0].tolist() == ref[0, :6 + budget].tolist()
        # a draft step at position p proposes the token at p + 1; the last token of the budget, at
        # 6 + budget - 1, is the verify pass's own
        assert all(p <= 6 + budget - 3 for p in drafted_at), (budget, drafted_at)
        assert stats.drafted == 0 or 0 <= stats.acceptance_rate <= 1


@pytest.mark.parametrize("kwargs, message", [
    ({"exit_layer": 0}, r"exit_layer must be in \[1, 3\]"),
    ({"exit_layer": 4}, r"exit_layer must be in \[1, 3\]"),
    ({"exit_layer": -2}, r"exit_layer must be in \[1, 3\]"),
    ({"exit_layer": 2, "num_speculations": 0}, r"num_speculations must be in \[1, 15\]"),
    ({"exit_layer": 2, "num_speculations": 16}, r"num_speculations must be in \[1, 15\]"),
    ({}, "give a draft source"),
])
def test_bad_arguments_are_clear_errors(kwargs, message):
    model = random_model()
    model.setup_caches(1, 64)
    kwargs = {"num_speculations": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        speculative_generate(model, rand_prompt(5), 10, GREEDY, **kwargs)
    if "exit_layer" in kwargs and 1 <= kwargs["num_speculations"] <= 15:
        with pytest.raises(ValueError, match=message):
            generate(model, rand_prompt(5), 10, GREEDY, exit_layer=kwargs["exit_layer"])


def test_prompt_filling_the_cache_and_batches_are_refused():
    model = random_model()
    model.setup_caches(1, 32)
    with pytest.raises(ValueError, match="4 positions of speculation lookahead"):
        speculative_generate(model, rand_prompt(20), 10, GREEDY, 4, exit_layer=2)
    speculative_generate(model, rand_prompt(18), 10, GREEDY, 4, exit_layer=2)  # exactly fits
    with pytest.raises(ValueError, match="batch size 1"):
        speculative_generate(model, rand_prompt(10).expand(2, 10), 5, GREEDY, 2, exit_layer=2)
    other = random_model(vocab=50)
    other.setup_caches(1, 32)
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(model, rand_prompt(5, vocab=50), 5, GREEDY, 2, draft_model=other)


# ---------------------------------------------------------------- command line


def run_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "generate.py"), *args], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_cli_self_speculative_matches_autoregressive_and_reports_acceptance(tiny_smol_dir):
    common = ["--checkpoint_path", str(tiny_smol_dir), "--prompt", "Hello", "--max_new_tokens", "24",
              "--num_samples", "1", "--temperature", "0"]
    ar = run_cli(*common)
    spec = run_cli(*common, "--generation_strategy", "self_speculative", "--exit_layer", "2", "--num_speculations", "3")
    two = run_cli(*common, "--generation_strategy", "speculative", "--draft_checkpoint_path", str(tiny_smol_dir))
    for r in (ar, spec, two):
        assert r.returncode == 0, r.stderr
    assert spec.stdout == ar.stdout == two.stdout
    for key in ("acceptance rate", "tokens/round", "histogram", "draft", "verify"):
        assert key in spec.stderr
    assert "acceptance rate 100.0%" in two.stderr  # the draft model is the model itself
