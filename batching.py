"""Many sequences at once: continuous batching over the rows of the static KV cache.

Each sequence owns one row of the cache (`model.max_batch_size` rows) from its prefill to its last
token, with its own positions, length and stop state. Its prompt is prefilled alone into its row
(`model.cache_rows`), so prompts of any lengths mix without padding and the prefill computes
exactly what a batch-1 prefill does (a long one may be prefilled in chunks between steps, its
row riding along the steps as padding past what it has filled: `add(seq, chunk)`, `fill`). Then
one decode step advances every row together, each at its own position (input_pos [B, 1]). A step
runs the first b rows only, b a power of two (or all rows) holding every running one: a free row
among them rides along as padding at position 0 of its own row, which the next prefill there
overwrites. Between steps a sequence that ended leaves and a queued one takes the lowest free row:
the step shapes are those few buckets, so compiled steps compile each once and never recompile.

Each row's greedy output equals that prompt's batch-1 greedy output token for token: every kernel
a step runs reduces each row in an order independent of the other rows (cpu_kernels: up to
EXACT_ROWS rows; tests/test_batching.py checks it against `decoding.generate`).
"""
import contextlib
from collections import Counter
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from adaptive import StepCosts
from decoding import (CATCH_UP_BUCKETS, GenerationStats, Strategy, buckets_up_to, catch_up, check_draft_source,
                      check_exit_layer, check_fits, check_num_speculations, describe_choices, describe_sources,
                      has_own_cache, lengths_to_try, read_round)
from ngram import NgramIndex, SourceChooser, check_draft_source as check_source_name
from steps import Steps, check_finite, synchronize
from model import Transformer
from sampling import RowParams, SamplingParams


@dataclass
class Sequence:
    """One prompt's generation: its tokens so far and why it ended."""
    prompt: list[int]
    max_new_tokens: int
    stop_ids: frozenset = frozenset()
    tokens: list = field(default_factory=list)  # generated so far (a stop token, if any, kept last)
    finish_reason: str | None = None  # "stop" (a stop token) or "length" (max_new_tokens), once ended
    stats: GenerationStats | None = None
    sampling: SamplingParams | None = None  # its own sampling settings (None: the batch's)
    row: int | None = None  # its cache row while it runs
    started: float = 0.0  # when its decoding began (after its prefill)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def take(self, ids: list[int]) -> list[int]:
        """Appends what this sequence keeps of ids (up to its first stop token or its budget) and
        returns it; sets finish_reason once it ends."""
        kept = []
        for t in ids:
            kept.append(t)
            if t in self.stop_ids:
                self.finish_reason = "stop"
                break
            if len(self.tokens) + len(kept) == self.max_new_tokens:
                self.finish_reason = "length"
                break
        self.tokens += kept
        return kept


class Batch:
    """Decoding of up to model.max_batch_size sequences at once: autoregressive (with exit_layer:
    early-exit), or with num_speculations k speculative: every row drafts k tokens, one verify pass
    scores all rows x (k + 1) positions, and each row keeps its own accepted prefix and advances by
    its own count. The drafts come from layers [0, exit_layer) of the model itself (LayerSkip, one
    shared cache: the verify pass resumes the drafts at layer E) or, with draft_model, from that
    model's layers [0, exit_layer) (all if None): a separate model with its own cache, or the
    quantized copy of the model's own layers, with its own cache or drafting into the model's
    (Transformer.share_caches, as the engine sets it up). `add` prefills a sequence into a free row; `step`
    runs one step (or round) of every running sequence and returns what each produced; sequences
    that end leave their rows at once. A sequence may bring sampling settings of its own
    (Sequence.sampling, else params): rows with different settings, greedy ones among them, share
    the steps (sampling.RowParams)."""

    def __init__(self, model: Transformer, params: SamplingParams, steps: Steps = Steps(),
                 exit_layer: int | None = None, num_speculations: int = 0, draft_model: Transformer | None = None,
                 policy=None, draft_source: str = "model", ngram_tokens: int = Strategy.ngram_tokens, chooser=None):
        check_source_name(draft_source)
        if draft_source == "ngram" and (num_speculations or draft_model is not None or policy is not None
                                        or exit_layer is not None):
            raise ValueError("draft_source ngram drafts from the text alone: no exit layer, draft model or k")
        if draft_source == "auto" and not num_speculations and policy is None:
            raise ValueError("draft_source auto chooses between the text and a model's drafts: give num_speculations")
        if model.max_batch_size < 1:
            raise RuntimeError("call setup_caches(max_batch_size, max_seq_length) before decoding")
        if policy is not None:  # adaptive.BatchPolicy: (E, k) per round, k at most its largest
            num_speculations = policy.max_k
        if num_speculations:
            check_num_speculations(num_speculations)
            for E in policy.exits if policy is not None and draft_model is None else (exit_layer,):
                check_draft_source(model, draft_model, E)
        elif draft_model is not None:
            raise ValueError("a draft model drafts for speculative decoding: give num_speculations")
        else:
            check_exit_layer(model.args.n_layers, exit_layer)
        if draft_model is not None and draft_model.max_batch_size != model.max_batch_size:
            raise RuntimeError("the draft model's cache needs as many rows as the model's")
        self.model, self.params, self.steps, self.exit_layer = model, params, steps, exit_layer
        self.draft_model, self.k, self.policy = draft_model, num_speculations, policy
        self.own_cache = has_own_cache(model, draft_model)  # it falls behind where it does not draft
        B, device = model.max_batch_size, model.norm.weight.device
        self.rows: list[Sequence | None] = [None] * B
        self.cur = torch.zeros(B, 1, dtype=torch.long, device=device)  # each row's newest token
        self.pos = torch.zeros(B, 1, dtype=torch.long, device=device)  # and its position
        self.prev = torch.zeros(B, 1, dtype=torch.long, device=device)  # the token before it (draft model)
        self.live = torch.zeros(B, 1, dtype=torch.long, device=device)  # 1 for a running row: a free one stays at 0
        self.ngram = ngram_tokens if draft_source != "model" else 0  # the most tokens a text proposal drafts
        self.ngram_buckets = buckets_up_to(self.ngram) if self.ngram else ()
        self.lookahead = max(self.k, self.ngram)
        self.offsets = torch.arange(self.lookahead + 1, device=device)
        self.texts = [None] * B  # each running row's NgramIndex (with n-gram drafts)
        self.chooser = (chooser or SourceChooser(self.k, clocks=params.greedy)) if self.ngram else None
        self.device = device
        self.buckets = sorted({1 << i for i in range(B.bit_length()) if 1 << i < B} | {B})
        self.choices = Counter()  # with a policy: rounds by (E, k)
        self.behind = [0] * B  # own-cache draft: plain steps its cache has not seen, per row
        self.filling = {}  # row -> (sequence, prompt tokens prefilled, seconds): a prompt prefilled in chunks
        self.sampling = [params] * B  # each row's sampling settings (a free row: the batch's)
        self.steps_run, self.shapes = 0, set()  # the round shapes run so far (their guards evaluated once)

    @property
    def free_rows(self) -> int:
        return self.rows.count(None) - len(self.filling)

    @property
    def running(self) -> list[Sequence]:
        return [s for s in self.rows if s is not None]

    def check(self, seq: Sequence):
        """Refuses a sequence whose prompt, budget and lookahead do not fit the caches."""
        for m in (self.model, self.draft_model):
            if m is not None:
                check_fits(m, len(seq.prompt), seq.max_new_tokens, lookahead=self.lookahead)

    @torch.no_grad()
    def add(self, seq: Sequence, chunk: int | None = None) -> list[int]:
        """Prefills seq into a free row and returns its first token(s) (a one-token budget or a stop
        token ends it here, freeing the row again). With chunk, a prompt longer than chunk tokens is
        prefilled chunk tokens at a time: this call prefills the first chunk and returns [], and
        `fill` the next ones, between steps, so that a long prompt does not stall the rows already
        decoding (its row is taken meanwhile)."""
        self.check(seq)
        row = next((i for i, s in enumerate(self.rows) if s is None and i not in self.filling), None)
        if row is None:
            raise ValueError("no free row: the caller checks free_rows")
        seq.row = row
        self.filling[row] = (seq, 0, 0.0)
        if self.chooser:
            self.chooser.new_text()
        return self._fill(row, chunk)

    @torch.no_grad()
    def fill(self, chunk: int | None = None) -> list[tuple[Sequence, list[int]]]:
        """The next chunk of every prompt still being prefilled: [(sequence, its first tokens)] for
        those whose prefill ended."""
        out = []
        for row in list(self.filling):
            seq = self.filling[row][0]
            kept = self._fill(row, chunk)
            if kept:
                out.append((seq, kept))
        return out

    def _fill(self, row: int, chunk: int | None) -> list[int]:
        """Prefills the next chunk (all the rest without chunk) of the prompt filling row; once the
        prompt is done, the row starts decoding and its first token(s) are returned ([] before)."""
        seq, done, spent = self.filling[row]
        end = len(seq.prompt) if not chunk else min(done + chunk, len(seq.prompt))
        t0 = time.perf_counter()
        part = torch.tensor(seq.prompt[done:end], dtype=torch.long, device=self.device)[None]
        positions = torch.arange(done, end, device=self.device)
        with self.model.cache_rows(row, row + 1):
            first, finite = self.steps.prefill(self.model, part, positions, seq.sampling or self.params,
                                               None if self.k else self.exit_layer)
        if self.own_cache:
            with self.draft_model.cache_rows(row, row + 1):
                check_finite(self.steps.prefill(self.draft_model, part, positions, self.params, self.exit_layer)[1])
        if end < len(seq.prompt):
            synchronize(self.device)  # a chunk's time is its own, not the next step's
            self.filling[row] = (seq, end, spent + time.perf_counter() - t0)
            return []
        del self.filling[row]
        seq.row = None
        check_finite(finite)
        kept = seq.take(first[0].tolist())
        seq.started = time.perf_counter()
        seq.stats = GenerationStats(len(seq.prompt), 0, spent + seq.started - t0, 0.0,
                                    num_speculations=self.lookahead, adaptive=self.policy is not None)
        if seq.done:
            self._finish(seq)
        else:
            seq.row = row
            self.rows[row] = seq
            own = seq.sampling or self.params
            self.sampling[row] = SamplingParams() if own.greedy else own  # greedy is greedy, whatever its top-k
            self.cur[row] = first[0]
            self.pos[row] = len(seq.prompt)
            self.prev[row] = seq.prompt[-1]
            self.live[row] = 1
            if self.ngram:
                self.texts[row] = NgramIndex(seq.prompt + seq.tokens)
        return kept

    @torch.no_grad()
    def step(self) -> list[tuple[Sequence, list[int]]]:
        """One step (autoregressive) or round (speculative; with a policy, its choice of (E, k),
        k = 0 a plain step) of every running sequence: [(sequence, its new tokens)]."""
        if not self.running:
            return []
        b = self.bucket()
        source, key, proposals = "model", None, None
        if self.ngram:  # the rows' proposals from their texts, a plain step, or the model's round (auto)
            key, proposals = self._choose(b)
            source = key[0]
        if source == "ngram":
            E, k = None, key[-1]
        elif source == "plain":
            E, k = None, 0
        else:
            E, k = self.policy.choose(b) if self.policy else (self.exit_layer, self.k)
        if k and any(self.behind[:b]) and source == "model":
            tokens, t = sum(self.behind[:b]), time.perf_counter()
            self._catch_up(b)
            if self.chooser:  # timed apart from the round (SourceChooser.choose charges it)
                self.chooser.observe_catch_up(time.perf_counter() - t, tokens)
        for row, (seq, done, _) in self.filling.items():
            # A row still prefilling rides along as padding, written past what its prompt has filled
            # (a draft with its own cache writes one position earlier), where its next chunk writes.
            if row < b:
                self.pos[row] = done + 1
        t0 = time.perf_counter()
        # The batch's model, caches and settings never change (rows join by prefill, between
        # steps), so a round of a shape it ran before needs its compiled steps' guards evaluated no
        # more (dynamo still tells the shapes' graphs apart), as the one-sequence loop does
        # (decoding.Speculation.stance). A shape's first round evaluates them (and compiles, the
        # first time): about 1 ms a compiled call, 25 ms of a 2-row k = 4 round, which, when every
        # switch of an adaptive policy paid it (the guards were skipped only for the shape of the
        # round before), made the rounds switched to look slower than they are.
        shape = (b, source, E, k)
        guarded = shape not in self.shapes
        self.shapes.add(shape)
        with torch.compiler.set_stance(skip_guard_eval_unsafe=not guarded), self.cache_rows(b):
            if source == "ngram":
                produced = self._ngram_round(b, proposals, k)
            elif source == "plain":
                produced = self._decode(b, None)
            else:
                produced = self._round(b, E, k) if k else self._decode(b, E if not self.k else None)
        if self.chooser and not k:  # a decode step: the plain step chosen, or the policy's plain round
            for seq in self.rows[:b]:
                if seq is not None:
                    seq.stats.count(source, 0, 0)
        seconds = None if guarded else time.perf_counter() - t0  # a guarded round is not a steady one
        if self.policy and source == "model":
            self.policy.observe(b, E, k, *self.judged, seconds)
            self.choices[(E, k)] += 1
        self.steps_run += 1
        out = []
        for row, seq in enumerate(self.rows):
            if seq is None:
                continue
            kept = seq.take(produced[row])
            out.append((seq, kept))
            if proposals and source != "ngram" and proposals[row][0]:  # what its proposal would have kept
                self.chooser.observe_unverified(proposals[row][1], proposals[row][0], kept)
            if self.texts[row] is not None:
                self.texts[row].extend(kept)
            if seq.done:
                self.remove(seq)
        if self.chooser:
            self.chooser.observe_round(key, seconds, sum(len(kept) for _, kept in out), len(out))
        return out

    def _choose(self, b: int):
        """The kind of round for the first b rows (SourceChooser) and, for an n-gram round, each
        row's proposal from its text: (ids, match length), ([], 0) for a free row or none."""
        proposals = []
        for row, seq in enumerate(self.rows[:b]):
            budget = seq.max_new_tokens - len(seq.tokens) - 1 if seq is not None else 0
            proposals.append(self.texts[row].propose(min(self.ngram, budget)) if seq is not None else ([], 0))
        running = float(sum(s is not None for s in self.rows[:b]))
        options = {}
        longest = max(len(ids) for ids, _ in proposals)
        for K in lengths_to_try(self.ngram_buckets, longest):
            # a row without a proposal yields its one token all the same
            options[("ngram", b, K)] = running + sum(self.chooser.expected(n, min(len(ids), K)) - 1.0
                                                     for ids, n in proposals if ids)
        options.update({("plain", b): running, **({("model", b): None} if self.k or self.policy else {})})
        key = self.chooser.choose(options, behind=sum(self.behind[:b]), rows=running)
        if key[0] == "ngram":  # the proposals cut to the chosen length
            proposals = [(ids[:key[-1]], n) for ids, n in proposals]
        return key, proposals

    @torch.no_grad()
    def compile_rounds(self):
        """Runs every shape a round of this batch can take once on stand-in rows: for each bucket
        of rows, its step (plain or early exit) or fixed round, or each step and round a policy can
        choose, and with drafts from the text a plain step and an n-gram round at each padded
        proposal length; so that compiled steps compile them all now rather than at their first
        use inside a generation, where rows that finish early step smaller buckets (serve.py's
        warm-up, the benchmarks). Needs every row free; leaves the chooser as it was."""
        assert not self.running and not self.filling, "compile before adding sequences"
        chooser, self.chooser = self.chooser, SourceChooser() if self.chooser else None
        rounds = self.policy.candidates() if self.policy else [(self.exit_layer, self.k)]
        if self.ngram:  # the chooser's plain step
            rounds.append((None, 0))
        # a step (k = 0) runs the early exit only where the batch has no rounds (as in step())
        rounds = list(dict.fromkeys((E if k or not self.k else None, k) for E, k in rounds))
        try:
            for b in self.buckets:
                for E, k in rounds:
                    self._stand_ins(b, 1)  # each from position 1: a policy's many rounds stay within a short cache
                    with self.cache_rows(b):
                        self._round(b, E, k) if k else self._decode(b, E)
                for K in self.ngram_buckets:
                    self._stand_ins(b, 1)
                    with self.cache_rows(b):
                        self._ngram_round(b, [([5] * K, 1)] * b, K)
            if self.own_cache:  # a row's catch-up of its draft cache, at each padded length
                with self.draft_model.cache_rows(0, 1):
                    for T in CATCH_UP_BUCKETS:
                        catch_up(self.draft_model, self.steps, [5] * T, 0, self.params, self.exit_layer)
        finally:
            self.chooser = chooser
            self._clear_stand_ins()

    def _stand_ins(self, b: int, at: int):
        """The first b rows taken by stand-in sequences (a long budget, a token at position `at`)
        for measure_costs and compile_rounds; _clear_stand_ins frees them."""
        for row in range(b):
            self.rows[row] = Sequence([5] * at, 1 << 30, stats=GenerationStats(at, 0, 0.0, 0.0))
            self.rows[row].tokens = [5]
        self.cur[:b], self.pos[:b], self.prev[:b], self.live[:b] = 5, at, 5, 1

    def _clear_stand_ins(self):
        for row, seq in enumerate(self.rows):
            if seq is not None:
                self.rows[row] = None
                self.cur[row] = self.pos[row] = self.prev[row] = self.live[row] = 0
                self.behind[row] = 0

    def _ngram_round(self, b: int, proposals, K: int) -> list[list[int]]:
        """Every row's proposal from its text (padded to K drafts; none: padding alone, a decode
        step for that row), verified over every layer in one pass, as a draft model's drafts are;
        each row keeps its accepted prefix and the full model's token after it. Sampling, a
        proposal's draft distribution is one-hot (see decoding.Speculation.ngram_round)."""
        cur, pos, prev, live = self.cur[:b], self.pos[:b], self.prev[:b], self.live[:b]
        host, limits = [], []
        for seq, (ids, _) in zip(self.rows[:b], proposals):
            last = seq.tokens[-1] if seq is not None else 0
            host.append([last] + ids + (ids[-1:] or [last]) * (K - len(ids)))
            limits.append(len(ids))
        tokens = torch.tensor(host, device=self.device)
        params = self.row_params(b)
        draft_probs = None if params.greedy else torch.zeros(b, K, self.model.args.vocab_size, device=self.device) \
            .scatter_(2, tokens[:, 1:, None], 1.0)
        n, nxt = self.steps.batch_verify(self.model, tokens, None, draft_probs, pos + self.offsets[:K + 1],
                                         torch.tensor(limits, device=self.device), params, None)
        verdicts = read_round(tokens, nxt, n)  # the round's one host synchronisation
        prev.copy_(tokens.gather(1, n[:, None]))
        cur.copy_(nxt)
        pos.add_(n[:, None] + 1).mul_(live)
        produced = []
        for row, (seq, (a, kept), (ids, match)) in enumerate(zip(self.rows[:b], verdicts, proposals)):
            produced.append(kept)
            if seq is None:
                continue
            seq.stats.accepted_per_round.append(a)
            seq.stats.drafted += limits[row]
            seq.stats.count("ngram", limits[row], a)
            if ids:
                self.chooser.observe_ngram(match, len(ids), a)
            self.behind[row] += (a + 1) * self.own_cache  # the draft's cache falls behind
        return produced

    def bucket(self) -> int:
        """The rows a step runs: the first b, b the smallest of 1, 2, 4, ... (and max_batch_size)
        that holds every running row. Rows are taken lowest first, so few running sequences step
        few rows, and the set of step shapes (compiled graphs) stays small."""
        top = max(i for i, s in enumerate(self.rows) if s is not None) + 1
        return next(b for b in self.buckets if b >= top)

    def row_params(self, b: int):
        """The sampling settings of the first b rows: one SamplingParams when every running row has
        the same (a free row rides along with a running row's), else RowParams."""
        live = {self.sampling[i] for i, s in enumerate(self.rows[:b]) if s is not None}
        if len(live) <= 1:
            return live.pop() if live else self.params
        return RowParams(tuple(self.sampling[i] if s is not None else self.params
                               for i, s in enumerate(self.rows[:b])))

    def cache_rows(self, b: int):
        """The models' caches narrowed to their first b rows for a step (all of them: no narrowing)."""
        if b == len(self.rows):
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for m in (self.model, self.draft_model if self.own_cache else None):
            if m is not None:
                stack.enter_context(m.cache_rows(0, b))
        return stack

    def _decode(self, b: int, exit_layer: int | None) -> list[list[int]]:
        cur, pos, live = self.cur[:b], self.pos[:b], self.live[:b]
        nxt = self.steps.decode(self.model, cur, pos, self.row_params(b), exit_layer).clone()
        self.prev[:b].copy_(cur)  # a draft model's next round starts from [prev, cur]
        cur.copy_(nxt)
        pos.add_(1).mul_(live)
        for row, seq in enumerate(self.rows[:b]):
            if seq is None:
                continue
            if self.policy or self.chooser:  # a plain round among speculative ones
                seq.stats.accepted_per_round.append(0)
                if self.policy:
                    seq.stats.trace.append((exit_layer, 0, 0))
                self.behind[row] += self.own_cache  # the draft's cache falls behind
        self.judged = [0, 0]
        return [[t] for t in nxt[:, 0].tolist()]  # the step's one host synchronisation

    def _catch_up(self, b: int):
        """Before a round, a draft model's cache gets the positions its rows' plain steps and n-gram
        rounds skipped (per row, decoding.catch_up: at switches of source). A row
        at position p holds its tokens up to p - 1 in the model's cache; the round's first draft
        step writes p - 1 and p, so the draft needs [p - 2 - behind, p - 1)."""
        for row, seq in enumerate(self.rows[:b]):
            if seq is None or not self.behind[row]:
                continue
            ids = seq.prompt + seq.tokens
            p = len(ids) - 1  # the row's position: its newest token's
            start = max(p - 2 - self.behind[row], 0)
            with self.draft_model.cache_rows(row, row + 1):
                catch_up(self.draft_model, self.steps, ids[start:p - 1], start, self.params, self.exit_layer)
            self.behind[row] = 0

    def _round(self, b: int, E: int | None, k: int) -> list[list[int]]:
        """Every row drafts k tokens; one verify pass; each row keeps its accepted drafts (at most
        what its budget still needs, r - 1 for r tokens to go) and the full model's next token.

        A draft model with its own cache has not seen a row's previous token when that row kept
        every draft of the last round; so its first draft step of a round takes each row's two
        newest tokens, rewriting the older one's keys and values where it had seen it (the same
        values: the kernels are row-invariant) and filling them in where not: one pass, no per-row
        branch. One drafting into the model's caches (the quantized self-draft) has seen them all."""
        model, own = self.model, self.draft_model is not None
        E = self.exit_layer if own else E
        drafter = self.draft_model if own else model
        cur, pos, prev, live = self.cur[:b], self.pos[:b], self.prev[:b], self.live[:b]
        limits = [min(k, s.max_new_tokens - len(s.tokens) - 1) if s is not None else 0 for s in self.rows[:b]]
        limit = torch.tensor(limits, device=self.device)
        params = self.row_params(b)
        drafts, states, probs = [], [], []
        if self.own_cache:  # positions [pos - 1, pos] (a running row's pos >= 1); a free row's (0, 0) writes its own padding
            x, x_pos = torch.cat([prev, cur], 1), (pos - 1 + self.offsets[:2]).clamp_min(0)
        else:
            x, x_pos = cur, pos
        for j in range(k):
            x, h, q = (v.clone() if v is not None else None
                       for v in self.steps.batch_draft(drafter, x, x_pos, params, E))
            x_pos = pos + j + 1
            drafts.append(x)
            states.append(h[:, -1:])
            probs.append(q)
        tokens = torch.cat([cur, *drafts], 1)
        draft_probs = None if params.greedy else torch.stack(probs, 1)
        n, nxt = self.steps.batch_verify(model, tokens, None if own else torch.cat(states, 1), draft_probs,
                                         pos + self.offsets[:k + 1], limit, params, None if own else E)
        verdicts = read_round(tokens, nxt, n)  # the round's one host synchronisation
        prev.copy_(tokens.gather(1, n[:, None]))
        cur.copy_(nxt)
        pos.add_(n[:, None] + 1).mul_(live)
        produced, self.judged = [], [0, 0]
        for row, (seq, (a, kept)) in enumerate(zip(self.rows[:b], verdicts)):
            produced.append(kept)
            if seq is not None:
                seq.stats.accepted_per_round.append(a)
                seq.stats.drafted += limits[row]
                if self.chooser:
                    seq.stats.count("model", limits[row], a)
                if self.policy:
                    seq.stats.trace.append((E, k, limits[row]))
                # the drafts the verify pass judged: the accepted ones and the first rejected
                self.judged[0] += a
                self.judged[1] += a + (a < limits[row])
        return produced

    def remove(self, seq: Sequence):
        """Frees seq's row now (it ended, or its client went away); its row becomes padding."""
        if seq.row in self.filling and self.filling[seq.row][0] is seq:
            del self.filling[seq.row]
            self.pos[seq.row] = 0
            seq.row = None
        if seq.row is not None:
            self.rows[seq.row] = None
            self.sampling[seq.row] = self.params
            self.cur[seq.row] = 0
            self.pos[seq.row] = 0
            self.prev[seq.row] = 0
            self.live[seq.row] = 0
            self.behind[seq.row] = 0
            self.texts[seq.row] = None
            seq.row = None
        self._finish(seq)

    @torch.no_grad()
    def measure_costs(self, exits, ks, repeats: int = 5, progress: bool = False) -> dict:
        """Seconds of a plain step and of each (E, k) round as `step` runs them, for each bucket of
        rows: {rows: adaptive.StepCosts} (a round's draft steps and verify pass together, under
        verify[(E, k)]; draft empty). Run on stand-in rows at two thirds into the cache (attention
        reads up to a row's position), round-robin so that a machine whose speed drifts slows every
        entry alike; this also compiles every graph the policy can choose. Needs every row free."""
        assert not self.running, "measure the costs before adding sequences"
        at = min(self.model.max_seq_length * 2 // 3, self.model.max_seq_length - self.k - 2)
        shapes = [(b, E, k) for b in self.buckets for E, k in [(exits[0], 0)] + [(E, k) for E in exits for k in ks]]
        times = {shape: [] for shape in shapes}
        try:
            for rnd in tqdm(range(2 + repeats), desc="Batched step costs (compiling the graphs, if compiled)",
                            disable=not progress, file=sys.stderr):
                for b, E, k in shapes:
                    self._stand_ins(b, at)
                    t0 = time.perf_counter()
                    with self.cache_rows(b):
                        self._round(b, E, k) if k else self._decode(b, None if self.k else E)
                    if rnd >= 2:  # the first two compile and warm
                        times[(b, E, k)].append(time.perf_counter() - t0)
        finally:
            self._clear_stand_ins()
        med = {shape: statistics.median(t) for shape, t in times.items()}
        return {b: StepCosts(med[(b, exits[0], 0)], {}, {(E, k): med[(b, E, k)] for E in exits for k in ks})
                for b in self.buckets}

    def _finish(self, seq: Sequence):
        if seq.stats is not None:
            seq.stats.new_tokens = len(seq.tokens)
            seq.stats.decode_s = time.perf_counter() - seq.started


@dataclass
class BatchStats:
    sequences: int
    new_tokens: int
    wall_s: float
    steps: int  # decode steps or speculative rounds of the whole batch
    max_rows: int
    accepted: int = 0  # speculative: drafts kept, over all sequences
    drafted: int = 0  # and drafts that counted (within each row's budget)
    prefill_s: float = 0.0  # of wall_s, the prompts' prefills (each alone, between steps)
    chosen: str = ""  # with a policy: the rounds' (E, k) by share ("E=all k=4 70%, plain 30%")
    sources: str = ""  # with n-gram drafts: rows' rounds and accepted drafts per source (GenerationStats.sources)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else float("nan")

    @property
    def decode_s(self) -> float:
        """Seconds of decoding: the wall time less the prefills."""
        return self.wall_s - self.prefill_s

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after each prompt's first, per second of decoding."""
        decoded = self.new_tokens - self.sequences
        return decoded / self.decode_s if self.decode_s > 0 and decoded > 0 else float("nan")

    @property
    def ms_per_step(self) -> float:
        """Milliseconds of decoding per step or round of the whole batch."""
        return self.decode_s / self.steps * 1e3 if self.steps else float("nan")

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @classmethod
    def of(cls, seqs: list[Sequence], wall_s: float, steps: int, max_rows: int) -> "BatchStats":
        done = [s.stats for s in seqs if s.stats is not None]
        by_source = {}
        for st in done:
            for name, counts in st.by_source.items():
                by_source[name] = [a + b for a, b in zip(by_source.get(name, [0, 0, 0]), counts)]
        return cls(len(seqs), sum(len(s.tokens) for s in seqs), wall_s, steps, max_rows,
                   sum(sum(st.accepted_per_round) for st in done), sum(st.drafted for st in done),
                   sum(st.prefill_s for st in done), sources=describe_sources(by_source))


@torch.no_grad()
def generate_many(model: Transformer, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams,
                  steps: Steps = Steps(), exit_layer: int | None = None, stop_ids=(), on_tokens=None,
                  num_speculations: int = 0, draft_model: Transformer | None = None, policy=None,
                  prefill_chunk: int | None = None, draft_source: str = "model",
                  ngram_tokens: int = Strategy.ngram_tokens, chooser=None):
    """Generates from every prompt, model.max_batch_size at a time (Batch: autoregressive, or with
    num_speculations, or an adaptive.BatchPolicy, speculative): a prompt waits in order for a free
    row; with prefill_chunk, a longer prompt is prefilled that many tokens between steps.
    on_tokens(index, ids) streams each prompt's new tokens. Returns ([Sequence] in prompt order,
    BatchStats)."""
    seqs = [Sequence(list(p), max_new_tokens, frozenset(stop_ids)) for p in prompts]
    batch = Batch(model, params, steps, exit_layer, num_speculations, draft_model, policy, draft_source, ngram_tokens,
                  chooser)
    for s in seqs:  # refuse before any work
        batch.check(s)
    index = {id(s): i for i, s in enumerate(seqs)}
    queue = list(seqs)
    t0 = time.perf_counter()
    while queue or batch.running or batch.filling:
        for seq, kept in batch.fill(prefill_chunk):
            if on_tokens:
                on_tokens(index[id(seq)], kept)
        while queue and batch.free_rows:
            seq = queue.pop(0)
            kept = batch.add(seq, prefill_chunk)
            if on_tokens and kept:
                on_tokens(index[id(seq)], kept)
        for seq, kept in batch.step():
            if on_tokens and kept:
                on_tokens(index[id(seq)], kept)
    synchronize(batch.device)
    wall = time.perf_counter() - t0
    stats = BatchStats.of(seqs, wall, batch.steps_run, model.max_batch_size)
    stats.chosen = describe_choices(batch.choices) if policy else ""
    return seqs, stats
