"""The engine loop behind serve.py: requests wait in a bounded queue and run by continuous batching
over `batching.Batch` (one row of the KV cache per running request), with no HTTP in sight.

The loop runs in the command's main thread (so that torch.compile and Ctrl-C behave as in every
other command); the HTTP layer calls `submit` and `cancel` from its own thread and receives each
request's tokens through the request's `deliver` callback, called from the loop's thread.

Between steps: cancelled sequences leave their rows, then queued requests take the free rows, in
arrival order. Each row samples with its request's own settings (Batch's per-row sampling), greedy
and sampled rows side by side, except in two cases where requests run in groups: a sampled request
with a `seed` runs alone, after torch.manual_seed(seed), so that it repeats exactly; and with
whole-step compiled graphs (`--layers_per_graph 0`, the CUDA default), whose sampling is inside the
graph, rows that run together share their settings (each mix would be a graph of its own). A
request that cannot join the running rows waits at the head of the queue until they end (first
come, first served: nothing overtakes it).
"""
import bisect
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

import batching
from steps import Steps
import tp
from sampling import SamplingParams


class QueueFull(Exception):
    pass


def _nowhere(*_):
    """Where the tokens of a rank other than 0 go: rank 0 answers the clients."""


@dataclass(eq=False)
class Request:
    """One generation asked for over HTTP. deliver(ids, finish_reason, error) gets its new tokens
    as they come (finish_reason "stop" or "length" with the last ones; error, once: (HTTP status,
    message), 400 for a request the engine refused, 500 where it failed)."""
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    deliver: Callable
    seed: int | None = None
    rid: int = -1  # its id in the engine loop (the same on every rank)
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    seq: batching.Sequence | None = None

    def group(self, mix: bool):
        """What the rows of one Batch must share (see the module's docstring); mix: rows may sample
        with settings of their own."""
        if self.sampling.greedy:
            return "any" if mix else SamplingParams()
        if self.seed is not None:  # its own: rid is never reused, as id(self) is once a request is freed
            return ("seeded", self.rid)
        return "any" if mix else self.sampling


HISTOGRAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Histogram:
    def __init__(self):
        self.counts, self.sum, self.n = [0] * (len(HISTOGRAM_BUCKETS) + 1), 0.0, 0

    def observe(self, v: float):
        self.counts[bisect.bisect_left(HISTOGRAM_BUCKETS, v)] += 1
        self.sum += v
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for le, c in zip([*map(str, HISTOGRAM_BUCKETS), "+Inf"], self.counts):
            total += c
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        return out + [f"{name}_sum {self.sum}", f"{name}_count {self.n}"]


class Metrics:
    """Counters, gauges and latency histograms, written in Prometheus' text format by `render`."""
    WINDOW_S = 10.0  # tokens/s is measured over the last this many seconds

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = {}  # by outcome: finish reason, "cancelled" or the HTTP status of an error
        self.prompt_tokens = self.generated_tokens = self.rounds = self.drafted = self.accepted = 0
        self.steps = 0
        self.recent = deque()  # (time, tokens) of the last WINDOW_S seconds
        self.ttft, self.latency, self.itl = Histogram(), Histogram(), Histogram()

    def count(self, outcome: str):
        with self.lock:
            self.requests[outcome] = self.requests.get(outcome, 0) + 1

    def tokens(self, n: int):
        now = time.perf_counter()
        with self.lock:
            self.generated_tokens += n
            self.recent.append((now, n))
            while self.recent and self.recent[0][0] < now - self.WINDOW_S:
                self.recent.popleft()

    def finished(self, req: Request, first_token_s: float | None, total_s: float):
        """A request's prompt, tokens and speculation, and its latencies (once, when it ends)."""
        seq = req.seq
        with self.lock:
            self.prompt_tokens += len(req.prompt)
            if seq is not None and seq.stats is not None:
                self.rounds += seq.stats.rounds
                self.drafted += seq.stats.drafted
                self.accepted += sum(seq.stats.accepted_per_round)
            if first_token_s is not None:
                self.ttft.observe(first_token_s)
                self.latency.observe(total_s)
                if seq is not None and len(seq.tokens) > 1:
                    self.itl.observe((total_s - first_token_s) / (len(seq.tokens) - 1))

    def render(self, queue_length: int, running: int, rows: int) -> str:
        now = time.perf_counter()
        with self.lock:
            recent = sum(n for t, n in self.recent if t >= now - self.WINDOW_S)
            lines = ["# TYPE layerskip_requests_total counter"]
            lines += [f'layerskip_requests_total{{outcome="{k}"}} {v}' for k, v in sorted(self.requests.items())]
            for name, kind, value, what in [
                ("queue_length", "gauge", queue_length, "requests waiting for a free row"),
                ("running_rows", "gauge", running, "rows of the batch generating now"),
                ("batch_rows", "gauge", rows, "rows of the KV cache (--max_batch_size)"),
                ("prompt_tokens_total", "counter", self.prompt_tokens, "prompt tokens of finished requests"),
                ("generation_tokens_total", "counter", self.generated_tokens, "tokens generated"),
                ("generation_tokens_per_second", "gauge", recent / self.WINDOW_S,
                 f"tokens generated per second over the last {self.WINDOW_S:.0f} s, all rows together"),
                ("batch_steps_total", "counter", self.steps, "steps (or speculative rounds) of the whole batch"),
                ("sequence_rounds_total", "counter", self.rounds, "speculative rounds of finished requests"),
                ("drafted_tokens_total", "counter", self.drafted, "draft tokens verified, finished requests"),
                ("accepted_tokens_total", "counter", self.accepted, "draft tokens accepted, finished requests"),
                ("acceptance_rate", "gauge", self.accepted / self.drafted if self.drafted else 0.0,
                 "accepted / drafted tokens"),
                ("tokens_per_round", "gauge", self.accepted / self.rounds + 1 if self.rounds else 0.0,
                 "tokens a speculative round yields, accepted drafts and the verifier's own"),
            ]:
                lines += [f"# HELP layerskip_{name} {what}", f"# TYPE layerskip_{name} {kind}",
                          f"layerskip_{name} {value}"]
            for name, h, what in [("time_to_first_token_seconds", self.ttft, "arrival to first token"),
                                  ("request_duration_seconds", self.latency, "arrival to last token"),
                                  ("inter_token_latency_seconds", self.itl, "mean time between tokens, per request")]:
                lines += [f"# HELP layerskip_{name} {what}", f"# TYPE layerskip_{name} histogram",
                          *h.lines(f"layerskip_{name}")]
        return "\n".join(lines) + "\n"


class EngineLoop:
    """Continuous batching of requests over the engine's model (caches set up with max_batch_size
    rows), with the engine's strategy: autoregressive, early exit, self-speculative (fixed or
    adaptive), the quantized self-draft or a draft model."""

    def __init__(self, engine, max_queue: int, prefill_chunk: int | None = None, metrics: Metrics | None = None):
        self.engine, self.max_queue, self.metrics = engine, max_queue, metrics or Metrics()
        self.prefill_chunk = prefill_chunk or None  # a longer prompt is prefilled this many tokens between steps
        strategy = engine.strategy
        self.k, self.policy = engine.batch_rounds(strategy)
        self.lookahead = 0 if strategy.name == "autoregressive" else strategy.max_drafts  # positions past the kept
        self.draft = engine.draft_for(strategy)
        self.stop_ids = frozenset(engine.stops())
        # regional or eager steps sample outside any graph: rows may mix their settings
        self.mix = engine.steps.decode is Steps.decode or hasattr(engine.steps.decode, "layer_graph")
        self.cond = threading.Condition()
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # by id(sequence)
        self.batch, self.group = None, None
        self.ids, self.submitted = itertools.count(), {}  # request ids; submitted requests by id until they run

    def new_batch(self, sampling) -> batching.Batch:
        """A Batch over the engine's caches with its strategy (and draft source), sampling by default as given."""
        e = self.engine
        return batching.Batch(e.model, sampling, e.steps, e.strategy.exit_layer, self.k, self.draft, self.policy,
                              e.strategy.draft_source, e.strategy.ngram_tokens,
                              e.chooser_for(e.strategy, sampling, self.rows))

    @property
    def rows(self) -> int:
        return self.engine.model.max_batch_size

    @property
    def context(self) -> int:
        return self.engine.model.max_seq_length

    def room(self, prompt_len: int) -> int:
        """The most tokens a request with this prompt can ask for (a speculative round writes up to k
        positions past the last token it keeps)."""
        return self.context - prompt_len - self.lookahead

    def submit(self, req: Request):
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests wait for a row); retry later")
            req.rid = next(self.ids)
            self.submitted[req.rid] = req
            self.waiting.append(req)
            self.cond.notify()

    def cancel(self, req: Request):
        """The client went away (or its stop string came): a queued request leaves the queue now, a
        running one's row is freed before the next step."""
        with self.cond:
            req.cancelled = True
            if req in self.waiting:
                self.waiting.remove(req)
                self.submitted.pop(req.rid, None)
            self.cond.notify()

    def queue_length(self) -> int:
        return len(self.waiting)

    def running_rows(self) -> int:
        return len(self.running)

    def serve_forever(self, keep_going=lambda: True):
        """Steps until keep_going() turns false (on rank 0). Under torchrun every rank runs this
        loop: rank 0 decides what each iteration does (`_plan`: which rows leave, which requests
        join) and broadcasts it, and all ranks then do the same (`_apply`) and step together."""
        rank, world_size = tp.world()
        while True:
            plan = self._plan(keep_going) if rank == 0 else None
            if world_size > 1:
                box = [plan]
                torch.distributed.broadcast_object_list(box, src=0)
                plan = box[0]
            if plan is None:
                return
            self._apply(plan)

    def _plan(self, keep_going):
        """What this iteration does: {"gone": request ids, "batch": a new Batch's (sampling, seed)
        or None, "admit": [(id, prompt, max_tokens, sampling)]}; None to stop. Waits a moment when
        idle."""
        if not keep_going():
            return None
        with self.cond:
            if not self.waiting and not self.running:
                self.cond.wait(0.25)
                return {"gone": [], "batch": None, "admit": []}
            gone = [r.rid for r in self.running.values() if r.cancelled]
            new, admit = self._admissible()
        return {"gone": gone, "batch": new, "admit": [(r.rid, r.prompt, r.max_tokens, r.sampling) for r in admit]}

    def _apply(self, plan: dict):
        for rid in plan["gone"]:
            req = next(r for r in self.running.values() if r.rid == rid)
            self.batch.remove(req.seq)
            del self.running[id(req.seq)]
        if plan["batch"] is not None:
            sampling, seed = plan["batch"]
            if seed is not None:
                torch.manual_seed(seed)
            self.batch = self.new_batch(sampling)
        if self.batch is not None and self.batch.filling:
            for seq, kept in self._guarded(self.batch.fill, self.prefill_chunk):
                self._produced(seq, kept)
        for rid, prompt, max_tokens, sampling in plan["admit"]:
            # rank 0 delivers to its clients; the other ranks only compute the same rows
            self._add(self.submitted.pop(rid, None) or Request(prompt, max_tokens, sampling, _nowhere, rid=rid))
        if self.running:
            self._step()

    def _admissible(self):
        """(the new Batch's (sampling, seed) when the queue's head starts one, else None; the queued
        requests that take free rows now, in arrival order). Under the lock (cancel has taken
        cancelled requests out of the queue)."""
        if not self.waiting:
            return None, []
        new = None
        if not self.running and self.waiting[0].group(self.mix) != self.group:  # the head's turn: a new Batch
            head = self.waiting[0]
            self.group = head.group(self.mix)
            new = (head.sampling, head.seed if not head.sampling.greedy else None)
        free = self.rows - len(self.running)
        taken = []
        while self.waiting and len(taken) < free and self.waiting[0].group(self.mix) == self.group:
            taken.append(self.waiting.popleft())
        return new, taken

    def _add(self, req: Request):
        req.seq = batching.Sequence(req.prompt, req.max_tokens, self.stop_ids, sampling=req.sampling)
        try:
            kept = self.batch.add(req.seq, self.prefill_chunk)
        except ValueError as e:  # checked before it was queued; a refusal here names what does not fit
            req.deliver([], None, (400, str(e)))
            return
        except Exception as e:
            self._failed(e, [req, *self.running.values()])
            return
        self.running[id(req.seq)] = req
        if kept:  # else its prompt is prefilled in chunks, the next ones between the coming steps
            self._produced(req.seq, kept)

    def _produced(self, seq: batching.Sequence, kept: list[int]):
        req = self.running[id(seq)]
        self.metrics.tokens(len(kept))
        if seq.done:
            del self.running[id(seq)]
        req.deliver(kept, seq.finish_reason, None)

    def _guarded(self, fn, *args):
        try:
            return fn(*args)
        except Exception as e:  # a bug must not take the server down: fail the rows it hit, start afresh
            self._failed(e, list(self.running.values()))
            return []

    def _failed(self, e: Exception, reqs: list[Request]):
        for req in reqs:
            req.deliver([], None, (500, f"the engine failed: {type(e).__name__}: {e}"))
        self.running.clear()
        self.batch, self.group = None, None

    def _step(self):
        produced = self._guarded(self.batch.step)
        if self.batch is None:
            return
        self.metrics.steps += 1
        for seq, kept in produced:
            self._produced(seq, kept)
