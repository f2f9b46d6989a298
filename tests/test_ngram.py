"""ngram.NgramIndex against a brute-force search of the text."""
import random

import pytest

from ngram import NgramIndex


def brute_force(tokens, k, max_n, min_n):
    """The longest n in [min_n, max_n] whose newest n-gram occurred earlier (ending before the last
    token), and the k tokens after its latest such occurrence, the text read as if it went on
    repeating what followed that occurrence (each new token a copy of the one as far back as the
    occurrence's end is from the newest token)."""
    L = len(tokens)
    for n in range(min(max_n, L), min_n - 1, -1):
        suffix = tokens[L - n:]
        for end in range(L - 2, n - 2, -1):
            if tokens[end + 1 - n:end + 1] == suffix:
                text = list(tokens)
                for i in range(k):
                    text.append(text[end + 1 + i])
                return text[L:], n
    return [], 0


@pytest.mark.parametrize("max_n, min_n", [(4, 1), (3, 2), (1, 1), (6, 3)])
@pytest.mark.parametrize("alphabet", [2, 5, 50])
def test_proposals_equal_a_brute_force_search(max_n, min_n, alphabet):
    """At every length of random token sequences (small alphabets repeat a lot, large ones rarely),
    fed one token or several at a time, the proposal is the brute-force one."""
    rng = random.Random(alphabet * 100 + max_n * 10 + min_n)
    for trial in range(20):
        tokens = [rng.randrange(alphabet) for _ in range(rng.randrange(1, 80))]
        index = NgramIndex(tokens[:1], max_n=max_n, min_n=min_n)
        i = 1
        while True:
            for k in (1, 3, 8):
                assert index.propose(k) == brute_force(tokens[:i], k, max_n, min_n), (tokens[:i], k)
            if i == len(tokens):
                break
            step = rng.randrange(1, 4)
            index.extend(tokens[i:i + step])
            i = min(i + step, len(tokens))


def test_a_copied_span_is_proposed_and_the_longest_match_wins():
    text = [7, 1, 2, 3, 4, 5, 9, 9, 1, 2, 3]
    assert NgramIndex(text).propose(3) == ([4, 5, 9], 3)
    # "3" alone last followed by 4 (position 3); with 2-grams, "2 3" too; the 4-gram "9 1 2 3" never occurred
    assert NgramIndex(text, max_n=2).propose(2) == ([4, 5], 2)
    assert NgramIndex([1, 2, 3]).propose(4) == ([], 0)
    # a loop: "5 6 7" again; its latest earlier occurrence ends 3 tokens back, so the proposal repeats that period
    assert NgramIndex([1, 5, 6, 7, 5, 6, 7]).propose(7) == ([5, 6, 7, 5, 6, 7, 5], 3)
    assert NgramIndex([3, 3]).propose(3) == ([3, 3, 3], 1)
    assert NgramIndex([]).propose(4) == ([], 0)
    with pytest.raises(ValueError, match="min_n"):
        NgramIndex([], max_n=2, min_n=3)


# ---------------------------------------------------------------- n-gram drafts in the rounds

import torch  # noqa: E402

from decoding import MAX_SPECULATIONS, Strategy, generate, speculative_generate  # noqa: E402
from ngram import CARRIED_PROPOSALS, EXPLORE_EVERY, SourceChooser  # noqa: E402
from sampling import SamplingParams, logits_to_probs  # noqa: E402
from test_decoding import _chi2_critical, chi2, rand_prompt, random_model  # noqa: E402

GREEDY = SamplingParams()


def repeating_prompt(n, seed):
    """A random span, then the same span again: the second copy's n-grams all occurred before."""
    span = rand_prompt(n, seed=seed).tolist()
    return torch.tensor(span + span[:n // 2])


def draft_models(kw: dict, model, rows: int, size: int) -> dict:
    """The tests' draft options: two_model, a separate model with its own cache; quantized, an
    int8 copy of the model's layers drafting into the model's cache (as the engine sets it up)."""
    from quantized import quantized_copy
    kw = dict(kw)
    if kw.pop("two_model", False):
        kw["draft_model"] = random_model(n_layers=2, seed=1)
        kw["draft_model"].setup_caches(rows, size)
    if kw.pop("quantized", False):
        kw["draft_model"] = quantized_copy(model, "int8")
        kw["draft_model"].share_caches(model)
    return kw


@pytest.mark.parametrize("source, draft", [("ngram", {}), ("auto", {"exit_layer": 2}), ("auto", {"two_model": True}),
                                           ("auto", {"quantized": True})])
@pytest.mark.parametrize("ngram_tokens", [1, 3, 8])
def test_greedy_equals_autoregressive_with_every_source(source, draft, ngram_tokens):
    """Prompts built to repeat and prompts that never do, through n-gram-only and mixed rounds
    (self-speculative from the shared cache, a draft model with its own cache, which must catch
    up on what n-gram rounds kept, and the int8 self-draft drafting into the model's cache, which
    never does): the output is plain greedy decoding's."""
    model = random_model()
    model.setup_caches(1, 160)
    kw = draft_models(draft, model, 1, 160)
    totals = {}
    for seed in range(4):
        prompt = repeating_prompt(16, seed) if seed % 2 == 0 else rand_prompt(9, seed=seed)
        ref, _ = generate(model, prompt, 48, GREEDY)
        # choices from fixed costs, not clocks: which rounds verify proposals then does not depend
        # on the machine's speed (the counts below do)
        out, stats = speculative_generate(model, prompt, 48, GREEDY, 3, draft_source=source,
                                          ngram_tokens=ngram_tokens, chooser=SourceChooser(3, clocks=False), **kw)
        assert out.tolist() == ref.tolist(), seed
        assert stats.new_tokens == 48
        if draft.get("quantized"):
            assert stats.catch_ups == 0
        for name, counts in stats.by_source.items():
            totals[name] = [a + b for a, b in zip(totals.get(name, [0, 0, 0]), counts)]
    rounds, made, kept = totals["ngram"]
    assert rounds > 0 and 0 < kept < made  # proposals were verified, some kept and some rejected
    if source == "auto":
        assert totals["model"][0] > 0  # the model drafted too


def test_stops_and_budgets_inside_a_proposal():
    model = random_model()
    model.setup_caches(1, 128)
    prompt = repeating_prompt(20, 3)
    ref, _ = generate(model, prompt, 40, GREEDY)
    for budget in range(1, 14):
        out, stats = speculative_generate(model, prompt, budget, GREEDY, 3, draft_source="ngram")
        assert out[0].tolist() == ref[0, :len(prompt) + budget].tolist() and stats.new_tokens == budget
    stop = ref[0, len(prompt) + 9].item()
    expected = ref[0, :len(prompt) + ref[0, len(prompt):].tolist().index(stop) + 1].tolist()
    out, _ = speculative_generate(model, prompt, 40, GREEDY, 3, draft_source="auto", exit_layer=3, stop_ids={stop})
    assert out[0].tolist() == expected


def twin_drafts_after_ngram_rounds(chooser=None):
    """An identical twin of a random model drafts for it with its own cache among n-gram rounds
    (auto): it accepts every draft only if each of its rounds sees every position before it,
    those the n-gram rounds kept included. Checks the output against greedy decoding and that the
    model's rounds kept every draft; returns the output."""
    import copy
    model = random_model()
    twin = copy.deepcopy(model)
    for m in (model, twin):
        m.setup_caches(1, 160)
    prompt = repeating_prompt(16, 0)
    ref, _ = generate(model, prompt, 48, GREEDY)
    out, stats = speculative_generate(model, prompt, 48, GREEDY, 3, draft_model=twin, draft_source="auto",
                                      chooser=chooser)
    assert out.tolist() == ref.tolist()
    rounds, made, kept = stats.by_source["model"]
    assert stats.by_source["ngram"][0] > 0 and rounds > 0 and kept == made > 0
    return out


def test_a_draft_model_catches_up_on_what_ngram_rounds_kept(monkeypatch):
    """The twin's first draft step after n-gram rounds takes what they kept too (one pass, padded
    in front with positions it has seen), not a pass of its own."""
    import decoding
    separate = []
    monkeypatch.setattr(decoding.Speculation, "catch_up_pending", lambda self, pos, E: separate.append(pos))
    twin_drafts_after_ngram_rounds()
    assert not separate


def test_a_catch_up_too_long_for_the_first_draft_step_runs_as_passes_of_its_own(monkeypatch):
    """Where the first draft step cannot take the catch-up (more than 15 positions, or too near the
    start of the cache: merged_catch_up returns None), catch_up_pending runs it before the round,
    once per switch back, and the twin still keeps every draft."""
    import decoding
    separate = []
    original = decoding.Speculation.catch_up_pending
    monkeypatch.setattr(decoding.Speculation, "merged_catch_up", lambda self, pos, E: None)
    monkeypatch.setattr(decoding.Speculation, "catch_up_pending",
                        lambda self, pos, E: separate.append((pos, list(self.pending))) or original(self, pos, E))
    out = twin_drafts_after_ngram_rounds(SourceChooser(3, clocks=False))  # the same rounds on any machine
    # each pass wrote the text's own ids at the positions before its round, none of them twice
    assert separate and all(ids == out[0, pos - len(ids):pos].tolist() for pos, ids in separate)
    taken = [p for pos, ids in separate for p in range(pos - len(ids), pos)]
    assert len(taken) == len(set(taken))


@pytest.mark.parametrize("params", [SamplingParams(0.8, top_k=3)])
def test_sampling_keeps_the_model_distribution(params):
    """A repeating prompt makes every round propose; the 2nd and 3rd sampled tokens are distributed
    as under autoregressive sampling (a one-hot draft distribution in the acceptance rule)."""
    model = random_model(n_layers=3, vocab=8, dim=32, seed=3, scale=0.35)
    model.setup_caches(1, 24)
    V, n = 8, 1000
    prompt = torch.tensor([1, 5, 2, 1, 5, 2, 1, 5])
    seqs = torch.cartesian_prod(torch.arange(V), torch.arange(V), torch.arange(V))
    full = torch.cat([prompt.expand(len(seqs), len(prompt)), seqs], 1)
    T = len(prompt)
    with torch.no_grad():
        p = logits_to_probs(model(full)[:, T - 1:T + 2], params)
    joint = p[:, 0].gather(1, seqs[:, :1])[:, 0] * p[:, 1].gather(1, seqs[:, 1:2])[:, 0] * \
        p[:, 2].gather(1, seqs[:, 2:])[:, 0]
    counts = torch.zeros(2, V)
    torch.manual_seed(1234)
    made = kept = 0
    for _ in range(n):
        out, stats = speculative_generate(model, prompt, 3, params, 3, draft_source="ngram", ngram_tokens=2)
        counts[0, out[0, T + 1]] += 1
        counts[1, out[0, T + 2]] += 1
        _, m, a = stats.by_source.get("ngram", (0, 0, 0))
        made, kept = made + m, kept + a
    assert 0 < kept < made
    for pos in (0, 1):
        marginal = torch.zeros(V).index_add_(0, seqs[:, pos + 1], joint)
        stat, df = chi2(counts[pos], marginal)
        assert stat < _chi2_critical(df), (pos, stat)


def test_the_chooser_prefers_what_yields_more_per_second():
    c = SourceChooser()
    ngram, model, plain = ("ngram", 4), ("model",), ("plain",)
    assert c.choose({ngram: 2.0, plain: 1.0, model: None}) == ngram  # nothing timed yet: try in order
    for _ in range(3):
        c.observe_round(ngram, 0.010, 3)
    assert c.choose({ngram: 2.0, plain: 1.0, model: None}) == plain
    for _ in range(3):
        c.observe_round(plain, 0.008, 1)  # 125 tokens/s
    assert c.choose({ngram: 2.0, plain: 1.0, model: None}) == model
    for _ in range(3):
        c.observe_round(model, 0.030, 3)  # 100 tokens/s
    assert c.choose({ngram: 1.5, plain: 1.0, model: None}) == ngram  # 150 tokens/s expected
    assert c.choose({ngram: 1.1, plain: 1.0, model: None}) == plain  # 110
    assert c.choose({plain: 1.0, model: None}) == plain
    for _ in range(50):  # matches of length 1 never accepted, of length 4 always
        c.observe_ngram(1, 4, 0)
        c.observe_ngram(4, 4, 4)
    assert c.expected(1, 1) - 1 < 0.05 and c.expected(4, 1) - 1 > 0.95  # the first token kept
    assert c.expected(4, 4) > 4.5 and c.expected(1, 4) < 1.2
    for _ in range(50):  # half the proposals kept whole, half lost at once: half of what is proposed
        c.observe_ngram(2, 8, 8)
        c.observe_ngram(2, 8, 0)
    assert abs(c.expected(2, 8) - 5.0) < 0.3
    for _ in range(50):  # copies of 3 tokens: a longer pass adds nothing (the share of all proposed: 4 of 15)
        c.observe_ngram(3, 15, 3)
    assert c.expected(3, 3) > 3.9 and c.expected(3, 15) - c.expected(3, 4) < 0.05
    assert abs(c.expected(3, 2) - 3.0) < 0.1  # (the model's own token, and two kept)
    for model_s, tried in ((0.040, False), (0.026, True)):  # 75 or 115 tokens/s against plain's 125
        c = SourceChooser()
        for _ in range(2):
            c.observe_round(plain, 0.008, 1)
            c.observe_round(model, model_s, 3)
        for _ in range(EXPLORE_EVERY):  # the model's round not run for a while: tried again if it came close
            assert c.choose({plain: 1.0, model: None}) == plain
            c.observe_round(plain, 0.008, 1)
        assert (c.choose({plain: 1.0, model: None}) == model) == tried
    for _ in range(3):  # a stall counts as twice the estimate at most
        c.observe_round(plain, 0.008, 1)
    c.observe_round(plain, 1.0, 1)
    assert c.seconds[plain] < 0.0096
    c = SourceChooser()  # the draft model's catch-up on what other rounds kept, where it is due
    for _ in range(2):
        c.observe_round(plain, 0.008, 1)  # 125 tokens/s
        c.observe_round(model, 0.020, 3)  # 150 tokens/s, its catch-up not included
        c.observe_round(("ngram", 4), 0.010, 3)
    c.observe_catch_up(0.030, 10)  # 3 ms a token behind
    assert c.seconds[plain] == pytest.approx(0.008) and c.seconds[model] == pytest.approx(0.020)
    # model rounds pay best (1.4 tokens in 10 ms is 140/s): the proposal is charged the catch-up
    # of what it would keep (98/s), the model round not what is behind
    assert c.choose({("ngram", 4): 1.4, plain: 1.0, model: None}, behind=50) == model
    # the proposal pays best (160/s): it is not charged; a model round is, for what is behind, so
    # that it is not tried again while far behind
    opts = {("ngram", 4): 1.6, plain: 1.0, model: None}
    assert c.choose(opts, behind=50) == ("ngram", 4)
    for _ in range(EXPLORE_EVERY):
        assert c.choose({("ngram", 4): 1.6, plain: 1.0}) == ("ngram", 4)
        c.observe_round(("ngram", 4), 0.010, 2)
    assert c.choose(opts, behind=20) == ("ngram", 4)  # 3 tokens in 80 ms: not within reach
    assert c.choose(opts, behind=0) == model  # 150/s within EXPLORE_WITHIN of 160: tried again
    new = {("ngram", 4): 1.6, plain: 1.0, ("model", 2): None}  # a model round of a new shape, untimed
    assert c.choose(new, behind=30) == ("ngram", 4)  # not tried while the draft is behind
    assert c.choose(new, behind=0) == ("model", 2)
    c.observe_catch_up(1.0, 10)  # a stall counts as twice the estimate at most
    assert c.catch_up_cost(10) == pytest.approx(0.033)
    c = SourceChooser()  # catch-ups of 2 and 16 positions: a fixed part a pass, and a part a token
    for _ in range(10):
        c.observe_catch_up(0.013, 2)
        c.observe_catch_up(0.025, 16)
    assert c.catch_up_cost(0) == 0.0
    assert c.catch_up_cost(2) == pytest.approx(0.013, rel=0.05) and c.catch_up_cost(16) == pytest.approx(0.025, rel=0.05)
    assert c.catch_up_cost(3) > 0.013  # 3 kept tokens among model rounds cost the next one a pass, not 3 x 1.5 ms
    assert c.catch_up_cost(19) - c.catch_up_cost(16) < 0.003  # ... where the draft is behind already, their tokens
    fixed = SourceChooser(k=4, clocks=False)  # decode steps: 2 tokens in 1.2 beat 1 in 1 and 4 in 3
    fixed.observe_round(model, 0.0, 4)
    assert fixed.choose({("ngram", 4): 2.0, plain: 1.0, model: None}) == ("ngram", 4)
    assert fixed.choose({plain: 1.0, model: None}) == model


def test_a_new_text_weighs_what_earlier_texts_kept_as_a_prior_only():
    """A text whose proposals failed (chat) must not keep them from being tried on one that copies
    (a code edit): a new text keeps the earlier shares but at the weight of CARRIED_PROPOSALS."""
    def after(new_text):
        c = SourceChooser()
        for _ in range(100):  # matches of length 3 in the first text: the first token kept, never more
            c.observe_ngram(3, 8, 1)
        before = [kept / checked for checked, kept in c.hits[3][:2]]  # 1 and 0 (no proposal got further)
        if new_text:
            c.new_text()
            assert [checked for checked, _ in c.hits[3]] == [CARRIED_PROPOSALS] * 2 + [0.0] * 6
            assert [kept / checked for checked, kept in c.hits[3][:2]] == pytest.approx(before)  # the same shares
        for _ in range(3):  # the new text copies whole
            c.observe_ngram(3, 8, 8)
        return c.expected(3, 8)
    assert after(new_text=False) < 2.5  # 3 proposals against the first text's (decayed) 43
    assert after(new_text=True) > 4.5  # against 2: half of the 8 proposed tokens expected already


def test_every_round_tells_the_chooser_whether_the_proposal_started_right():
    """A round of another kind is free evidence on the proposal made before it: its first token
    is kept or not as the round's first token is the proposed one (later positions are seen only
    where the round went far, which is where copies go on, so they are left to n-gram rounds)."""
    c = SourceChooser()
    c.observe_unverified(3, [7, 8, 9], [7, 8, 1])
    c.observe_unverified(3, [5, 6], [4])
    c.observe_unverified(3, [], [4])  # no proposal: nothing
    c.observe_unverified(2, [5], [])  # no tokens (the budget was spent): nothing
    assert c.hits == {3: [[1.0 * c.decay + 1.0, 1.0 * c.decay]]}
    for _ in range(100):  # the text's proposals failed whenever they were verified ...
        c.observe_ngram(4, 8, 0)
    assert c.expected(4, 1) < 1.05
    for _ in range(30):  # ... and now other rounds keep showing their first token right
        c.observe_unverified(4, [1, 2, 3], [1, 5])
    assert c.expected(4, 1) > 1.45  # half of them expected again (the old record decays)
    c.observe_ngram(5, 3, 1)  # a verified proposal: its first token kept, the second not
    for _ in range(50):  # the first position's free verdicts leave the later positions' record alone
        c.observe_unverified(5, [1], [1])
    assert c.hits[5][1:] == [[1.0, 0.0], [0.0, 0.0]]


def test_every_new_text_tells_the_chooser(monkeypatch):
    """A generation given the chooser of earlier ones, and a sequence joining a batch"""
    from batching import Batch, Sequence
    calls = []
    monkeypatch.setattr(SourceChooser, "new_text", lambda self: calls.append(self))
    model = random_model()
    model.setup_caches(1, 64)
    chooser = SourceChooser(3, clocks=False)
    prompt = repeating_prompt(12, 0)
    for _ in range(2):
        speculative_generate(model, prompt, 4, GREEDY, 3, draft_source="ngram", chooser=chooser)
    assert calls == [chooser, chooser]
    batch = Batch(model, GREEDY, draft_source="ngram", chooser=chooser)
    batch.add(Sequence(prompt.tolist(), 3))
    assert calls == [chooser] * 3


def test_flags_that_contradict_are_refused():
    with pytest.raises(ValueError, match="drafts for speculative decoding"):
        Strategy("autoregressive", draft_source="ngram")
    with pytest.raises(ValueError, match="text alone"):
        Strategy("self_speculative", exit_layer=2, draft_source="ngram")
    with pytest.raises(ValueError, match="unknown --draft_source"):
        Strategy("self_speculative", exit_layer=2, draft_source="suffix")
    with pytest.raises(ValueError, match="--ngram_tokens must be in"):
        Strategy("self_speculative", draft_source="ngram", ngram_tokens=0)
    assert Strategy("self_speculative", draft_source="ngram").lookahead(100) == MAX_SPECULATIONS == 15
    assert Strategy("self_speculative", exit_layer=2, draft_source="auto", ngram_tokens=5).lookahead(100) == 5


# ---------------------------------------------------------------- batched


@pytest.mark.parametrize("source, kw", [("ngram", {}), ("auto", {"num_speculations": 3, "exit_layer": 2}),
                                        ("auto", {"num_speculations": 2, "two_model": True}),
                                        ("auto", {"num_speculations": 2, "quantized": True})])
def test_batched_rows_equal_their_batch1_greedy_output(source, kw):
    """Repeating and non-repeating prompts of different lengths, more prompts than rows (rows join
    and leave between rounds): each row's text is that prompt's plain greedy output."""
    from batching import generate_many
    kw = dict(kw)
    model = random_model()
    model.setup_caches(1, 160)
    prompts = [repeating_prompt(12 + 2 * i, i) if i % 2 == 0 else rand_prompt(5 + i, seed=i) for i in range(6)]
    refs = [generate(model, p, 30, GREEDY)[0][0, len(p):].tolist() for p in prompts]
    model.setup_caches(4, 160)
    kw = draft_models(kw, model, 4, 160)
    seqs, stats = generate_many(model, [p.tolist() for p in prompts], 30, GREEDY, draft_source=source,
                                ngram_tokens=4, **kw)
    assert [s.tokens for s in seqs] == refs
    assert "ngram" in stats.sources and stats.accepted > 0
    if source == "auto":
        assert "model" in stats.sources


def test_compiled_ngram_rounds_equal_plain_decoding_and_never_recompile():
    """Regional graphs: the n-gram verify passes (one per padded proposal length) are the two-model
    verify graphs; one sequence and a batch give plain greedy output, and a second run compiles
    nothing new."""
    from batching import generate_many
    from steps import compile_steps
    from test_batching import batch1_reference, packed_model
    model = packed_model()
    steps = compile_steps(torch.device("cpu"))
    prompts = [repeating_prompt(14, 0).tolist(), rand_prompt(6, seed=1).tolist(), repeating_prompt(10, 2).tolist()]
    ref = batch1_reference(model, prompts, 24, steps=steps, size=96)

    def run():
        model.setup_caches(1, 96)
        for p, r in zip(prompts, ref):
            for kw in (dict(draft_source="ngram"), dict(draft_source="auto", exit_layer=2)):
                out, _ = speculative_generate(model, torch.tensor(p), 24, GREEDY, 3, steps=steps, ngram_tokens=4, **kw)
                assert out[0, len(p):].tolist() == r, kw
        model.setup_caches(2, 96)
        seqs, stats = generate_many(model, prompts, 24, GREEDY, steps=steps, draft_source="ngram", ngram_tokens=4)
        assert [s.tokens for s in seqs] == ref and "ngram" in stats.sources
    run()
    with torch._dynamo.config.patch(error_on_recompile=True):
        run()


def test_batched_sampling_with_ngram_drafts_repeats_with_its_seed():
    from batching import generate_many
    model = random_model()
    model.setup_caches(3, 96)
    prompts = [repeating_prompt(12, i).tolist() for i in range(3)]
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        seqs, stats = generate_many(model, prompts, 20, SamplingParams(0.8), draft_source="ngram", ngram_tokens=4)
        runs.append([s.tokens for s in seqs])
        assert all(len(s.tokens) == 20 and all(0 <= t < 96 for t in s.tokens) for s in seqs)
    assert runs[0] == runs[1] and "ngram" in stats.sources


def test_compiling_every_round_shape_first_leaves_the_batch_as_it_was():
    """compile_rounds (serve.py's warm-up) runs stand-in rows through every shape of round the
    chooser can pick: for each bucket of rows a plain step, the model's round and every padded
    proposal length; the batch then decodes exactly, its chooser untouched, its rows free."""
    from batching import Batch, Sequence
    model = random_model()
    prompts = [repeating_prompt(12, 0).tolist(), rand_prompt(7, seed=3).tolist()]
    model.setup_caches(1, 96)
    refs = [generate(model, torch.tensor(p), 20, GREEDY)[0][0, len(p):].tolist() for p in prompts]
    model.setup_caches(2, 96)
    twin = random_model(n_layers=2, seed=1)
    twin.setup_caches(2, 96)
    batch = Batch(model, GREEDY, num_speculations=2, draft_model=twin, draft_source="auto", ngram_tokens=4)
    shapes = []
    original = batch._ngram_round
    batch._ngram_round = lambda b, proposals, K: shapes.append((b, K)) or original(b, proposals, K)
    plain, drafted = batch._decode, batch._round
    batch._decode = lambda b, E: shapes.append((b, "plain", E)) or plain(b, E)
    batch._round = lambda b, E, k: shapes.append((b, "model", E, k)) or drafted(b, E, k)
    batch.compile_rounds()
    assert sorted(shapes, key=str) == sorted([(b, K) for b in (1, 2) for K in (1, 2, 4)] +
                                             [(b, "plain", None) for b in (1, 2)] +
                                             [(b, "model", None, 2) for b in (1, 2)], key=str)
    assert batch.free_rows == 2 and not batch.chooser.hits and not any(batch.behind)
    seqs = [Sequence(p, 20) for p in prompts]
    for s in seqs:
        batch.add(s)
    while batch.running:
        batch.step()
    assert [s.tokens for s in seqs] == refs


def test_a_generations_guarded_rounds_are_not_timed():
    """The chooser outlives a generation (the engine keeps one per strategy), but each generation's
    first call of a step evaluates its guards (Speculation.stance): that round's time, about 1 ms a
    compiled call on top of the round, is not a steady round's and is not recorded (None), in the
    second generation as in the first; every later round of that kind is."""
    model = random_model()
    model.setup_caches(1, 160)

    class Recording(SourceChooser):
        def observe_round(self, key, seconds, tokens, rows=1):
            rounds.append((key, seconds))
            super().observe_round(key, seconds, tokens, rows)
    chooser = Recording(3)
    for seed in (0, 2):
        rounds = []
        speculative_generate(model, repeating_prompt(16, seed), 48, GREEDY, 3, draft_source="ngram", chooser=chooser)
        first = {key: i for i, (key, _) in reversed(list(enumerate(rounds)))}  # each kind's first round
        assert len(rounds) > len(first) >= 2, rounds
        assert [i for i, (_, seconds) in enumerate(rounds) if seconds is None] == sorted(first.values())
        assert all(seconds > 0 for _, seconds in rounds if seconds is not None)


def test_a_model_rounds_yield_is_kept_per_running_row():
    """A batch's model round yields per running row: learned on four rows (3 tokens a row in 20 ms,
    the best of four rows' options), it is not expected to yield 12 tokens when one row is left in
    the bucket, where the text's proposal is the better round (2.5 tokens in 12 ms against 3 in 20)."""
    chooser = SourceChooser(3)
    for _ in range(2):  # each kind's first round is not timed
        chooser.observe_round(("model", 4), 0.020, 12, rows=4)
        chooser.observe_round(("ngram", 4, 4), 0.012, 10, rows=4)
        chooser.observe_round(("plain", 4), 0.010, 4, rows=4)
    assert chooser.choose({("ngram", 4, 4): 6.0, ("plain", 4): 4.0, ("model", 4): None}, rows=4) == ("model", 4)
    assert chooser.choose({("ngram", 4, 4): 2.5, ("plain", 4): 1.0, ("model", 4): None}, rows=1) == ("ngram", 4, 4)


def test_without_clocks_a_model_round_is_run_before_its_yield_is_trusted():
    """Sampling and tensor parallelism choose from fixed costs: an untried model round is run once
    (from its default yield it would never be worth its cost), then its own yield decides."""
    options = {("ngram", 1): 1.2, ("plain",): 1.0, ("model",): None}
    good, poor = SourceChooser(3, clocks=False), SourceChooser(3, clocks=False)
    assert good.choose(options) == poor.choose(options) == ("model",)
    good.observe_round(("model",), 0.0, 3)  # 3 tokens for 2.5 steps: more than a plain step's or the proposal's
    poor.observe_round(("model",), 0.0, 1)
    assert good.choose(options) == ("model",) and poor.choose(options) == ("ngram", 1)
