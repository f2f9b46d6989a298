"""Batched generation (batching.py): each row's output equals its prompt's batch-1 output, rows join
and leave between steps, and nothing recompiles."""
import copy

import pytest
import torch

from adaptive import BatchPolicy
from batching import Batch, Sequence, generate_many
from conftest import assert_varied
from decoding import generate, speculative_generate
from steps import compile_steps
from quantized import pack_model, quantize_model, quantized_copy
from sampling import SamplingParams, logits_to_probs
from test_decoding import _chi2_critical, chi2, rand_prompt, random_model

GREEDY = SamplingParams()
LENGTHS = (5, 17, 3, 9, 12, 1, 30)  # more prompts than rows, of different lengths, one of a single token


def packed_model(weights=None, n_layers=4):
    """A tiny random model on its CPU kernels (as load_model leaves a checkpoint), or quantized."""
    model = random_model(n_layers=n_layers)
    if weights:
        quantize_model(model, *weights, pack=False)
    return pack_model(model)


def batch1_reference(model, prompts, max_new_tokens, stop_ids=(), steps=None, exit_layer=None, size=64):
    model.setup_caches(1, size)
    kw = {"steps": steps} if steps else {}
    return [generate(model, torch.tensor(p), max_new_tokens, GREEDY, stop_ids=stop_ids, exit_layer=exit_layer,
                     **kw)[0][0, len(p):].tolist() for p in prompts]


# (exit layer, k): autoregressive, early exit, self-speculative; k = 5 with 8 rows verifies 48 rows
# at once, more than the kernels' EXACT_ROWS (in chunks)
STRATEGIES = [(None, 0), (2, 0), (1, 3), (3, 5)]
STRATEGY_IDS = ["autoregressive", "early_exit", "self_spec_E1_k3", "self_spec_E3_k5"]


@pytest.mark.parametrize("weights", [None, ("int8", None), ("int4", 32)], ids=["float32", "int8", "int4"])
@pytest.mark.parametrize("strategy", STRATEGIES, ids=STRATEGY_IDS)
def test_each_row_equals_its_batch1_greedy_output(weights, strategy):
    """Greedy: each row's tokens are its prompt's batch-1 greedy decoding (early exit: batch-1
    early-exit decoding), for any number of rows and any neighbours; self-speculation gives plain
    greedy decoding's tokens."""
    exit_layer, k = strategy
    model = packed_model(weights)
    prompts = [rand_prompt(n, seed=n).tolist() for n in LENGTHS]
    ref_exit = None if k else exit_layer  # self-speculation reproduces the full model's decoding
    ref = batch1_reference(model, prompts, 20, exit_layer=ref_exit)
    assert_varied(sum(ref, []), 0.1)
    assert len({tuple(r) for r in ref}) == len(ref)
    # a stop token that occurs mid-way in some outputs and not in others
    stop = ref[0][7]
    ref_stopped = batch1_reference(model, prompts, 20, stop_ids=(stop,), exit_layer=ref_exit)
    assert any(len(r) < 20 for r in ref_stopped) and any(len(r) == 20 for r in ref_stopped)
    for rows in (1, 3, 8):
        model.setup_caches(rows, 64)
        seqs, stats = generate_many(model, prompts, 20, GREEDY, exit_layer=exit_layer, num_speculations=k)
        assert [s.tokens for s in seqs] == ref, rows
        assert all(s.finish_reason == "length" for s in seqs)
        assert stats.new_tokens == 20 * len(prompts) and stats.max_rows == rows
        if k:
            assert 0 < stats.accepted < stats.drafted  # rounds that kept drafts and rounds that rejected
            assert all(len(s.stats.accepted_per_round) == s.stats.rounds > 0 for s in seqs)
        seqs, _ = generate_many(model, prompts, 20, GREEDY, exit_layer=exit_layer, stop_ids=(stop,),
                                num_speculations=k)
        assert [s.tokens for s in seqs] == ref_stopped, rows
        assert [s.finish_reason for s in seqs] == ["stop" if r[-1] == stop else "length" for r in ref_stopped]


@pytest.mark.parametrize("draft", ["two-model", "int8 copy of layers [0, 2)", "int4 copy of all layers", "twin",
                                   "int8 copy in the model's cache"])
def test_draft_models_equal_batch1_greedy_output(draft):
    """A draft model with its own cache (a separate model, a quantized copy of the model's own layers,
    or an identical twin), or a quantized copy drafting into the model's cache (the engine's way):
    each row's output is its batch-1 greedy decoding, and the twin accepts every draft (its cache
    holds the right keys at every position: the catch-up of rows that kept a whole round's drafts
    works)."""
    model = packed_model()
    if draft == "two-model":
        drafter, E = pack_model(random_model(n_layers=2, seed=1)), None
    elif draft == "twin":
        drafter, E = copy.deepcopy(model), None
    else:
        scheme, E = (("int8", None), 2) if "int8" in draft else (("int4", 32), None)
        drafter = quantized_copy(model, *scheme, n_layers=E if "[0, 2)" in draft else None)
    prompts = [rand_prompt(n, seed=n).tolist() for n in LENGTHS]
    ref = batch1_reference(model, prompts, 20)
    for rows, k in ((1, 3), (3, 1), (3, 4)):
        model.setup_caches(rows, 64)
        drafter.share_caches(model) if "model's cache" in draft else drafter.setup_caches(rows, 64)
        seqs, stats = generate_many(model, prompts, 20, GREEDY, exit_layer=E, num_speculations=k,
                                    draft_model=drafter)
        assert [s.tokens for s in seqs] == ref, (rows, k)
        if draft == "twin":
            assert stats.accepted == stats.drafted > 0
        elif draft != "two-model":
            assert 0 < stats.accepted < stats.drafted


def test_padding_rows_and_stale_cache_change_nothing():
    """Rows freed mid-run keep stepping as padding, and a row's cache holds its previous sequence's
    keys beyond the new prompt: garbage in every cache slot beforehand changes no output."""
    model = packed_model()
    prompts = [rand_prompt(n, seed=n).tolist() for n in LENGTHS]
    ref = batch1_reference(model, prompts, 12)
    model.setup_caches(3, 64)
    for layer in model.layers:
        layer.attention.kv_cache.k_cache.normal_(0, 1e3)
        layer.attention.kv_cache.v_cache.normal_(0, 1e3)
    budgets = [12, 2, 12, 5, 1, 12, 9]  # rows end at different steps; a one-token budget ends at its prefill
    seqs, _ = generate_many(model, prompts, 12, GREEDY)
    assert [s.tokens for s in seqs] == ref
    batch = Batch(model, GREEDY)
    queue = [Sequence(p, b) for p, b in zip(prompts, budgets)]
    order = list(queue)
    while queue or batch.running:
        while queue and batch.free_rows:
            batch.add(queue.pop(0))
        batch.step()
    assert [s.tokens for s in order] == [r[:b] for r, b in zip(ref, budgets)]
    assert batch.free_rows == 3


def test_steps_run_the_smallest_bucket_of_rows_holding_every_running_one():
    model = packed_model()
    prompts = [rand_prompt(n, seed=n).tolist() for n in LENGTHS]
    budgets = [12, 9, 2, 5, 3, 1, 4]  # the highest rows end first
    ref = batch1_reference(model, prompts, 12)
    model.setup_caches(6, 64)
    batch = Batch(model, GREEDY)
    assert batch.buckets == [1, 2, 4, 6]
    seen, order, queue = [], [Sequence(p, b) for p, b in zip(prompts, budgets)], None
    queue = list(order)
    while queue or batch.running:
        while queue and batch.free_rows:
            batch.add(queue.pop(0))
        if batch.running:
            seen.append(batch.bucket())
            assert seen[-1] >= max(s.row for s in batch.running) + 1
        batch.step()
    assert [s.tokens for s in order] == [r[:b] for r, b in zip(ref, budgets)]
    assert {1, 2, 4, 6} <= set(seen) and seen[-1] == 1  # the last sequence alone in row 0 steps one row


def test_a_removed_sequence_frees_its_row_at_once():
    model = packed_model()
    prompts = [rand_prompt(n, seed=n).tolist() for n in (6, 8, 4)]
    ref = batch1_reference(model, prompts, 10)
    model.setup_caches(2, 64)
    batch = Batch(model, GREEDY)
    a, b, c = (Sequence(p, 10) for p in prompts)
    batch.add(a)
    batch.add(b)
    assert batch.free_rows == 0
    for _ in range(3):
        batch.step()
    batch.remove(a)  # its client went away
    assert batch.free_rows == 1 and a.row is None and a.tokens == ref[0][:4] and a.finish_reason is None
    batch.add(c)  # takes a's row between steps
    while batch.running:
        batch.step()
    assert b.tokens == ref[1] and c.tokens == ref[2]


def test_compiled_rows_join_and_leave_without_recompiling():
    """Compiled (regional graphs): autoregressive and self-speculative batches give the batch-1
    output, and a second run, whose rows join and leave at other steps, compiles nothing."""
    model = packed_model()
    steps = compile_steps(torch.device("cpu"))
    prompts = [rand_prompt(n, seed=n).tolist() for n in LENGTHS]
    ref = batch1_reference(model, prompts, 16, steps=steps)
    model.setup_caches(4, 64)
    twin = copy.deepcopy(model)
    twin.setup_caches(4, 64)
    # autoregressive, self-speculative E=1 k=3, and a draft model with its own cache
    configs = [dict(), dict(exit_layer=1, num_speculations=3), dict(num_speculations=3, draft_model=twin)]
    for kw in configs:
        seqs, _ = generate_many(model, prompts, 16, GREEDY, steps=steps, **kw)
        assert [s.tokens for s in seqs] == ref, kw
    budgets = [16, 3, 16, 7, 1, 16, 5]  # rows leave at different steps: buckets of 4, 2 and 1 rows

    def varied():
        batch, seqs = Batch(model, GREEDY, steps), [Sequence(p, b) for p, b in zip(prompts, budgets)]
        queue = list(seqs)
        while queue or batch.running:
            while queue and batch.free_rows:
                batch.add(queue.pop(0))
            batch.step()
        return [s.tokens for s in seqs]
    expected = [r[:b] for r, b in zip(ref, budgets)]
    assert varied() == expected
    with torch._dynamo.config.patch(error_on_recompile=True):
        for kw in configs:
            seqs, _ = generate_many(model, prompts[::-1], 16, GREEDY, steps=steps, **kw)
            assert [s.tokens for s in seqs] == ref[::-1], kw
        assert varied() == expected


@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(0.8, top_k=3)])
def test_each_row_samples_from_its_batch1_distribution(params):
    """Every row of a batch (rows of different prompts beside it) draws its second token, the first
    decode step's, from the exact distribution batch-1 sampling has (over the first token's draws)."""
    V = 8
    model = pack_model(random_model(n_layers=3, vocab=V, dim=32, seed=3, scale=0.35))
    prompt = [1, 5, 2]
    with torch.no_grad():
        full = torch.cat([torch.tensor(prompt).expand(V, 3), torch.arange(V)[:, None]], 1)
        p1 = logits_to_probs(model(torch.tensor([prompt]))[0, -1], params)
        p2 = logits_to_probs(model(full)[:, -1], params)  # [first token, V]
    expected = p1 @ p2
    model.setup_caches(4, 16)
    counts = torch.zeros(V)
    torch.manual_seed(0)
    others = [[3, 3], [7, 1, 4, 6], [2]]
    for _ in range(300):
        seqs, _ = generate_many(model, [prompt, *others], 2, params)
        counts[seqs[0].tokens[1]] += 1
    stat, df = chi2(counts, expected)
    assert stat < _chi2_critical(df), stat
    stat, df = chi2(counts, p1)  # the test can tell a wrong distribution apart
    assert stat > _chi2_critical(df)


@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(1.2, top_p=0.75)])
def test_batched_self_speculative_sampling_matches_autoregressive_distribution(params):
    """Batched self-speculative sampling (4 rows of one prompt, E = 1, k = 2): the 2nd and 3rd tokens
    are distributed as under autoregressive sampling, and told apart from the draft's own."""
    V, E = 8, 1
    model = pack_model(random_model(n_layers=3, vocab=V, dim=32, seed=3, scale=0.35))
    prompt = torch.tensor([1, 5, 2])
    seqs = torch.cartesian_prod(torch.arange(V), torch.arange(V), torch.arange(V))
    full = torch.cat([prompt.expand(len(seqs), 3), seqs], 1)
    with torch.no_grad():
        p = logits_to_probs(model(full)[:, 2:5], params)
        q = logits_to_probs(model.head(model.run_layers(model.embed(full), None, 0, E))[:, 2:5], params)
    pick = lambda probs, i: probs[:, i].gather(1, seqs[:, i:i + 1])[:, 0]  # noqa: E731
    joint, wrong = pick(p, 0) * pick(p, 1) * pick(p, 2), pick(p, 0) * pick(q, 1) * pick(q, 2)
    model.setup_caches(4, 16)
    counts = torch.zeros(2, V)
    torch.manual_seed(1234)
    for _ in range(300):
        out, _ = generate_many(model, [prompt.tolist()] * 4, 3, params, exit_layer=E, num_speculations=2)
        for s in out:
            counts[0, s.tokens[1]] += 1
            counts[1, s.tokens[2]] += 1
    for pos in (0, 1):
        marginal = torch.zeros(V).index_add_(0, seqs[:, pos + 1], joint)
        stat, df = chi2(counts[pos], marginal)
        assert stat < _chi2_critical(df), (pos, stat)
    stat, df = chi2(counts[0], torch.zeros(V).index_add_(0, seqs[:, 1], wrong))
    assert stat > 3 * _chi2_critical(df)


def test_bad_batches_are_refused_before_any_work():
    model = packed_model()
    model.setup_caches(2, 32)
    with pytest.raises(ValueError, match="KV cache holds 32"):
        generate_many(model, [[1, 2, 3], list(range(3, 30))], 10, GREEDY)
    with pytest.raises(ValueError, match="the prompt is empty"):
        generate_many(model, [[1, 2], []], 4, GREEDY)
    with pytest.raises(ValueError, match="speculation lookahead"):
        generate_many(model, [list(range(3, 25))], 8, GREEDY, exit_layer=1, num_speculations=4)
    with pytest.raises(ValueError, match="give a draft source"):
        generate_many(model, [[1, 2]], 4, GREEDY, num_speculations=4)
    with pytest.raises(ValueError, match="cache rows"):
        model.cache_rows(2, 3).__enter__()


@pytest.mark.parametrize("path", ["kernels", "sdpa", "compiled without kernels"])
def test_per_row_positions_match_the_uncached_forward(path):
    """A decode step of 3 sequences at their own positions (input_pos [B, 1]) gives each row the
    logits of that sequence's full uncached forward pass: rope, cache writes and masks per row, on
    the CPU kernels, PyTorch's SDPA, and the compiled fixed-order attention."""
    model = random_model()
    if path == "kernels":
        pack_model(model)
    steps = compile_steps(torch.device("cpu")) if path.startswith("compiled") else None
    seqs = [rand_prompt(n, seed=n) for n in (6, 11, 2)]
    model.setup_caches(3, 32)
    with torch.no_grad():
        for row, s in enumerate(seqs):
            with model.cache_rows(row, row + 1):
                model(s[None, :-1], torch.arange(len(s) - 1))
        x = torch.stack([s[-1:] for s in seqs])
        pos = torch.tensor([[len(s) - 1] for s in seqs])

        def step(model, x, pos, *_):
            return model(x, pos)
        if steps is not None:
            from steps import regional
            step = regional(step, steps.decode.layer_graph)
        logits = step(model, x, pos)
        for row, s in enumerate(seqs):
            torch.testing.assert_close(logits[row, -1], model(s[None])[0, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k", [0, 3])
def test_a_free_row_never_walks_past_the_cache(k):
    """A row that stays free while others run many steps rides along at position 0: sequences one
    after another, each nearly filling the cache, run to the end (no position past the cache)."""
    model = packed_model()
    prompts = [rand_prompt(n, seed=n).tolist() for n in (4, 6, 5)]
    model.setup_caches(1, 40)
    ref = [generate(model, torch.tensor(p), 30, GREEDY)[0][0, len(p):].tolist() for p in prompts]
    model.setup_caches(2, 40)
    batch = Batch(model, GREEDY, exit_layer=1 if k else None, num_speculations=k)
    for p, r in zip(prompts, ref):
        seq = Sequence(p, 30)
        batch.add(seq)
        while batch.running:
            batch.step()
        assert seq.tokens == r and batch.free_rows == 2


class Cycling(BatchPolicy):
    """Runs every candidate (E, k) in turn, plain steps included: each kind of batched round follows
    each other kind (E switches, and a draft model's catch-up after plain steps)."""

    def __init__(self, exits, ks, shared):
        super().__init__({}, exits, ks, shared)
        self.i, self.seen = 0, []

    def choose(self, b):
        self.i += 1
        return self.candidates()[self.i % len(self.candidates())]

    def observe(self, b, E, k, hits, judged, seconds):
        self.seen.append((b, E, k, hits, judged))


def test_a_batch_evaluates_guards_once_a_shape_and_times_only_steady_rounds(monkeypatch):
    """A batch's rounds switch kinds (a policy's (E, k), plain steps): a round of a shape the batch
    ran before skips the compiled steps' guards, whatever ran in between, as the one-sequence loop
    does; only the shape's first round evaluates them, and its time (guards, maybe compiling) is
    not given to the policy as a round's. (The guards were skipped only for the shape of the round
    before, so every switch of an adaptive policy paid them and the rounds switched to looked slower:
    a 2-row k = 4 round 70 ms where it takes 54.)"""
    import batching
    model = packed_model()
    prompts = [rand_prompt(n, seed=n).tolist() for n in LENGTHS]
    ref = batch1_reference(model, prompts, 12)
    model.setup_caches(2, 64)
    stances, set_stance = [], torch.compiler.set_stance
    monkeypatch.setattr(batching.torch.compiler, "set_stance",
                        lambda **kw: stances.append(kw["skip_guard_eval_unsafe"]) or set_stance(**kw))
    timed = []

    class Recording(Cycling):
        def observe(self, b, E, k, hits, judged, seconds):
            timed.append(((b, E, k), seconds))
            super().observe(b, E, k, hits, judged, seconds)
    policy = Recording((1, 3), (2,), True)
    seqs, _ = generate_many(model, prompts, 12, GREEDY, policy=policy)
    assert [s.tokens for s in seqs] == ref
    shapes = {shape for shape, _ in timed}
    assert len(shapes) >= 4 and len(timed) > 2 * len(shapes)  # every kind, each several times, alternating
    assert stances.count(False) == len(shapes)  # one guarded round a shape
    untimed = [shape for shape, seconds in timed if seconds is None]
    assert sorted(untimed, key=str) == sorted(shapes, key=str)
    assert all(seconds > 0 for _, seconds in timed if seconds is not None)


@pytest.mark.parametrize("kind", ["early exit", "fixed round", "policy"])
def test_compile_rounds_runs_every_shape_a_batch_can_step(kind):
    """Batch.compile_rounds (the warm-up of serve.py and batch_speed.py) runs, for every bucket of
    rows, each step or round the batch can take: the early exit's step, the fixed (E, k), a plain
    step and every (E, k) of a policy; then the batch decodes as if it had not (each row its
    batch-1 output)."""
    model = packed_model()
    prompts = [rand_prompt(n, seed=i).tolist() for i, n in enumerate((1, 2, 2, 1))]
    kw = {"early exit": dict(exit_layer=1), "fixed round": dict(exit_layer=1, num_speculations=3),
          "policy": dict(policy=Cycling((1, 3), (2, 4, 8), True))}[kind]
    ref = batch1_reference(model, prompts, 2, exit_layer=kw.get("exit_layer") if kind == "early exit" else None)
    model.setup_caches(4, 12)  # each round from position 1: a policy's six rounds one after another would pass 12
    batch = Batch(model, GREEDY, **kw)
    shapes = []
    plain, drafted = batch._decode, batch._round
    batch._decode = lambda b, E: shapes.append((b, E)) or plain(b, E)
    batch._round = lambda b, E, k: shapes.append((b, E, k)) or drafted(b, E, k)
    batch.compile_rounds()
    # a fixed round never steps plainly: no decode graph
    steps = {"early exit": [(1,)], "fixed round": [(1, 3)],
             "policy": [(None,)] + [(E, k) for E in (1, 3) for k in (2, 4, 8)]}
    assert sorted(shapes, key=str) == sorted([(b, *s) for b in (1, 2, 4) for s in steps[kind]], key=str)
    assert batch.free_rows == 4
    seqs, _ = generate_many(model, prompts, 2, GREEDY, **kw)
    assert [s.tokens for s in seqs] == ref


@pytest.mark.parametrize("draft", ["shared", "int8 copy", "twin"])
def test_policy_rounds_of_every_kind_equal_batch1_greedy_output(draft):
    """Batched rounds whose (E, k) change every round, plain steps among them: each row is still
    its batch-1 greedy decoding, and a draft model's cache catches up on the plain steps it missed
    (an identical twin accepts every draft)."""
    model = packed_model()
    prompts = [rand_prompt(n, seed=n).tolist() for n in LENGTHS]
    ref = batch1_reference(model, prompts, 20)
    drafter = {"shared": None, "int8 copy": quantized_copy(model, "int8", None), "twin": copy.deepcopy(model)}[draft]
    for rows in (1, 3):
        model.setup_caches(rows, 64)
        policy = Cycling((1, 3) if drafter is None else (None,), (1, 2, 4), drafter is None)
        if drafter is not None:
            drafter.setup_caches(rows, 64)
        seqs, stats = generate_many(model, prompts, 20, GREEDY, draft_model=drafter, policy=policy)
        assert [s.tokens for s in seqs] == ref, rows
        kinds = {(E, k) for _, E, k, _, _ in policy.seen}
        assert kinds == set(policy.candidates())
        if draft == "twin":
            assert stats.accepted == stats.drafted > 0
        else:
            assert 0 < stats.accepted < stats.drafted
        assert all(s.stats.adaptive and s.stats.chosen for s in seqs)


def test_batch_policy_chooses_plain_steps_where_rounds_stop_paying():
    """From costs per number of rows: at 1 row a round of 4 drafts costs 2 steps (it pays at high
    acceptance), at 8 rows it costs 6 (it never pays); the policy speculates at 1 row and steps
    plainly at 8, and leaves speculation once its drafts are rejected."""
    from adaptive import StepCosts
    costs = {1: StepCosts(1.0, {}, {(None, 4): 2.0}), 8: StepCosts(1.0, {}, {(None, 4): 6.0})}
    policy = BatchPolicy(costs, (None,), (4,), shared=False)
    policy.timing = False
    for _ in range(5):
        policy.observe(1, None, 4, 40, 40, 0.0)  # every draft accepted
    assert policy.choose(1) == (None, 4)
    assert policy.choose(8) == (None, 0)
    for _ in range(40):
        policy.choose(1)
        policy.observe(1, None, 4, 0, 10, 0.0)  # every draft rejected
    assert policy.choose(1) == (None, 0)


def test_batch_policy_predicts_every_kind_at_the_machines_present_speed(monkeypatch):
    """A machine that slows down (a neighbour) slows every kind of round alike: the kind running
    then must not look slower than kinds timed before, at their old speed. At 2 rows, k = 4 yields
    15% more per second than k = 2; after 40 rounds of k = 4 at 1.5 times their time, k = 2 is
    predicted 1.5 times slower too, and k = 4 stays chosen (with one moving average of seconds per
    kind, k = 4 looked 1.5 times slower than k = 2 at its old timing, and k = 2 was chosen)."""
    import adaptive
    from adaptive import StepCosts
    monkeypatch.setattr(adaptive, "EXPLORE_EVERY", 10 ** 9)  # no rival tried
    policy = BatchPolicy({2: StepCosts(1.0, {}, {(None, 2): 1.6, (None, 4): 2.2})}, (None,), (2, 4), shared=False)
    for k, seconds in ((2, 1.6), (4, 2.2)):
        for _ in range(2):  # the first timing of each is skipped
            policy.observe(2, None, k, 19, 20, seconds)
    assert policy.choose(2) == (None, 4)
    k2 = policy.predicted(2, None, 2)
    for _ in range(40):
        assert policy.choose(2) == (None, 4)
        policy.observe(2, None, 4, 19, 20, 3.3)
    assert policy.speed * policy.factor[(2, None, 4)] == pytest.approx(1.5, rel=0.02)
    assert policy.predicted(2, None, 2) < k2 / 1.3  # k = 2 is predicted slower with the machine
    assert policy.predicted(2, None, 4) > policy.predicted(2, None, 2)


def test_compiled_policy_rounds_never_recompile():
    """Compiled: the policy's costs, measured per bucket of rows (Batch.measure_costs), compile
    every graph its rounds use; then rounds of every kind, rows joining and leaving, compile
    nothing, and each row is its batch-1 greedy decoding."""
    model = packed_model()
    steps = compile_steps(torch.device("cpu"))
    prompts = [rand_prompt(n, seed=n).tolist() for n in LENGTHS]
    ref = batch1_reference(model, prompts, 12, steps=steps)
    model.setup_caches(2, 64)
    costs = Batch(model, GREEDY, steps, 1, 2).measure_costs((1, 3), (2,), repeats=1)
    assert sorted(costs) == [1, 2]
    assert all(c.decode > 0 and set(c.verify) == {(1, 2), (3, 2)} for c in costs.values())
    with torch._dynamo.config.patch(error_on_recompile=True):
        seqs, _ = generate_many(model, prompts, 12, GREEDY, steps=steps, policy=Cycling((1, 3), (2,), True))
        assert [s.tokens for s in seqs] == ref
        real = BatchPolicy(costs, (1, 3), (2,), True)
        seqs, _ = generate_many(model, prompts, 12, GREEDY, steps=steps, policy=real)
        assert [s.tokens for s in seqs] == ref


@pytest.mark.parametrize("draft", [None, "int8 self-draft", "int8 self-draft in the model's cache"])
@pytest.mark.parametrize("strategy", [(None, 0), (1, 3)], ids=["autoregressive", "self_spec_E1_k3"])
def test_prompts_prefilled_in_chunks_between_steps_equal_batch1_greedy(strategy, draft):
    """Long prompts prefilled a chunk at a time while the other rows decode (a server's chunked
    prefill): every row's tokens are still its batch-1 greedy decoding (whole-prompt prefill), the
    rows still prefilling ride along the steps as padding without touching what they have filled,
    including a draft model's own cache."""
    exit_layer, k = strategy
    if draft and not k:
        pytest.skip("a draft model drafts for speculative decoding")
    model = packed_model()
    draft_model = quantized_copy(model, "int8", None, n_layers=2) if draft else None
    lengths = (3, 45, 9, 60, 21, 2, 37)
    prompts = [rand_prompt(n, seed=100 + n).tolist() for n in lengths]
    ref = batch1_reference(model, prompts, 16, exit_layer=None if k else exit_layer, size=96)
    assert_varied(sum(ref, []), 0.1)
    model.setup_caches(3, 96)
    if draft_model is not None:
        draft_model.share_caches(model) if "model's cache" in draft else draft_model.setup_caches(3, 96)
    streamed = {}
    seqs, stats = generate_many(model, prompts, 16, GREEDY, exit_layer=exit_layer, num_speculations=k,
                                draft_model=draft_model, prefill_chunk=8,
                                on_tokens=lambda i, ids: streamed.setdefault(i, []).extend(ids))
    assert [s.tokens for s in seqs] == ref
    assert [streamed[i] for i in range(len(prompts))] == ref
    # the long prompts took several chunks, each between steps of the rows already running
    assert stats.steps < sum(16 - 1 for _ in prompts)


@pytest.mark.parametrize("k", [0, 2], ids=["autoregressive", "self_spec_E1_k2"])
def test_rows_with_their_own_sampling_settings_share_the_steps(k):
    """Rows sampling with different settings in one batch (a server's requests): the greedy rows
    give exactly their batch-1 greedy tokens, and a sampled row draws its second token from its
    own batch-1 distribution, whatever its neighbours sample with."""
    V = 8
    model = pack_model(random_model(n_layers=3, vocab=V, dim=32, seed=3, scale=0.35))
    mine, hot = SamplingParams(0.8, top_k=3), SamplingParams(1.5, top_p=0.9)
    prompt, greedy_prompts = [1, 5, 2], [[3, 3], [7, 1, 4, 6]]
    with torch.no_grad():
        full = torch.cat([torch.tensor(prompt).expand(V, 3), torch.arange(V)[:, None]], 1)
        expected = logits_to_probs(model(torch.tensor([prompt]))[0, -1], mine) @ \
            logits_to_probs(model(full)[:, -1], mine)
    ref = batch1_reference(model, greedy_prompts, 6, size=16)
    model.setup_caches(4, 16)
    counts = torch.zeros(V)
    torch.manual_seed(0)
    for _ in range(300):
        batch = Batch(model, GREEDY, exit_layer=1 if k else None, num_speculations=k)
        seqs = [Sequence(prompt, 2, sampling=mine), Sequence(greedy_prompts[0], 6),
                Sequence([2, 6, 1], 6, sampling=hot), Sequence(greedy_prompts[1], 6, sampling=SamplingParams(0.0, 50))]
        for s in seqs:
            batch.add(s)
        while batch.running:
            batch.step()
        assert [seqs[1].tokens, seqs[3].tokens] == ref
        counts[seqs[0].tokens[1]] += 1
    stat, df = chi2(counts, expected)
    assert stat < _chi2_critical(df), stat


def test_a_sequence_removed_while_its_prompt_is_prefilled_frees_its_row():
    """A request cancelled halfway through its chunked prefill leaves at once; the next sequence
    takes its row and decodes exactly as alone."""
    model = packed_model()
    long, short = rand_prompt(50, seed=7).tolist(), rand_prompt(6, seed=8).tolist()
    ref = batch1_reference(model, [short], 10, size=96)
    model.setup_caches(1, 96)
    batch = Batch(model, GREEDY)
    gone = Sequence(long, 10)
    assert batch.add(gone, chunk=16) == [] and batch.free_rows == 0
    batch.fill(16)
    batch.remove(gone)
    assert batch.free_rows == 1 and not batch.filling and not gone.tokens
    seq = Sequence(short, 10)
    batch.add(seq, chunk=16)
    while batch.running:
        batch.step()
    assert seq.tokens == ref[0]


@pytest.mark.parametrize("weights", [None, ("int8", None)], ids=["float32", "int8"])
def test_a_bfloat16_kv_cache_keeps_every_row_exact(weights):
    """--kv_cache_dtype bfloat16 on a float32 model: the caches hold half the bytes, and since the
    attention widens each cached value exactly, self-speculation still gives greedy decoding's tokens
    and each batched row its batch-1 tokens, eager and compiled."""
    model = packed_model(weights)
    prompts = [rand_prompt(n, seed=n).tolist() for n in LENGTHS]
    x, pos = torch.tensor([prompts[3]]), torch.arange(len(prompts[3]))  # 9 rows: the kernel's path

    def logits():
        model.setup_caches(1, 64)
        with torch.no_grad():
            return model(x, pos)
    float32_logits = logits()
    model.kv_cache_dtype = torch.bfloat16
    rounded = logits()  # the keys and values rounded: close, not equal
    assert not torch.equal(rounded, float32_logits)
    assert (rounded - float32_logits).abs().max() < 0.05 * float32_logits.abs().max()
    cache = model.layers[0].attention.kv_cache
    assert cache.k_cache.dtype == cache.v_cache.dtype == torch.bfloat16
    ref = batch1_reference(model, prompts, 16)
    assert_varied(sum(ref, []), 0.1)
    model.setup_caches(1, 64)
    for p, r in zip(prompts, ref):
        out, _ = speculative_generate(model, torch.tensor(p), 16, GREEDY, 3, exit_layer=1)
        assert out[0, len(p):].tolist() == r
    model.setup_caches(3, 64)
    for kw in (dict(), dict(exit_layer=1, num_speculations=3)):
        seqs, _ = generate_many(model, prompts, 16, GREEDY, **kw)
        assert [s.tokens for s in seqs] == ref, kw
    if weights is None:
        steps = compile_steps(torch.device("cpu"))
        seqs, _ = generate_many(model, prompts, 16, GREEDY, steps=steps, exit_layer=1, num_speculations=3)
        assert [s.tokens for s in seqs] == ref
