"""Adaptive speculation (--exit_layer auto, --num_speculations auto): whatever (E, k) a policy
chooses per round and wherever it stops drafting, greedy output equals greedy decoding and sampling
keeps the full model's distribution; the chooser picks the best pair of a known table; the probes
read the early exits' true tokens; compiled, the graphs are a bounded set compiled once; the step
costs are cached and measured again when stale."""
import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch

import adaptive
from adaptive import AdaptivePolicy, StepCosts
from conftest import REPO, assert_varied, block_graphs
from decoding import Policy, Strategy, generate, speculative_generate
from steps import Steps, compile_steps
from quantized import quantized_copy
from sampling import SamplingParams
from test_decoding import GREEDY, check_speculative_sampling, rand_prompt, random_model


def run_cli(args, cache):
    return subprocess.run([sys.executable, str(REPO / "generate.py"), *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "LAYERSKIP_CACHE": str(cache)})


class RandomPolicy(Policy):
    """Chooses E, k (0 included: plain rounds), early stops and probed rows at random, and records
    what the loop reports, so that the tests can check it."""
    early_stop = True

    def __init__(self, exits, ks, prompt_len, seed=0, shared=True):
        self.exits, self.ks, self.shared = exits, ks, shared
        self.exit_layer, self.max_k = exits[0], max(ks)
        self.rng = random.Random(seed)
        self.pos = prompt_len  # of the round's first verified row
        self.probes = []  # (layer, position, token, target)

    def choose(self):
        k = self.rng.choice(self.ks + ((0,) if self.shared else ()))
        return (self.rng.choice(self.exits) if k else self.exits[0]), k  # plain rounds: one graph

    def taps(self, E):
        return self.exits

    def bucket(self, n):
        return min(b for b in self.ks if b >= n) if n else self.ks[0]

    def keep_drafting(self, E, confidence, made):
        assert 0.0 <= confidence <= 1.0 and made >= 1
        return self.rng.random() < 0.75

    def observe_times(self, E, made, bucket, draft_s, verify_s, round_s):
        assert made <= bucket and draft_s >= 0 and verify_s > 0 and round_s >= draft_s + verify_s

    def observe(self, E, k, made, accepted, confidences):
        assert 0 <= accepted <= made <= k and len(confidences) == made
        self.base, self.pos = self.pos, self.pos + accepted + 1

    def probe_row(self, accepted):
        self.row = self.rng.randint(0, accepted)
        return self.row

    def observe_probe(self, E, taps, tokens, target):
        self.probes += [(c, self.base + self.row, t, target) for c, t in zip(taps, tokens)]


def early_exit_tokens(model, seq, layer):
    """The greedy token after each position of seq [T] from layers [0, layer), no cache."""
    with torch.no_grad():
        return model.head(model.run_layers(model.embed(seq[None]), None, 0, layer))[0].argmax(-1)


def test_random_choices_and_early_stops_keep_greedy_output_and_probes_read_the_exits():
    model = random_model()
    model.setup_caches(1, 160)
    probes = []
    for seed in range(6):
        prompt = rand_prompt(4 + seed, seed=seed)
        ref, _ = generate(model, prompt, 40, GREEDY)
        assert_varied(ref[0, len(prompt):])
        for budget in (1, 2, 3, 7, 40):
            policy = RandomPolicy((1, 2, 3), (1, 2, 4, 8), len(prompt), seed=seed * 100 + budget)
            out, stats = speculative_generate(model, prompt, budget, GREEDY, 8, policy=policy)
            assert out.tolist() == ref[:, :len(prompt) + budget].tolist(), (seed, budget, stats.trace)
            probes += [(ref[0], p) for p in policy.probes]
        assert stats.early_stops > 0 and {k for _, k, _ in stats.trace} >= {0, 8}
    # a probe at row r of a round reads layer c's state at that position: its token is the early
    # exit's, and the target the full model's next token
    agree = 0
    for seq, (c, pos, token, target) in probes:
        assert target == seq[pos + 1]
        agree += token == early_exit_tokens(model, seq[:pos + 1], c)[-1]
    assert len(probes) > 100 and agree >= 0.97 * len(probes)  # float rounding may flip a near tie


def test_random_choices_keep_greedy_output_with_a_quantized_draft():
    model = random_model()
    draft = quantized_copy(model, "int8")
    model.setup_caches(1, 128)
    draft.setup_caches(1, 128)
    for seed in range(4):
        prompt = rand_prompt(5 + seed, seed=seed)
        ref, _ = generate(model, prompt, 40, GREEDY)
        policy = RandomPolicy((None,), (1, 2, 4, 8), len(prompt), seed=seed, shared=False)
        policy.taps = lambda E: ()
        out, stats = speculative_generate(model, prompt, 40, GREEDY, 8, draft_model=draft, policy=policy)
        assert out.tolist() == ref.tolist(), seed
        assert stats.catch_ups > 0 and stats.early_stops > 0


@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(0.8, top_k=3)])
def test_adaptive_sampling_matches_autoregressive_distribution(params):
    model = random_model(n_layers=3, vocab=8, dim=32, seed=3, scale=0.35)
    model.setup_caches(1, 32)
    policy = RandomPolicy((1,), (1, 2), 3, seed=0)
    policy.observe = lambda *a: None  # the position bookkeeping is for the probe test
    policy.observe_probe = lambda *a: None
    check_speculative_sampling(model, lambda t: model.head(model.run_layers(model.embed(t), None, 0, 1)), params,
                               policy=policy)


def synthetic_costs():
    """A 12-layer model: a draft step at E costs (1 + E) / 13 decode steps, a verify pass over b
    drafts 1 + 0.05 b (plain step: 1)."""
    exits, ks = (3, 6, 9), (1, 2, 4, 8)
    draft = {E: (1 + E) / 13 for E in exits}
    verify = {(E, b): 1 + 0.05 * b for E in exits for b in ks}
    verify[(3, 0)] = 1.0
    return StepCosts(1.0, draft, verify, probe=0.0), exits, ks


def best_by_hand(acceptance, costs, exits, ks):
    return max(((E, k) for E in exits for k in ks),
               key=lambda p: sum(acceptance[p[0]] ** i for i in range(p[1] + 1)) /
               (p[1] * costs.draft[p[0]] + costs.verify[p]))


@pytest.mark.parametrize("acceptance, best", [({3: 0.9, 6: 0.95, 9: 0.99}, (3, 4)),
                                              ({3: 0.6, 6: 0.93, 9: 0.97}, (6, 4)),
                                              ({3: 0.2, 6: 0.6, 9: 0.9}, (9, 1)),
                                              ({3: 0.05, 6: 0.1, 9: 0.2}, (3, 0))])
def test_the_chooser_picks_the_known_best_pair(acceptance, best):
    costs, exits, ks = synthetic_costs()
    by_hand = best_by_hand(acceptance, costs, exits, ks)
    if best[1]:
        assert by_hand == best  # the table means what it says
    else:  # no pair beats a plain decode step (cost 1)
        assert sum(acceptance[by_hand[0]] ** i for i in range(by_hand[1] + 1)) / \
            (by_hand[1] * costs.draft[by_hand[0]] + costs.verify[by_hand]) < 1
    policy = AdaptivePolicy(costs, exits, ks, shared=True)
    for E, a in acceptance.items():  # as if probed many times
        policy.agree[E].hits, policy.agree[E].total = 1000 * a, 1000
    assert policy.choose() == best  # the first round may take the best pair at once
    with pytest.MonkeyPatch.context() as m:
        m.setattr(adaptive, "EXPLORE_EVERY", 10 ** 9)  # no rival tried
        assert all(policy.choose() == best for _ in range(3 * adaptive.MIN_DWELL))


def test_a_close_rival_is_tried_now_and_then():
    costs, exits, ks = synthetic_costs()
    policy = AdaptivePolicy(costs, exits, ks, shared=True)
    for E, a in {3: 0.9, 6: 0.95, 9: 0.99}.items():
        policy.agree[E].hits, policy.agree[E].total = 1000 * a, 1000
    choices = [policy.choose() for _ in range(3 * adaptive.EXPLORE_EVERY)]
    best = choices[0]
    assert best == (3, 4) and choices.count(best) > 0.6 * len(choices)
    rivals = {p for p in choices if p != best}  # within 10% (k = 2, 8 of E = 3), each for a dwell
    assert rivals and all(policy.predicted(*p) > 0.9 * policy.predicted(*best) for p in rivals)
    assert all(choices.count(p) <= 3 * adaptive.MIN_DWELL for p in rivals)


def test_the_chooser_switches_only_for_a_clear_gain(monkeypatch):
    """Hysteresis: a pair predicting 3% more than the current one is not taken, one predicting 8%
    more is, once the current pair has run MIN_DWELL rounds."""
    monkeypatch.setattr(adaptive, "EXPLORE_EVERY", 10 ** 9)  # no rival tried
    costs, exits, ks = synthetic_costs()
    policy = AdaptivePolicy(costs, exits, ks, shared=True)
    for E, a in {3: 0.4, 6: 0.93, 9: 0.5}.items():
        policy.agree[E].hits, policy.agree[E].total = 1000 * a, 1000
    assert policy.choose() == (6, 4)
    current = policy.predicted(6, 4)

    def set_lead(lead):  # exit 3's agreement such that its best pair predicts `lead` x the current one
        lo, hi = 0.4, 0.9999
        for _ in range(60):
            mid = (lo + hi) / 2
            policy.agree[3].hits = 1000 * mid
            lo, hi = (mid, hi) if max(policy.predicted(3, k) for k in ks) < lead * current else (lo, mid)
    set_lead(1.03)
    assert all(policy.choose() == (6, 4) for _ in range(20))
    set_lead(1.08)
    assert policy.choose()[0] == 3


def test_early_stop_follows_observed_acceptance_per_confidence():
    costs, exits, ks = synthetic_costs()
    policy = AdaptivePolicy(costs, (3,), ks, shared=False)
    for _ in range(200):  # confident drafts are accepted, unsure ones are not
        policy.observe(3, 8, 4, 3, [0.95, 0.96, 0.93, 0.15])
    assert policy.choose() == (3, 2)
    assert policy.keep_drafting(3, 0.97, 1) and not policy.keep_drafting(3, 0.12, 1)
    assert not policy.keep_drafting(3, 0.97, 2)  # the round's k is reached
    assert policy.bucket(3) == 4 and policy.bucket(5) == 8 and policy.bucket(1) == 1


def test_the_rounds_own_timings_replace_the_calibration(monkeypatch):
    """A verify pass over 8 drafts calibrated at twice its real cost: the rounds' timings correct
    it (the first of each step skipped: it may include compiling) and k = 8 is taken; that the
    machine runs everything twice as slow (drift) changes no cost in decode steps."""
    monkeypatch.setattr(adaptive, "EXPLORE_EVERY", 10 ** 9)  # no rival tried
    costs, exits, ks = synthetic_costs()
    costs.verify[(3, 8)] = 3.0
    policy = AdaptivePolicy(costs, (3,), ks, shared=False)
    policy.accepted.hits, policy.accepted.total = 980, 1000
    assert policy.choose() == (3, 4)
    policy.observe_times(3, 8, 8, 100.0, 100.0, 200.0)  # the first timing: ignored
    assert policy.cost("verify", 3, 8) == pytest.approx(3.0)
    for _ in range(30):  # everything takes twice its calibrated time, verify(8) 2 x 1.4
        for b in (1, 2, 4):
            policy.observe_times(3, b, b, b * 2 * 4 / 13, 2 * (1 + 0.05 * b), 4.0)
        policy.observe_times(3, 8, 8, 8 * 2 * 4 / 13, 2 * 1.4, 8 * 2 * 4 / 13 + 2 * 1.4)
    assert policy.drift == pytest.approx(2.0, rel=0.02)
    assert policy.cost("verify", 3, 8) == pytest.approx(1.4, rel=0.02)
    assert policy.cost("draft", 3) == pytest.approx(4 / 13, rel=0.02)
    assert [policy.choose() for _ in range(adaptive.MIN_DWELL)][-1] == (3, 8)


def test_step_costs_are_cached_and_measured_again_when_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERSKIP_CACHE", str(tmp_path / "cache"))
    calls = []

    def measure():
        calls.append(1)
        return StepCosts(0.01, {4: 0.004}, {(4, 2): 0.012}, 0.001)
    key = {"checkpoint": "x", "exits": (4,)}
    costs, fresh = adaptive.load_or_measure(key, measure)
    assert fresh and costs.draft[4] / costs.decode == pytest.approx(0.4)
    again, fresh = adaptive.load_or_measure(key, measure)
    assert not fresh and again == costs and len(calls) == 1
    assert adaptive.load_or_measure({**key, "checkpoint": "y"}, measure)[1]  # another model: measured
    assert adaptive.load_or_measure(key, measure, recalibrate=True)[1]
    path = tmp_path / "cache" / "step_costs.json"
    table = json.loads(path.read_text())
    for entry in table.values():
        entry["time"] -= adaptive.STALE_DAYS * 86400 + 1
    path.write_text(json.dumps(table))
    assert adaptive.load_or_measure(key, measure)[1]  # stale: measured again
    assert len(calls) == 4 and not list(path.parent.glob("*.tmp"))


def test_processes_measuring_at_once_keep_each_others_entries(tmp_path, monkeypatch):
    """Another process stores its entry while this one measures: both stay in the cache."""
    monkeypatch.setenv("LAYERSKIP_CACHE", str(tmp_path))

    def measure_while_another_stores():
        adaptive.load_or_measure({"model": "other"}, lambda: StepCosts(2.0, {}, {}))
        return StepCosts(1.0, {}, {})
    adaptive.load_or_measure({"model": "this"}, measure_while_another_stores)
    assert not adaptive.load_or_measure({"model": "other"}, lambda: pytest.fail("measured again"))[1]
    assert not adaptive.load_or_measure({"model": "this"}, lambda: pytest.fail("measured again"))[1]


def test_an_unwritable_cache_only_costs_measuring_again(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("LAYERSKIP_CACHE", str(tmp_path / "file" / "sub"))
    costs, fresh = adaptive.load_or_measure({"k": 1}, lambda: StepCosts(1.0, {}, {}))
    assert fresh and "could not store the step costs" in capsys.readouterr().err


def test_strategy_refuses_auto_where_it_does_not_apply():
    with pytest.raises(ValueError, match="speculative strategies"):
        Strategy("autoregressive", auto_k=True)
    with pytest.raises(ValueError, match="self_speculative"):
        Strategy("speculative", auto_exit=True)
    assert Strategy("self_speculative", auto_exit=True, auto_k=True, num_speculations=8).describe() == \
        "self_speculative E=auto k=auto (<= 8)"
    with pytest.raises(ValueError, match="needs its policy"):
        from decoding import run
        model = random_model()
        model.setup_caches(1, 32)
        run(model, rand_prompt(4), 4, GREEDY, Strategy("self_speculative", auto_exit=True))


@pytest.mark.slow
def test_tiny_compiled_adaptive_compiles_a_bounded_set_once(tmp_path, monkeypatch):
    """Measuring the step costs compiles every graph the policy can use; generations with any
    choices then compile nothing (error_on_recompile)."""
    monkeypatch.setenv("LAYERSKIP_CACHE", str(tmp_path))
    model = random_model(dim=40, vocab=72)  # a shape no other test compiles
    model.setup_caches(1, 128)
    steps = compile_steps(torch.device("cpu"))
    exits, ks = (1, 3), (2, 4)  # few: every graph compiles here (the suite's slowest test with 3 x 4)
    before = block_graphs()
    costs = adaptive.measure_costs(model, steps, exits, ks, None, exits, repeats=2)
    graphs = block_graphs() - before
    # regional: one graph per (run of layers, rows); rows 1 (decode, draft, the newest token) or
    # k + 1, runs of at most 4 layers (the model's depth): bounded whatever the exits and buckets
    assert 0 < graphs <= 4 * (1 + len(ks))
    assert set(costs.verify) == {(E, b) for E in exits for b in ks} | {(exits[0], 0)}
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(3):
            prompt = rand_prompt(4 + seed, vocab=72, seed=seed)
            ref, _ = generate(model, prompt, 30, GREEDY)
            for policy in (RandomPolicy(exits, ks, len(prompt), seed=seed), AdaptivePolicy(costs, exits, ks, True)):
                out, stats = speculative_generate(model, prompt, 30, GREEDY, max(ks), policy=policy, steps=steps)
                assert out.tolist() == ref.tolist(), (seed, stats.trace)
    assert block_graphs() - before == graphs


def test_cli_auto_runs_and_equals_greedy_decoding(tiny_smol_dir, tmp_path):
    """generate.py --exit_layer auto --num_speculations auto: measured once, then read from the cache."""
    base = ["--checkpoint_path", str(tiny_smol_dir), "--prompt", "Hello there", "--max_new_tokens", "24",
            "--temperature", "0"]
    ref = run_cli(base, tmp_path)
    assert ref.returncode == 0, ref.stderr
    for i in range(2):
        out = run_cli(base + ["--generation_strategy", "self_speculative", "--exit_layer", "auto",
                              "--num_speculations", "auto"], tmp_path)
        assert out.returncode == 0 and out.stdout == ref.stdout, out.stderr
        assert ("measured in" if i == 0 else "read from") in out.stderr
        assert re.search(r"(plain|E=\d k=\d) \d+%", out.stderr), out.stderr
    assert len(json.loads((tmp_path / "step_costs.json").read_text())) == 1


def test_cli_refuses_auto_for_autoregressive(tiny_smol_dir, tmp_path):
    out = run_cli(["--checkpoint_path", str(tiny_smol_dir), "--prompt", "Hi", "--num_speculations", "auto"], tmp_path)
    assert out.returncode == 2 and "--num_speculations auto" in out.stderr


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2_speculation")
def test_smollm2_adaptive_equals_greedy_decoding(smollm2, tmp_path, monkeypatch):
    """The real policy on the real model, eager: whatever it chooses, the output is greedy decoding's."""
    from tokenizer import load_tokenizer
    from conftest import SMOLLM2_DIR
    monkeypatch.setenv("LAYERSKIP_CACHE", str(tmp_path))
    tok = load_tokenizer(SMOLLM2_DIR)
    smollm2.setup_caches(1, 96)
    exits, ks = (12, 24), (1, 4)  # few: each (E, k) is timed eagerly on the real model
    costs = adaptive.measure_costs(smollm2, Steps(), exits, ks, None, exits, repeats=1)
    policy = AdaptivePolicy(costs, exits, ks, shared=True)
    for text in ("def fibonacci(n):\n", "The capital of France is"):
        prompt = torch.tensor(tok.encode(text))
        ref, _ = generate(smollm2, prompt, 24, GREEDY)
        out, stats = speculative_generate(smollm2, prompt, 24, GREEDY, 8, policy=policy)
        assert out.tolist() == ref.tolist(), stats.trace
    assert all(0 <= r.value <= 1 for r in policy.agree.values())
