"""Adaptive speculation (--exit_layer auto, --num_speculations auto): the engine chooses the exit
layer E and the number of drafts k per round from its own step costs and from acceptance
estimates read off the generation, and stops drafting at a draft it is not confident in.

- Step costs: a decode step, a draft step at each candidate E and a verify pass for each number
  of drafts in decoding.BUCKETS, timed once per (checkpoint, device, dtype, quantization, draft, compile,
  cache length) and kept in a JSON file (`cache_dir()`), measured again when older than
  STALE_DAYS or on request. Timing them also compiles every graph the policy can use, so the
  generation itself never compiles.
- Acceptance: for the early exits of the model's own layers, the verify pass already computes the
  states entering every candidate exit layer for the verified positions; a probe applies the
  shared final norm and LM head to one verified position every few rounds and counts, per
  candidate, how often its token is the full model's. Estimates decay, so they follow the text.
  A draft with its own cache (a quantized copy, a separate model) keeps its E: its cache lacks the
  layers it skipped; its acceptance is the rounds' own.
- Choice: (E, k) maximising the predicted speed-up: tokens per round / (k draft + verify + the
  loop's own time per round), tokens per round from the current exit's own rounds (how far their
  drafts ran: acceptance comes in runs) or, for the others, from the probed per-draft rate a,
  including k = 0 (plain decoding, which still probes) for the model's own layers; a new choice
  must beat the current one by HYSTERESIS and the current one must have run MIN_DWELL rounds. A
  rival predicted within EXPLORE_WITHIN of the current pair and not run for EXPLORE_EVERY rounds
  is run for MIN_DWELL rounds, so that predictions resting on calibration get measured.
- In generation, each round's timed draft and verify phases replace the calibrated costs of the
  steps that ran (moving averages), and their median ratio to the calibration scales the rest.
- Early stop: after each draft the policy estimates, from the draft's confidence (its probability
  of its own token), the chance it is accepted (per confidence bin, from the drafts verified so
  far); it drafts one more only if the chance that this draft and the next are accepted pays for
  a draft step at the tokens per decode step the recent rounds achieved. k becomes a maximum;
  the verify pass pads to the next bucket.
"""
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from decoding import Policy
from steps import synchronize
from sampling import SamplingParams

STALE_DAYS = 30
HYSTERESIS = 0.05
MIN_DWELL = 4  # rounds
EXPLORE_EVERY, EXPLORE_WITHIN = 64, 0.1  # rounds; a rival predicted within 10% of the current pair is tried
BINS = 10  # confidence bins of the early-stop estimate
DECAY = 0.98  # weight of the past per observation: an estimate spans the last ~50 of them
TIME_WEIGHT = 0.2  # weight of a round's timing in the moving average of a step's seconds
STALL = 1.5  # a batched round's timing counts as at most this many times its prediction (or 1 / STALL)
FACTOR_WEIGHT = 0.05  # the weight of a batched round's timing in its kind's factor (BatchPolicy)


def exit_candidates(n_layers: int, count: int = 4) -> tuple:
    """count exit layers spread evenly over [1, n_layers): the draft steps' and verify passes'
    graphs are compiled per exit layer, so the set stays small."""
    return tuple(sorted({min(n_layers - 1, max(1, round(n_layers * i / (count + 1)))) for i in range(1, count + 1)}))


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens a round yields when each draft is accepted with probability alpha (independently,
    until the first rejection): 1 + alpha + ... + alpha^k."""
    return sum(alpha ** i for i in range(k + 1))


@dataclass
class StepCosts:
    """Seconds: decode step; draft step per exit layer; verify pass per (exit layer, drafts); probe."""
    decode: float
    draft: dict
    verify: dict
    probe: float = 0.0

    def to_json(self) -> dict:
        return {"decode": self.decode, "draft": [[E, s] for E, s in self.draft.items()],
                "verify": [[E, b, s] for (E, b), s in self.verify.items()], "probe": self.probe}

    @staticmethod
    def from_json(d: dict) -> "StepCosts":
        return StepCosts(d["decode"], {E: s for E, s in d["draft"]}, {(E, b): s for E, b, s in d["verify"]},
                         d["probe"])


def round_timer(model, steps, E, b: int, pos: int, draft_model=None, taps=(), catch_up: bool = False):
    """A function timing one round as the loop runs it: b draft steps (the first a catch-up step
    over 2 positions if catch_up, as a draft with its own cache takes after a fully accepted
    round), then the verify pass over b drafts at pos; it returns (draft phase, verify) seconds.
    Timed in rounds, not alone: a draft's weights would stay in the CPU's cache, which in a round
    the verify pass evicts. Called with the loop's arguments and taps, so with its graphs."""
    device = model.norm.weight.device
    greedy = SamplingParams()
    x, at, two = torch.tensor([[5]], device=device), torch.tensor([pos], device=device), torch.full((1, 2), 5, device=device)
    tokens = torch.full((1, b + 1), 5, device=device)
    shared = draft_model is None
    drafter = model if shared else draft_model
    states = torch.zeros(1, b + 1, model.args.dim, device=device, dtype=model.norm.weight.dtype) if shared else None
    positions = torch.arange(pos, pos + b + 1, device=device)
    last = torch.tensor(b, device=device)
    below = tuple(c for c in taps if c < E)

    def run():
        t0 = time.perf_counter()
        for j in range(b):
            if j == 0 and catch_up:
                steps.catch_up(drafter, two, positions[:2] + 0, greedy, E)
            else:
                steps.draft(drafter, x, at, greedy, E, below)
        synchronize(device)
        t1 = time.perf_counter()
        steps.verify(model, tokens, states, None, positions, last, greedy, E if shared else None, taps, last)
        synchronize(device)
        return t1 - t0, time.perf_counter() - t1
    return run


def measure_costs(model, steps, exits, buckets, draft_model=None, taps=(), repeats: int = 7,
                  progress: bool = False) -> StepCosts:
    """Times the steps a policy over exits x buckets uses, as the loop calls them (with the same
    taps, so the same graphs): a decode step, and per E rounds of b draft steps followed by the
    verify pass over b drafts (round_timer), at two thirds into the cache (attention reads up to
    the row's position). With the model's own layers also the plain round (0 drafts) at exits[0]
    and the probe."""
    device = model.norm.weight.device
    greedy = SamplingParams()
    pos = min(model.max_seq_length * 2 // 3, model.max_seq_length - max(buckets) - 1)
    x = torch.tensor([[5]], device=device)
    at = torch.tensor([pos], device=device)
    shared = draft_model is None
    dtype = model.norm.weight.dtype

    def call(fn):
        def run():
            t = time.perf_counter()
            fn()
            synchronize(device)
            return 0.0, time.perf_counter() - t
        return run

    timers = {"decode": call(lambda: steps.decode(model, x, at, greedy, None))}
    timers.update({(E, b): round_timer(model, steps, E, b, pos, draft_model, taps) for E in exits for b in buckets})
    if shared:
        timers[(exits[0], 0)] = round_timer(model, steps, exits[0], 0, pos, None, taps)
        if taps:
            tapped = torch.zeros(1, len(taps), model.args.dim, device=device, dtype=dtype)
            timers["probe"] = call(lambda: steps.probe(model, tapped))
    with torch.no_grad():
        for fn in tqdm(timers.values(), desc="Step costs (compiling the graphs, if compiled)", disable=not progress,
                       file=sys.stderr):
            for _ in range(2):  # compiles, warms
                fn()
        # round-robin passes: a machine whose speed drifts (a shared host) slows every entry alike
        times = {name: [] for name in timers}
        for _ in range(repeats):
            for name, fn in timers.items():
                times[name].append(fn())
    median = {name: (statistics.median(d for d, _ in t), statistics.median(v for _, v in t)) for name, t in times.items()}
    decode, probe = median["decode"][1], median.get("probe", (0.0, 0.0))[1]
    verify = {name: v for name, (_, v) in median.items() if isinstance(name, tuple)}
    draft = {E: statistics.median(median[(E, b)][0] / b for b in buckets) for E in exits}
    return StepCosts(decode, draft, verify, probe)


def cache_dir() -> Path:
    """$LAYERSKIP_CACHE, else ~/.cache/layerskip-fast."""
    return Path(os.environ.get("LAYERSKIP_CACHE") or Path.home() / ".cache" / "layerskip-fast")


def read_table(path: Path) -> dict:
    """The step-cost cache's entries; none if it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@dataclass
class BatchCosts:
    """StepCosts per number of rows a batched step runs (batching.Batch.measure_costs)."""
    by_rows: dict

    def to_json(self) -> dict:
        return {str(b): c.to_json() for b, c in self.by_rows.items()}

    @staticmethod
    def from_json(d: dict) -> "BatchCosts":
        return BatchCosts({int(b): StepCosts.from_json(c) for b, c in d.items()})


def load_or_measure(key: dict, measure, recalibrate: bool = False, kind=StepCosts):
    """The costs (a `kind`: StepCosts or BatchCosts) stored under key (a dict of what they depend
    on) unless missing, older than STALE_DAYS or recalibrate; else measure() and store them.
    Returns (costs, measured now).
    An unwritable cache only costs measuring again next time."""
    path = cache_dir() / "step_costs.json"
    name = json.dumps(key, sort_keys=True)
    entry = read_table(path).get(name)
    if recalibrate or not entry or time.time() - entry["time"] >= STALE_DAYS * 86400:
        entry = None
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    if distributed:  # every rank must agree on measuring (it runs collectives): rank 0's cache decides
        box = [entry]
        torch.distributed.broadcast_object_list(box, src=0)
        entry = box[0]
    if entry:
        return kind.from_json(entry["costs"]), False
    costs = measure()
    if distributed:  # every rank must choose the same (E, k): rank 0's timings decide
        box = [costs]
        torch.distributed.broadcast_object_list(box, src=0)
        costs = box[0]
    if rank != 0:
        return costs, True
    table = read_table(path)  # now: another process may have stored its own entry while this one measured
    table[name] = {"time": time.time(), "costs": costs.to_json()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1))
        tmp.replace(path)  # never a half-written file
    except OSError as e:
        print(f"note: could not store the step costs in {path}: {e}", file=sys.stderr)
    return costs, True


class Rate:
    """A decaying success rate with a prior worth `weight` observations."""

    def __init__(self, prior: float, weight: float = 2.0):
        self.hits, self.total, self.prior, self.weight = 0.0, 0.0, prior, weight

    def add(self, hits: float, total: float = 1.0):
        self.hits = self.hits * DECAY ** total + hits
        self.total = self.total * DECAY ** total + total

    @property
    def value(self) -> float:
        return (self.hits + self.prior * self.weight) / (self.total + self.weight)


class Survival:
    """How far a round's drafts run before the first rejection, estimated from rounds that drafted
    different numbers (Kaplan-Meier: a round of n drafts with a accepted is at risk at positions
    1..n and, if a < n, rejected at a + 1), decaying like Rate; a position seldom reached leans on
    the per-draft acceptance."""

    def __init__(self, max_k: int, weight: float = 2.0):
        self.at_risk = [0.0] * (max_k + 1)
        self.rejected = [0.0] * (max_k + 1)
        self.weight, self.rounds = weight, 0

    def add(self, made: int, accepted: int):
        self.rounds += 1
        for j in range(1, len(self.at_risk)):
            self.at_risk[j] *= DECAY
            self.rejected[j] *= DECAY
        for j in range(1, min(made, len(self.at_risk) - 1) + 1):
            self.at_risk[j] += 1
        if accepted < made:
            self.rejected[accepted + 1] += 1

    def alive(self, j: int, alpha: float) -> float:
        """The chance the first j drafts are all accepted."""
        p = 1.0
        for i in range(1, j + 1):
            p *= 1 - (self.rejected[i] + (1 - alpha) * self.weight) / (self.at_risk[i] + self.weight)
        return p

    def expected_tokens(self, k: int, alpha: float) -> float:
        """1 (the full model's token) + the expected number of the k drafts kept."""
        return 1.0 + sum(self.alive(j, alpha) for j in range(1, k + 1))


class AdaptivePolicy(Policy):
    """Chooses (E, k) per round and when to stop drafting (decoding.Policy: the protocol).

    exits: candidate exit layers (one, or None, when E is fixed); ks: candidate numbers of drafts
    (one when k is fixed, which also turns early stop off); shared: drafts from the model's own
    layers (probes and plain rounds possible)."""

    def __init__(self, costs: StepCosts, exits, ks, shared: bool, probe_every: int = 4, warm_rounds: int = 16):
        self.costs = costs
        self.seconds = {}  # ("draft", E) / ("verify", E, b) -> seconds observed in generation (moving average)
        self.drift = 1.0  # observed / calibrated seconds: the machine now against the machine then
        self.exits, self.ks, self.shared = tuple(exits), tuple(ks), shared
        self.max_k = max(ks)
        self.early_stop = len(ks) > 1
        self.probing = shared  # the verify pass can tap the model's own layers
        self.probe_every, self.warm_rounds = probe_every, warm_rounds
        self.agree = {E: Rate(0.5) for E in self.exits}  # probes: the exit's token is the full model's
        self.accepted = Rate(0.5)  # drafts of the current E accepted (rounds)
        self.survival = Survival(self.max_k)  # the current E's rounds: how far their drafts run
        self.by_confidence = [Rate((i + 0.5) / BINS) for i in range(BINS)]
        self.rounds, self.dwell = 0, MIN_DWELL  # the first round may take the best pair at the priors
        self.exit_layer, self.k = self.exits[-1], self.ks[-1]
        self.speedup = 1.0
        self.timed = set()
        # Under tensor parallelism every rank must make the same choices: only what every rank
        # sees alike (tokens, confidences, probes, rank 0's calibration) may decide, not its clock.
        self.timing = not (torch.distributed.is_available() and torch.distributed.is_initialized()
                           and torch.distributed.get_world_size() > 1)
        self.tried = {}  # (E, k) -> the last round it ran
        self.exploring = False  # whether the current pair is a rival being explored
        self.overhead = 0.0  # seconds per round outside its draft and verify phases
        self.round_seconds, self.round_tokens = 0.0, 1.0  # moving averages over the rounds

    # -- estimates
    def acceptance(self, E) -> float:
        """Estimated chance a draft from exit E is accepted: the probes' agreement, scaled by how
        the current exit's observed acceptance compares with its agreement (sampling accepts by
        probability ratios, not argmax equality); the observed rate alone when nothing is probed."""
        if not self.probing:
            return self.accepted.value
        scale = 1.0
        if self.accepted.total >= 4 and E is not None:
            scale = self.accepted.value / max(self.agree[self.exit_layer].value, 1e-3)
        return min(self.agree[E].value * scale, 0.999)

    def calibrated(self, key) -> float:
        return self.costs.draft[key[1]] if key[0] == "draft" else self.costs.verify[key[1:]]

    def cost(self, *key) -> float:
        """A step's cost in decode steps: as timed in this generation where it ran (rounds time
        their draft and verify phases anyway), else as calibrated, scaled by the drift the timed
        steps show (a busier machine, a longer context)."""
        seconds = self.seconds.get(key)
        if seconds is None:
            seconds = self.calibrated(key) * self.drift
        return seconds / (self.costs.decode * self.drift)

    def predicted(self, E, k) -> float:
        rest = self.overhead / (self.costs.decode * self.drift)
        if k == 0:
            probe = self.costs.probe / self.costs.decode / self.period(0)
            return 1.0 / (self.cost("verify", self.exits[0], 0) + probe + rest)
        cost = k * self.cost("draft", E) + self.cost("verify", E, k) + rest
        if E == self.exit_layer and self.survival.rounds >= 8:
            # the current exit's own rounds: acceptance comes in runs (easy spans accept every
            # draft), which a per-draft rate under-counts at large k
            return self.survival.expected_tokens(k, self.acceptance(E)) / cost
        return expected_tokens(self.acceptance(E), k) / cost

    def candidates(self):
        pairs = [(E, k) for E in self.exits for k in self.ks]
        return pairs + ([(self.exits[0], 0)] if self.shared and len(self.ks) > 1 else [])

    # -- the loop's protocol
    def choose(self):
        self.rounds += 1
        self.dwell += 1
        current = self.predicted(self.exit_layer, self.k)
        best = max(self.candidates(), key=lambda p: self.predicted(*p))
        if self.dwell >= MIN_DWELL:
            # hysteresis keeps a pair against a close rival, but a rival run to explore it gives
            # way to the best at once: otherwise a rival within the hysteresis of the best stayed
            # after its exploration (as in BatchPolicy.choose)
            margin = 0.0 if self.exploring else HYSTERESIS
            self.exploring = False
            if best != (self.exit_layer, self.k) and self.predicted(*best) > current * (1 + margin):
                self.switch(best)
            else:
                # a close rival not run lately: its prediction rests on calibration and on runs of
                # drafts never observed, so run it for a while (its timings and rounds then count)
                rivals = [p for p in self.candidates() if p != (self.exit_layer, self.k) and p[1] and
                          self.rounds - self.tried.get(p, 0) >= EXPLORE_EVERY and
                          self.predicted(*p) > current * (1 - EXPLORE_WITHIN)]
                if rivals:
                    self.switch(min(rivals, key=lambda p: self.tried.get(p, 0)))
                    self.exploring = True
        self.tried[(self.exit_layer, self.k)] = self.rounds
        self.speedup = self.predicted(self.exit_layer, self.k)
        return self.exit_layer, self.k

    def switch(self, pair):
        if pair[0] != self.exit_layer:
            self.accepted = Rate(self.agree[pair[0]].value) if self.probing else self.accepted
            self.survival = Survival(self.max_k)
        (self.exit_layer, self.k), self.dwell = pair, 0

    def taps(self, E):
        return self.exits if self.probing else ()

    def bucket(self, n: int) -> int:
        return min(b for b in self.ks if b >= n) if n else self.ks[0]

    def keep_drafting(self, E, confidence: float, made: int) -> bool:
        """After `made` drafts, the last with this confidence: draft one more only if it is
        expected to add what its draft step would yield at the tokens per decode step recent
        rounds achieved: the chance that the last draft is accepted (its confidence bin's record)
        times the chance the next is, given the ones before (the current exit's runs). A draft
        the verify pass rejects costs its step for nothing; the drafts after an accepted one
        would be drafted in the next round anyway."""
        if made >= self.k:
            return False
        chance = self.by_confidence[min(int(confidence * BINS), BINS - 1)].value
        return chance * self.next_accepted(E, made) >= self.achieved() * self.cost("draft", E)

    def next_accepted(self, E, made: int) -> float:
        """The chance draft made + 1 is accepted once the first `made` are: from the current
        exit's runs (after a few accepted drafts the next is likelier than the average one)."""
        a = self.acceptance(E)
        if E != self.exit_layer or self.survival.rounds < 8:
            return a
        return self.survival.alive(made + 1, a) / max(self.survival.alive(made, a), 1e-6)

    def achieved(self) -> float:
        """Tokens per decode step the recent rounds achieved (timed: not a prediction, which a
        wrong cost would inflate), the predicted speed-up until rounds have been timed."""
        if not self.round_seconds:
            return self.speedup
        return self.round_tokens / (self.round_seconds / (self.costs.decode * self.drift))

    def observe_times(self, E, made, bucket, draft_s, verify_s, round_s):
        """Seconds the round's phases took, and the whole round (the rest is the loop's own work:
        the host synchronisation, bookkeeping, this policy; paid once per round, so it favours
        longer rounds). A step's first timing is skipped: it may include compiling its graph
        (costs read from the cache) or evaluating its guards."""
        if not self.timing:
            return
        if self.rounds > 1:
            rest = max(round_s - draft_s - verify_s, 0.0)
            self.overhead += TIME_WEIGHT * (rest - self.overhead)
            self.round_seconds += TIME_WEIGHT * (round_s - self.round_seconds) if self.round_seconds else round_s
        samples = [(("verify", E, bucket), verify_s)] + ([(("draft", E), draft_s / made)] if made else [])
        for key, seconds in samples:
            if key not in self.timed:
                self.timed.add(key)
                continue
            old = self.seconds.get(key, seconds)
            self.seconds[key] = old + TIME_WEIGHT * (seconds - old)
        if self.seconds:  # the median step, so that one miscalibrated step does not move the others
            self.drift = statistics.median(min(max(t / self.calibrated(key), 0.2), 5.0)
                                           for key, t in self.seconds.items())

    def observe(self, E, k, made, accepted, confidences):
        self.round_tokens += TIME_WEIGHT * (accepted + 1 - self.round_tokens)
        if made:
            self.accepted.add(accepted, accepted + (accepted < made))
            self.survival.add(made, accepted)
        for j, c in enumerate(confidences[:accepted + 1]):  # the drafts the verify pass judged
            self.by_confidence[min(int(c * BINS), BINS - 1)].add(float(j < accepted))

    def period(self, k) -> int:
        """Rounds per probe: plain rounds yield one token each, so they probe a quarter as often."""
        return self.probe_every * (4 if k == 0 else 1)

    def probe_row(self, accepted):
        if not self.probing or (self.rounds > self.warm_rounds and self.rounds % self.period(self.k)):
            return None
        return self.rounds % (accepted + 1)  # a verified row, in turn (the same on every rank)

    def observe_probe(self, E, taps, tokens, target):
        for c, t in zip(taps, tokens):
            self.agree[c].add(float(t == target))


class BatchPolicy:
    """Chooses each batched round's (E, k), k = 0 a plain step, for the b rows it runs
    (batching.Batch): the pair with the most expected tokens per row per second, from the round
    costs measured at b rows (costs[b], Batch.measure_costs) and each exit's acceptance in the
    batch's own rounds. Every row drafts the same k (one verify shape), so there is no early stop
    and no probe; an exit not run lately leans on its last estimate, and a rival predicted within
    EXPLORE_WITHIN is run now and then, as in AdaptivePolicy. A round's cost grows with b faster
    than a plain step's (a verify pass over b x (k + 1) rows turns compute-bound while a step still
    streams the weights once), which is where speculation stops paying: at the measured b where
    expected tokens / round cost falls below one token per plain step."""

    def __init__(self, costs: dict, exits, ks, shared: bool):
        self.costs, self.exits, self.ks, self.shared = costs, tuple(exits), tuple(ks), shared
        self.max_k = max(ks)
        self.accepted = {E: Rate(0.5) for E in self.exits}
        # A round's seconds are predicted as calibrated x factor[(b, E, k)] x speed: `speed`, the
        # machine now against the calibration, follows every round quickly (a shared machine's
        # neighbours slow every kind of round alike); `factor`, what that kind's rounds take
        # against its calibration, follows its own rounds slowly. So a kind not run lately is
        # predicted at the machine's present speed: with one moving average of seconds per kind,
        # the kind running when the machine slowed looked slower than the others, at their old
        # timings, and the policy left the best kind for them (2 rows: k = 2 in 60% of the rounds
        # where k = 4 was 7% better).
        self.speed, self.factor = 1.0, {}
        self.timed = set()
        self.choice, self.dwell = {}, {}  # b -> its current (E, k), and the rounds it ran
        self.tried = {}  # (b, E, k) -> the last round it ran
        self.exploring = set()  # the b whose current pair is a rival being explored
        self.rounds = 0
        # under tensor parallelism every rank must choose alike: only the tokens decide, not clocks
        self.timing = not (torch.distributed.is_available() and torch.distributed.is_initialized()
                           and torch.distributed.get_world_size() > 1)

    def calibrated(self, b, E, k) -> float:
        c = self.costs[b]
        return c.decode if k == 0 else c.verify[(E, k)]

    def predicted(self, b, E, k) -> float:
        """Expected tokens per row per second."""
        seconds = self.calibrated(b, E, k) * self.factor.get((b, E, k), 1.0) * self.speed
        return (expected_tokens(self.accepted[E].value, k) if k else 1.0) / seconds

    def candidates(self):
        return [(self.exits[0], 0)] + [(E, k) for E in self.exits for k in self.ks]

    def choose(self, b: int):
        self.rounds += 1
        current = self.choice.get(b) or max(self.candidates(), key=lambda p: self.predicted(b, *p))
        self.dwell[b] = self.dwell.get(b, 0) + 1
        if self.dwell[b] >= MIN_DWELL:
            now = self.predicted(b, *current)
            best = max(self.candidates(), key=lambda p: self.predicted(b, *p))
            rivals = [p for p in self.candidates() if p != current and self.predicted(b, *p) > now * (1 - EXPLORE_WITHIN)
                      and self.rounds - self.tried.get((b, *p), 0) >= EXPLORE_EVERY]
            margin = 0.0 if b in self.exploring else HYSTERESIS  # an explored rival gives way to the best
            self.exploring.discard(b)
            if best != current and self.predicted(b, *best) > now * (1 + margin):
                current, self.dwell[b] = best, 0
            elif rivals:  # predictions resting on calibration or old rounds: run it for a while
                current, self.dwell[b] = min(rivals, key=lambda p: self.tried.get((b, *p), 0)), 0
                self.exploring.add(b)
        self.choice[b] = current
        self.tried[(b, *current)] = self.rounds
        return current

    def observe(self, b: int, E, k: int, hits: int, judged: int, seconds: float | None):
        """A round's outcome over its rows: drafts accepted (hits) of those judged (accepted, and
        each row's first rejected), and its wall time (None: not a steady round's, its guards
        evaluated). A shape's first timing is skipped too: it may include compiling."""
        if k:
            self.accepted[E].add(hits, judged)
        if not self.timing or seconds is None:
            return
        key = (b, E, k)
        if key not in self.timed:
            self.timed.add(key)
            return
        # a stall (the collector) counts as STALL times the prediction at most
        ratio = min(max(seconds / (self.calibrated(*key) * self.factor.get(key, 1.0) * self.speed), 1 / STALL), STALL)
        self.speed *= ratio ** TIME_WEIGHT
        self.factor[key] = self.factor.get(key, 1.0) * ratio ** FACTOR_WEIGHT
