"""Decoding loops for one sequence: autoregressive (optionally early-exit), self-speculative
(LayerSkip) and two-model speculative, the `Strategy` that names them and `run`, which puts a
prompt through one; their statistics. Each loop is a short function over the step functions of
steps.py; the speculative loop runs one round function per draft source (Speculation) and asks a
Policy for each round's exit layer and drafts (batching.py runs many sequences at once)."""
import resource
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from model import FIXED_ORDER_ROWS, Transformer
from ngram import NgramIndex, SourceChooser, check_draft_source as check_source_name
from quantized import SchemeError, parse_quantize
from sampling import SamplingParams
from steps import Steps, catch_up_draft_step, check_finite, synchronize


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    # Speculative loops only: one entry per round, the number of drafts accepted (0..k).
    accepted_per_round: list = field(default_factory=list)
    num_speculations: int = 0
    drafted: int = 0  # drafts that counted: k per round, fewer in a round cut short by the token budget
    draft_s: float = 0.0
    verify_s: float = 0.0
    catch_ups: int = 0  # own-cache drafts: rounds whose first draft step also took the last round's last draft
    early_stops: int = 0  # rounds whose drafting stopped at a draft the policy was not confident in
    trace: list = field(default_factory=list)  # per round: (exit layer, k chosen, drafts made)
    adaptive: bool = False  # a policy chose (E, k) per round
    # per draft source ("model", "ngram", "plain"): [rounds, drafts, accepted drafts]
    by_source: dict = field(default_factory=dict)

    def count(self, source: str, drafted: int, accepted: int):
        rounds, made, kept = self.by_source.get(source, (0, 0, 0))
        self.by_source[source] = [rounds + 1, made + drafted, kept + accepted]

    @property
    def sources(self) -> str:
        """Rounds and accepted drafts per draft source: "ngram 40 rounds 96/120 accepted, model 12
        rounds 20/48 accepted" ("" when every round drafted from the model)."""
        return describe_sources(self.by_source)

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced after the prefill's, per second of decoding (nan when the prefill's token
        was the only one: a prompt answered at once by the end of text has no decode speed)."""
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 and self.new_tokens > 1 else float("nan")

    @property
    def rounds(self) -> int:
        return len(self.accepted_per_round)

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / drafted tokens."""
        return sum(self.accepted_per_round) / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_round(self) -> float:
        """Mean tokens a round yields: the accepted drafts plus the full model's own token."""
        return sum(self.accepted_per_round) / self.rounds + 1 if self.rounds else float("nan")

    @property
    def accepted_histogram(self) -> list[int]:
        """Rounds that accepted 0, 1, ..., k drafts."""
        return [self.accepted_per_round.count(i) for i in range(self.num_speculations + 1)]

    @property
    def chosen(self) -> str:
        """Adaptive runs: each (E, k) the rounds ran with, by share of rounds ("plain": no drafts)."""
        return describe_choices(Counter((E, k) for E, k, _ in self.trace))

    @property
    def draft_share(self) -> float:
        """Draft time / (draft + verify) time."""
        busy = self.draft_s + self.verify_s
        return self.draft_s / busy if busy else float("nan")


def describe_choices(counts: Counter) -> str:
    """Rounds by (E, k) -> "E=20 k=4 70%, plain 30%" (by share of rounds; plain: no drafts)."""
    total = sum(counts.values())

    def name(E, k):
        return "plain" if k == 0 else f"E={E or 'all'} k={k}"
    return ", ".join(f"{name(E, k)} {n / total:.0%}" for (E, k), n in counts.most_common())


def describe_sources(by_source: dict) -> str:
    if set(by_source) <= {"model"}:
        return ""
    return ", ".join(f"{name} {rounds} rounds" + (f" {kept}/{made} accepted" if made else "")
                     for name, (rounds, made, kept) in sorted(by_source.items(), key=lambda kv: -kv[1][0]))


def check_fits(model: Transformer, prompt_len: int, max_new_tokens: int, lookahead: int = 0):
    """lookahead: positions a speculative round may write past the last token it keeps."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompt_len < 1:
        raise ValueError("the prompt is empty")
    need = prompt_len + max_new_tokens + lookahead
    if need > model.max_seq_length:
        extra = f" and {lookahead} positions of speculation lookahead" if lookahead else ""
        raise ValueError(f"the prompt ({prompt_len} tokens) plus max_new_tokens ({max_new_tokens}){extra} needs "
                         f"{need} positions but the KV cache holds {model.max_seq_length}; shorten the prompt, lower "
                         "max_new_tokens or set up a larger cache")


# A verify pass scores k + 1 positions; greedy self-speculation equals greedy decoding only while
# they stay within the rows the CPU kernels reduce in a fixed order (a pass of more rows takes the
# GEMM and SDPA, whose sums depend on the number of rows: 16 drafts changed 2 of 4 summaries).
MAX_SPECULATIONS = FIXED_ORDER_ROWS - 1
BUCKETS = (1, 2, 4, 8)  # drafts a verify pass is compiled for: a round that drafts n pads to the next
CATCH_UP_BUCKETS = (2, 4, 8, 16)  # positions a draft model's catch-up pass is compiled for (padded to the next)


def buckets_up_to(k: int) -> tuple:
    return tuple(b for b in BUCKETS if b < k) + (k,)


def lengths_to_try(buckets: tuple, m: int) -> tuple:
    """The padded lengths (of buckets) a proposal of m tokens may be verified at, cut or whole:
    every one up to the smallest that holds it (a shorter verify pass costs less); () for m = 0."""
    return tuple(b for b in buckets if b < m) + tuple(b for b in buckets if b >= m)[:1] if m else ()


def check_num_speculations(k: int):
    # Every round verifies k + 1 positions and keeps k drafts only if all of them are accepted:
    # far beyond what any draft achieves, a larger k only makes each round slower.
    if not 1 <= k <= MAX_SPECULATIONS:
        raise ValueError(f"--num_speculations must be in [1, {MAX_SPECULATIONS}], got {k}")


def check_exit_layer(n_layers: int, exit_layer: int | None, last: bool = False):
    """The one check of E against a model of n_layers layers (engine.check_metadata runs it before
    loading). last: E may be every layer (a draft model's own layers), else E < n (layers must remain)."""
    top = n_layers if last else n_layers - 1
    if exit_layer is not None and not 1 <= exit_layer <= top:
        raise ValueError(f"--exit_layer must be in [1, {top}] for this {n_layers}-layer model, got {exit_layer}")


def check_draft_vocab(vocab_size: int, draft_vocab_size: int):
    if draft_vocab_size != vocab_size:
        raise ValueError(f"the draft model's vocabulary ({draft_vocab_size}) differs from the model's ({vocab_size}); "
                         "speculative decoding needs the same tokenizer")


def check_draft_source(model: Transformer, draft_model: Transformer | None, exit_layer: int | None):
    """What speculation drafts from: layers [0, E) of the model itself, or of a draft model (all of
    them if E is None) that shares the model's vocabulary."""
    if exit_layer is None and draft_model is None:
        raise ValueError("give a draft source: exit_layer (self-speculative), draft_model or both")
    check_exit_layer((model if draft_model is None else draft_model).args.n_layers, exit_layer,
                     last=draft_model is not None)
    if draft_model is not None:
        check_draft_vocab(model.args.vocab_size, draft_model.args.vocab_size)


STRATEGIES = ("autoregressive", "self_speculative", "speculative")


@dataclass(frozen=True)
class Strategy:
    """How tokens are produced: autoregressive (with exit_layer E: early-exit inference),
    self_speculative (LayerSkip: layers [0, E) draft num_speculations tokens, the rest verify; with
    draft_quantize, a quantized copy of the model's own layers [0, E) drafts, all layers if E is
    None, and the full model verifies) or speculative (a separate draft model drafts)."""
    name: str = "autoregressive"
    exit_layer: int | None = None
    num_speculations: int = 3
    draft_quantize: str | None = None  # int8, int4, int4-g<N>: the scheme of the self-draft's copy
    auto_exit: bool = False  # --exit_layer auto: the adaptive policy chooses E per round (adaptive.py)
    auto_k: bool = False  # --num_speculations auto: it chooses k <= num_speculations and stops drafting early
    # model: the drafts above; ngram: from the text alone (ngram.py); auto: per round, the text's
    # proposal or the model's draft, whichever is expected to yield more tokens per second
    draft_source: str = "model"
    # the most tokens a proposal from the text drafts (--ngram_tokens): as many as a verify pass may
    # take, since the policy picks the padded length per round (a long copy pays for a long pass)
    ngram_tokens: int = MAX_SPECULATIONS

    def __post_init__(self):
        if self.name not in STRATEGIES:
            raise ValueError(f"unknown --generation_strategy {self.name!r}; choose from {', '.join(STRATEGIES)}")
        check_source_name(self.draft_source)
        if self.draft_source != "model":
            if self.name == "autoregressive":
                raise ValueError(f"--draft_source {self.draft_source} drafts for speculative decoding: add "
                                 "--generation_strategy self_speculative")
            if self.draft_source == "ngram" and (self.exit_layer is not None or self.draft_quantize or self.auto_exit
                                                 or self.name == "speculative"):
                raise ValueError("--draft_source ngram drafts from the text alone; a model's draft (--exit_layer, "
                                 "--draft_quantize, a draft model) takes part with --draft_source auto")
            if not 1 <= self.ngram_tokens <= MAX_SPECULATIONS:
                raise ValueError(f"--ngram_tokens must be in [1, {MAX_SPECULATIONS}], got {self.ngram_tokens}")
        if self.exit_layer is not None and self.exit_layer < 1:
            raise ValueError(f"--exit_layer must be >= 1, got {self.exit_layer}")
        if self.draft_quantize is not None:
            if self.name != "self_speculative":
                raise ValueError("--draft_quantize needs --generation_strategy self_speculative")
            try:
                parse_quantize(self.draft_quantize)
            except SchemeError as e:
                raise SchemeError(f"--draft_quantize: {e}") from None
        if (self.auto_exit or self.auto_k) and self.name == "autoregressive":
            raise ValueError("--exit_layer auto and --num_speculations auto apply to the speculative strategies")
        if self.auto_exit and self.name != "self_speculative":
            raise ValueError("--exit_layer auto applies to --generation_strategy self_speculative (a separate draft "
                             "model drafts with all its layers)")
        if self.auto_exit and self.exit_layer is not None:
            raise ValueError("--exit_layer is either a number or auto")
        if self.name == "self_speculative" and self.exit_layer is None and self.draft_quantize is None \
                and not self.auto_exit and self.draft_source != "ngram":
            raise ValueError("--generation_strategy self_speculative needs --exit_layer (or --draft_quantize, or "
                             "--draft_source ngram)")
        if self.name == "speculative" and self.exit_layer is not None:
            raise ValueError("--exit_layer does not apply to --generation_strategy speculative (the draft model "
                             "drafts)")
        check_num_speculations(self.num_speculations)

    def check_draft(self, separate: bool):
        """The one check of the strategy / draft pairing: a separate draft model (not the
        --draft_quantize copy) drafts exactly for speculative."""
        if self.name == "speculative" and not separate:
            raise ValueError("--generation_strategy speculative needs --draft_checkpoint_path")
        if self.name != "speculative" and separate:
            raise ValueError("--draft_checkpoint_path needs --generation_strategy speculative")

    @property
    def needs_draft_model(self) -> bool:
        """Drafts come from another model (a separate checkpoint, or the quantized self-copy)."""
        return self.name == "speculative" or self.draft_quantize is not None

    @property
    def adaptive(self) -> bool:
        return self.auto_exit or self.auto_k

    @property
    def model_drafts(self) -> bool:
        """Some rounds draft from a model (not --draft_source ngram)."""
        return self.draft_source != "ngram"

    @property
    def max_drafts(self) -> int:
        """The most drafts any round verifies: k, or a proposal from the text."""
        k = self.num_speculations if self.model_drafts else 0
        return max(k, self.ngram_tokens) if self.draft_source != "model" else k

    def lookahead(self, max_new_tokens: int) -> int:
        """Cache positions a round may write beyond the tokens it keeps (k; capped at max_new_tokens
        for a fixed k, whose verify pass then shrinks; an adaptive one keeps its compiled shapes)."""
        if self.name == "autoregressive":
            return 0
        return self.max_drafts if self.auto_k or self.draft_source != "model" else \
            min(self.num_speculations, max_new_tokens)

    def describe(self) -> str:
        if self.name == "autoregressive":
            return "autoregressive" + (f" (exit layer {self.exit_layer})" if self.exit_layer else "")
        draft = f" {self.draft_quantize} draft" if self.draft_quantize else ""
        exit_layer = f" E={self.exit_layer}" if self.exit_layer else (" E=auto" if self.auto_exit else
                                                                     " E=all" if draft else "")
        k = f"auto (<= {self.num_speculations})" if self.auto_k else self.num_speculations
        text = f" n-gram drafts (<= {self.ngram_tokens})"
        if self.draft_source == "ngram":
            return f"{self.name}{text}"
        return f"{self.name}{draft}{exit_layer} k={k}" + (f" or{text}" if self.draft_source == "auto" else "")


def run(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, params: SamplingParams,
        strategy: Strategy = Strategy(), draft_model: Transformer | None = None, stop_ids=(), on_tokens=None,
        steps: Steps = Steps(), policy=None, chooser=None):
    """Runs prompt [T] through the chosen strategy; on_tokens(list of ids) streams the output.
    policy: an adaptive strategy's adaptive.AdaptivePolicy; chooser: with n-gram drafts, a
    SourceChooser kept across generations (its timings and acceptance carry over). Returns (tokens [1, T + n], stats)."""
    if strategy.adaptive and policy is None:
        raise ValueError("an adaptive strategy (exit_layer or num_speculations auto) needs its policy "
                         "(engine.Engine makes it)")
    strategy.check_draft(separate=draft_model is not None and strategy.draft_quantize is None)
    if strategy.draft_quantize is not None and draft_model is None:
        raise ValueError("--draft_quantize drafts from its quantized copy of the model: pass it as draft_model "
                         "(engine.load_engine makes it)")
    if strategy.name == "autoregressive":
        on_token = (lambda t: on_tokens(t[0].tolist())) if on_tokens else None
        return generate(model, prompt, max_new_tokens, params, stop_ids=stop_ids, on_token=on_token, steps=steps,
                        exit_layer=strategy.exit_layer)
    return speculative_generate(model, prompt, max_new_tokens, params, strategy.num_speculations,
                                exit_layer=strategy.exit_layer, draft_model=draft_model, stop_ids=stop_ids,
                                on_tokens=on_tokens, steps=steps, policy=policy, draft_source=strategy.draft_source,
                                ngram_tokens=strategy.ngram_tokens, chooser=chooser)


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, params: SamplingParams,
             stop_ids=(), on_token=None, steps: Steps = Steps(), exit_layer: int | None = None):
    """Autoregressive generation from prompt [T] or [B, T]; with exit_layer E, early-exit inference
    (every token, prompt included, from layers [0, E) and the model's final norm and LM head).

    Returns (tokens [B, T + n], stats) with n <= max_new_tokens: it stops early once every row has
    produced one of stop_ids (that token is kept). on_token(tokens [B, 1]) is called after each step.
    """
    if prompt.dim() == 1:
        prompt = prompt[None]
    bsz, T = prompt.shape
    check_fits(model, T, max_new_tokens)
    check_exit_layer(model.args.n_layers, exit_layer)
    if bsz > model.max_batch_size:
        raise ValueError(f"batch of {bsz} exceeds the cache's max_batch_size={model.max_batch_size}")
    device = prompt.device
    stop = torch.tensor(sorted(stop_ids), dtype=prompt.dtype, device=device)
    done = torch.zeros(bsz, dtype=torch.bool, device=device)

    t0 = time.perf_counter()
    cur, finite = steps.prefill(model, prompt, torch.arange(T, device=device), params, exit_layer)
    out = [cur]
    check_finite(finite)
    t1 = time.perf_counter()
    if on_token:
        on_token(cur)
    input_pos = torch.tensor([T], device=device)
    for i in range(1, max_new_tokens):
        done |= torch.isin(cur[:, 0], stop)
        if done.all():  # the one host synchronisation per token
            break
        # Every step after the first has the same model, shapes and settings, so the compiled
        # step's guards (about 1 ms for ~300 weight tensors) need not be evaluated again.
        with torch.compiler.set_stance(skip_guard_eval_unsafe=i > 1):
            # Clone: with CUDA graphs the step's output buffer is overwritten by the next replay.
            cur = steps.decode(model, cur, input_pos, params, exit_layer).clone()
        input_pos += 1
        out.append(cur)
        if on_token:
            on_token(cur)
    synchronize(device)
    t2 = time.perf_counter()
    tokens = torch.cat([prompt] + out, dim=1)
    return tokens, GenerationStats(T, len(out), t1 - t0, t2 - t1)


class _Clock:
    """Timestamps that cost no host synchronisation: CUDA events on CUDA, wall time on CPU
    (where every op has finished when it returns)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self):
        if not self.cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def seconds(self, a, b) -> float:  # call once b has completed
        return a.elapsed_time(b) / 1000 if self.cuda else b - a


class Policy:
    """What speculative_generate asks its policy, documented once here; the defaults are a fixed
    policy's (the same E and k every round, no early stop, no probes). FixedPolicy is these
    defaults with the flags' E and k; adaptive.AdaptivePolicy chooses per round instead.

    Attributes: exit_layer, the draft source's E, checked up front and used by a draft model's
    prefill (None: all of a draft model's layers); max_k, the most drafts any round makes (the
    cache positions a round may write past what it keeps); early_stop, whether keep_drafting is
    asked after each draft."""
    exit_layer: int | None
    max_k: int
    early_stop = False

    def choose(self) -> tuple:
        """(E, k) for the round. k = 0, drafting from the model's own layers only: a plain round,
        the full model's token alone (the verify pass still taps the exits for the probes)."""
        return self.exit_layer, self.max_k

    def taps(self, exit_layer) -> tuple:
        """The model's own layers whose entering states the verify pass returns, for a probe."""
        return ()

    def keep_drafting(self, exit_layer, confidence: float, made: int) -> bool:
        """Asked after each draft when early_stop, `made` drafts so far, the last one's probability
        of its own token `confidence`: whether to draft another."""
        return True

    def bucket(self, n: int) -> int:
        """The verify pass's fixed number of drafts for a round that made n (the rest is padding)."""
        return self.max_k

    def observe_times(self, exit_layer, made, bucket, draft_s, verify_s, round_s):
        """Seconds the round's draft phase, its verify pass and the whole round took."""

    def observe(self, exit_layer, k, made, accepted, confidences):
        """The round's outcome; confidences: its drafts' when early_stop, else empty."""

    def probe_row(self, accepted) -> int | None:
        """A verified row (0 .. accepted) whose tapped states to probe this round, or None."""
        return None

    def observe_probe(self, exit_layer, taps, tokens, target):
        """A probe's greedy token from each tapped layer, and the full model's token there."""


class FixedPolicy(Policy):
    """k drafts from exit layer E every round: the flags as given."""

    def __init__(self, exit_layer: int | None, k: int):
        self.exit_layer, self.max_k = exit_layer, k


@torch.no_grad()
def speculative_generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, params: SamplingParams,
                         num_speculations: int, exit_layer: int | None = None, draft_model: Transformer | None = None,
                         stop_ids=(), on_tokens=None, steps: Steps = Steps(), policy: Policy | None = None,
                         draft_source: str = "model", ngram_tokens: int = Strategy.ngram_tokens,
                         chooser: SourceChooser | None = None):
    """Speculative decoding of prompt [T] (batch 1): each round drafts k = num_speculations tokens,
    verifies them with the full model in one pass and keeps what the acceptance rule allows, plus
    one token of the full model's own. Greedy output equals `generate`'s token for token; sampled
    output has the same distribution.

    The drafts come from layers [0, exit_layer) (all if None) and the final norm and LM head of:
    - `model` itself, without draft_model (LayerSkip self-speculation, Speculation.shared_round);
    - draft_model (Speculation.own_round): a separate model with its own KV cache, or a quantized
      copy of `model`'s own weights (quantized.quantized_copy) with its own cache or, as the
      engine sets it up, drafting into the model's (Transformer.share_caches).
    With `policy` (adaptive.AdaptivePolicy), E and k are chosen per round instead and drafting
    may stop early (Policy explains the protocol).

    draft_source "ngram": the drafts come from the text instead (ngram.NgramIndex: up to
    ngram_tokens tokens that followed the latest earlier occurrence of the newest n-gram),
    verified over every layer (Speculation.ngram_round); a round without a proposal, or whose
    proposal is not expected to pay, is a plain decode step. "auto": per round, the text's
    proposal or the model's draft round (ngram.SourceChooser decides: `chooser`, or a new one).

    A round writes at most k positions past the last token it keeps; they are never read: the next
    round overwrites them before any position after them attends (the causal mask hides them).
    No round drafts past the token budget: with r tokens still to produce, r - 1 drafts and the
    full model's token suffice; a round that drafts fewer than k pads the fixed-shape verify pass.
    on_tokens(list of ids) is called with each round's kept tokens. Returns (tokens [1, T + n], stats).
    """
    check_num_speculations(num_speculations if policy is None else policy.max_k)
    check_source_name(draft_source)
    models = draft_source != "ngram"  # some rounds draft from a model
    policy = policy or FixedPolicy(exit_layer, min(num_speculations, max_new_tokens) if models else 0)
    if models:
        check_draft_source(model, draft_model, policy.exit_layer)
    elif draft_model is not None:
        raise ValueError("draft_source ngram drafts from the text alone: no draft model")
    if prompt.dim() == 2:
        if prompt.shape[0] != 1:
            raise ValueError("speculative decoding runs one sequence at a time (batch size 1)")
        prompt = prompt[0]
    T = len(prompt)
    ngram_tokens = ngram_tokens if draft_source != "model" else 0
    lookahead = max(policy.max_k, ngram_tokens)
    for m in (model, draft_model):
        if m is not None:
            check_fits(m, T, max_new_tokens, lookahead=lookahead)
    spec = Speculation(model, draft_model, params, steps, policy, prompt.device, ngram_tokens)
    one_round = spec.shared_round if draft_model is None else spec.own_round
    text = NgramIndex(prompt.tolist()) if ngram_tokens else None
    spec.text = text.tokens if text else None
    if text and chooser is None:
        chooser = SourceChooser(policy.max_k, clocks=params.greedy)
    elif text:
        chooser.new_text()
    stop = set(stop_ids)
    stats = GenerationStats(T, 0, 0.0, 0.0, num_speculations=lookahead,
                            adaptive=not isinstance(policy, FixedPolicy))

    t0 = time.perf_counter()
    cur = spec.prefill(prompt)
    out = [int(cur)]
    t1 = time.perf_counter()
    if on_tokens:
        on_tokens(out[:])
    if text:
        text.extend(out)
    pos = T  # position of `cur`, the last kept token: no layer has processed it yet
    while len(out) < max_new_tokens and out[-1] not in stop:
        round_start, spec.guarded = time.perf_counter(), False
        behind = len(spec.pending)  # ids an own-cache draft model has not seen (a model round catches up)
        left = max_new_tokens - len(out) - 1  # n tokens to go: n - 1 drafts and the full model's token suffice
        source = "model"
        if text:  # the text's proposal, a plain step, or the model's round (auto)
            proposal, n = text.propose(min(ngram_tokens, left))
            # every padded length up to the proposal's: a shorter verify pass costs less
            options = {("ngram", K): chooser.expected(n, min(K, len(proposal)))
                       for K in lengths_to_try(spec.ngram_buckets, len(proposal))}
            options.update({("plain",): 1.0, **({("model",): None} if models else {})})
            key = chooser.choose(options, behind=behind)
            source = key[0]
        if source == "ngram":
            proposal = proposal[:key[-1]]
            r = spec.ngram_round(out[-1], pos, proposal)
            chooser.observe_ngram(n, len(proposal), r.accepted)
        elif source == "plain":
            r = spec.plain_round(cur, out[-1], pos)
        else:
            E, k = policy.choose()
            r = one_round(cur, pos, E, k, min(k, left))
            spec.observe(r, E, k, stats, round_start)
        if source != "model":
            stats.accepted_per_round.append(r.accepted)
            stats.drafted += r.drafts.made
            stats.verify_s += r.verify_s
        stats.count(source, r.drafts.made, r.accepted)
        kept = r.kept[:max_new_tokens - len(out)]
        kept = kept[:next((i + 1 for i, t in enumerate(kept) if t in stop), len(kept))]  # up to a stop token
        if text:
            if source != "ngram":  # what the text's proposal would have kept, from the round's tokens
                chooser.observe_unverified(n, proposal, kept)
            if r.pending_s:  # the draft's catch-up, timed apart from the round (SourceChooser.choose charges it)
                chooser.observe_catch_up(r.pending_s, behind)
            chooser.observe_round(key, None if spec.guarded else time.perf_counter() - round_start - r.pending_s,
                                  len(kept))
            text.extend(kept)
        out += kept
        if on_tokens:
            on_tokens(kept)
        pos += r.accepted + 1
        cur = r.nxt
    synchronize(prompt.device)
    stats.prefill_s, stats.decode_s = t1 - t0, time.perf_counter() - t1
    stats.new_tokens = len(out)
    return torch.cat([prompt, torch.tensor(out, dtype=prompt.dtype, device=prompt.device)])[None], stats


@torch.no_grad()
def compile_ngram_rounds(model: Transformer, steps: Steps, params: SamplingParams, ngram_tokens: int,
                         draft_model: Transformer | None = None):
    """Runs an n-gram round's verify pass at every padded proposal length once, at positions from
    0 (the next prefill overwrites them), so that compiled steps compile them all now rather than
    inside a generation (Engine.chooser_for, at a strategy's first use)."""
    spec = Speculation(model, draft_model, params, steps, FixedPolicy(None, 0), model.norm.weight.device,
                       ngram_tokens)
    for K in spec.ngram_buckets:
        spec.ngram_round(5, 0, [5] * K)
    if has_own_cache(model, draft_model):  # and its catch-up passes
        for T in CATCH_UP_BUCKETS:
            catch_up(draft_model, steps, [5] * T, 0, params, None)


def has_own_cache(model: Transformer, draft_model: Transformer | None) -> bool:
    """Whether draft_model (None: none) drafts with KV caches of its own, which fall behind where
    it did not draft and catch up (`catch_up`): a separate model, or a quantized copy given its own;
    not the quantized self-draft as the engine sets it up, in the model's (Transformer.share_caches),
    whose every position the verify pass writes."""
    return draft_model is not None and not draft_model.shares_caches_with(model)


def catch_up(draft_model: Transformer, steps: Steps, ids: list[int], start: int, params: SamplingParams, E):
    """Writes ids at positions start, start + 1, ... into draft_model's cache (what rounds it did
    not draft kept): fixed-shape passes of its catch-up step, each over at most the largest of
    CATCH_UP_BUCKETS positions, padded to the next bucket (one compiled graph each). The padding
    writes the positions after the ids, which the round's draft steps write again before anything
    reads them (where the cache has no room for it, the exact length runs)."""
    device = draft_model.norm.weight.device
    while ids:
        part, ids = ids[:CATCH_UP_BUCKETS[-1]], ids[CATCH_UP_BUCKETS[-1]:]
        T = next(b for b in CATCH_UP_BUCKETS if b >= len(part))
        if start + T > draft_model.max_seq_length:
            T = len(part)
        x = torch.tensor([part + part[-1:] * (T - len(part))], device=device)
        steps.catch_up(draft_model, x, torch.arange(start, start + T, device=device), params, E)
        start += len(part)


class Drafts:
    """One round's drafts, as its draft steps made them."""

    def __init__(self, cur: torch.Tensor):
        self.cur = self.last = cur  # the round's first token; the newest token, the next draft step's input
        self.tokens, self.states, self.probs, self.confidences, self.taps = [], [], [], [], []
        self.stopped = False  # drafting stopped at a draft the policy was not confident in

    @property
    def made(self) -> int:
        return len(self.tokens)

    def add(self, step):
        # cloned: with CUDA graphs the next replay overwrites a step's output buffers
        x, h, q, c, t = (v.clone() if v is not None else None for v in step)
        self.last = x
        self.tokens.append(x)
        self.states.append(h[:, -1:])
        self.probs.append(q)
        self.confidences.append(c)
        self.taps.append(t)


@dataclass
class Round:
    """What a round hands the loop, read to the host in the round's one synchronisation."""
    drafts: Drafts
    bucket: int  # the verify pass's fixed number of drafts (those made, padded)
    accepted: int
    kept: list  # the accepted drafts and the full model's token after them
    nxt: torch.Tensor  # that token [1, 1] on the device: the next round's first
    draft_s: float
    verify_s: float
    taps: tuple = ()  # the layers the verify pass tapped for a probe
    verified_taps: tuple | None = None
    caught_up: bool = False  # own-cache draft: the first draft step also took the last round's last draft
    first: int | None = None  # the round's first token's id, where the round knows it on the host
    pending_s: float = 0.0  # own-cache draft: seconds of catching up on what rounds without it kept


class Speculation:
    """What the rounds of one speculative generation share: the models, steps, policy, the tensors
    every round reuses, and which compiled steps have run. shared_round and own_round run one round
    each (draft, verify, accept); observe records it."""

    def __init__(self, model: Transformer, draft_model: Transformer | None, params: SamplingParams, steps: Steps,
                 policy: Policy, device: torch.device, ngram_tokens: int = 0):
        self.model, self.draft_model, self.params, self.steps, self.policy = model, draft_model, params, steps, policy
        self.shared = draft_model is None  # one KV cache: the verify pass resumes the drafts at layer E
        self.own_cache = has_own_cache(model, draft_model)
        self.device, self.clock = device, _Clock(device)
        most = max(policy.max_k, ngram_tokens)
        self.offsets = torch.arange(most + 1, device=device)
        self.rows = torch.arange(most + 1, device=device)  # rows[n]: the verify pass's `last` for n drafts
        self.ngram_buckets = buckets_up_to(ngram_tokens) if ngram_tokens else ()
        self.zero_state = torch.zeros(1, 1, model.args.dim, device=device, dtype=model.norm.weight.dtype)
        # early stop reads a confidence one draft step late on CUDA, not waiting for the GPU
        self.lag = 1 if device.type == "cuda" else 0
        self.seen = set()
        # whether the round running evaluated a step's guards (its first call in this generation):
        # its time goes to neither the chooser nor the policy, which outlive the generation (as
        # batching.Batch does for a shape's first round)
        self.guarded = False
        self.behind = None  # own-cache draft: the last round's last draft, which the draft model has not seen
        self.behind_id = None  # and its id
        self.pending = []  # own-cache draft: the ids before the round's first token it has not seen (n-gram rounds)
        self.text = None  # with n-gram drafts, the text's ids by position (speculative_generate's NgramIndex.tokens)
        self.draft_step_s = 0.0  # own-cache draft: seconds of a one-row draft step, a moving average

    def stance(self, *graph):
        """Every call of a compiled step after its first in this generation has the same model,
        shapes and settings, so its guards (about 1 ms for ~300 weight tensors) need not be
        evaluated again; the first call evaluates them (and compiles, if the graph is new)."""
        skip = graph in self.seen
        self.seen.add(graph)
        self.guarded = self.guarded or not skip  # the round's time is not a steady round's
        return torch.compiler.set_stance(skip_guard_eval_unsafe=skip)

    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """The prompt [T] into the model's cache (and the draft model's); the first token [1, 1]."""
        positions = torch.arange(len(prompt), device=self.device)
        cur, finite = self.steps.prefill(self.model, prompt[None], positions, self.params)
        check_finite(finite)
        if self.own_cache:
            E = self.policy.exit_layer
            check_finite(self.steps.prefill(self.draft_model, prompt[None], positions, self.params, E)[1])
            if len(prompt) >= 2 and self.steps.catch_up is not catch_up_draft_step:
                # compiles the catch-up graph now rather than at the first fully accepted round, inside
                # the timed loop; it rewrites the prompt's last two draft-cache positions with themselves
                self.steps.catch_up(self.draft_model, prompt[-2:].view(1, 2), positions[-2:], self.params, E)
        return cur

    def shared_round(self, cur, pos: int, E: int, k: int, want: int) -> Round:
        """LayerSkip self-speculation: layers [0, E) of the model draft into the one KV cache, and
        the verify pass resumes the drafted positions at layer E (only the newest token, which no
        layer has seen, runs layers [0, E) there). k = 0 is a plain round: no drafts, the verify
        pass a decode step that still taps the candidate exits for the probes."""
        taps = self.policy.taps(E)
        below = tuple(c for c in taps if c < E)
        start, base = self.clock.now(), torch.tensor(pos, device=self.device)
        return self.verify(self.draft(self.model, cur, base, E, want, below), start, base, E, k, taps)

    def own_round(self, cur, pos: int, E: int | None, k: int, want: int) -> Round:
        """A draft model (a separate model, or the quantized self-draft) drafts from its layers
        [0, E) (all if None); the verify pass runs every layer of the model.
        After a round that kept every draft a draft model with its own cache has not seen the last
        one, so the next round's first draft step takes it too (catch-up). One that drafts into the
        model's cache (the quantized self-draft) never falls behind: the verify pass wrote it all."""
        if not self.own_cache:
            start, base = self.clock.now(), torch.tensor(pos, device=self.device)
            return self.verify(self.draft(self.draft_model, cur, base, E, want), start, base, E, k)
        caught, merged = 0.0, None
        if self.pending and want:
            merged = self.merged_catch_up(pos, E)
            if merged is None:
                t = time.perf_counter()
                self.catch_up_pending(pos, E)
                caught = time.perf_counter() - t
            self.pending = []
        start, base = self.clock.now(), torch.tensor(pos, device=self.device)
        behind, self.behind = self.behind, None
        first = merged or (None if behind is None else (lambda x: self.catch_up(behind, x, base, E)))
        r = self.verify(self.draft(self.draft_model, cur, base, E, want, first=first), start, base, E, k)
        if merged:  # the catch-up's share of the round: its first draft step beyond a one-row step's time
            caught = max(merged.seconds - self.draft_step_s, 0.0)
        elif r.drafts.made and behind is None and r.draft_s:
            per = r.draft_s / r.drafts.made
            self.draft_step_s = per if not self.draft_step_s else 0.9 * self.draft_step_s + 0.1 * per
        r.caught_up, r.pending_s = behind is not None and r.drafts.made > 0, caught
        if r.drafts.made and r.accepted == r.drafts.made:
            # the last draft itself, strides (1, 1) as the draft step's usual input (tokens[:, -1:]
            # has (k + 1, 1): a guard failure, i.e. a recompile)
            self.behind, self.behind_id = r.drafts.tokens[-1], r.kept[-2]
        elif not r.drafts.made:  # a plain round: the draft model has not seen its first token
            r.first, self.behind = int(cur), behind  # nor, if no draft step took it, the last round's last draft
            self.fall_behind(r)
        return r

    def fall_behind(self, r: "Round"):
        """After a round the draft model did not draft (n-gram, plain): the ids it has not seen,
        the last round's last draft first if it had not seen that either (`behind`)."""
        if self.own_cache:
            self.pending += ([self.behind_id] if self.behind is not None else []) + [r.first] + r.kept[:r.accepted]
            self.behind = None

    def merged_catch_up(self, pos: int, E):
        """The round's first draft step as the draft model's catch-up too: one pass over the
        positions it has not seen and the round's first token, padded in front to a catch-up
        length (CATCH_UP_BUCKETS) with the positions just before them, which it rewrites with
        the same ids (as prefill does), so no padding lands after the token the draft is taken
        from. One pass instead of a catch-up pass and a draft step: a switch from n-gram rounds
        back to model rounds cost the int8 self-draft 13-15 ms more than a draft step, this 3-6.
        Returns the first-step callable (its `seconds` set once it runs), or None where the text
        is not known here, the catch-up is longer than a pass or the cache starts too near."""
        n = len(self.pending) + 1
        T = next((b for b in CATCH_UP_BUCKETS if b >= n), None)
        if self.text is None or T is None or pos - T + 1 < 0 or len(self.text) <= pos:
            return None
        ids = torch.tensor([self.text[pos - T + 1:pos]], device=self.device)  # the padding, then the pending ids
        positions = torch.arange(pos - T + 1, pos + 1, device=self.device)

        def first(x):
            t = time.perf_counter()
            with self.stance("catch_up", E, T):
                step = self.steps.catch_up(self.draft_model, torch.cat([ids, x], dim=1), positions, self.params, E)
            first.seconds = time.perf_counter() - t
            return step
        first.seconds = 0.0
        return first

    def catch_up_pending(self, pos: int, E):
        """The draft model's cache gets the positions before `pos` that rounds it did not draft
        skipped (`catch_up`); own_round then clears them, as it does after a merged catch-up."""
        # guards evaluated (no stance): one call may run several shapes, and it is rare
        catch_up(self.draft_model, self.steps, self.pending, pos - len(self.pending), self.params, E)

    def ngram_round(self, last: int, pos: int, proposal: list[int]) -> "Round":
        """Drafts from the text (ngram.NgramIndex): no model call. The verify pass runs every layer
        over [last, proposal] (padded), as a draft model's does, so every layer's cache holds the
        kept positions whatever drafts the next round. Sampling, a proposal is a draft distribution
        that puts all its mass on the proposed token (one-hot): speculative_accept keeps it with
        the full model's probability of it, so the output keeps the model's distribution."""
        start, base = self.clock.now(), torch.tensor(pos, device=self.device)
        m = len(proposal)
        b = lengths_to_try(self.ngram_buckets, m)[-1]  # the verify pass's fixed number of drafts
        tokens = torch.tensor([[last] + proposal + proposal[-1:] * (b - m)], device=self.device)
        draft_probs = None if self.params.greedy else torch.zeros(b, self.model.args.vocab_size, device=self.device) \
            .scatter_(1, tokens[0, 1:, None], 1.0)
        d = Drafts(tokens[:, :1])
        d.tokens = [None] * m  # made: m (their values are in `tokens`)
        mid = self.clock.now()
        last_row = self.rows[m]
        with self.stance("verify", None, b):
            n, nxt, _ = self.steps.verify(self.model, tokens, None, draft_probs, base + self.offsets[:b + 1],
                                          last_row, self.params, None, (), last_row)
        end = self.clock.now()
        [(a, kept)] = read_round(tokens, nxt, n)
        r = Round(d, b, a, kept, nxt.view(1, 1).clone(), self.clock.seconds(start, mid),
                  self.clock.seconds(mid, end), first=last)
        self.fall_behind(r)
        return r

    def plain_round(self, cur, last: int, pos: int) -> "Round":
        """A decode step of the full model (with n-gram drafts, when neither the text's proposal
        nor the model's drafts are expected to pay); `last`: cur's id."""
        start = self.clock.now()
        with self.stance("decode"):
            nxt = self.steps.decode(self.model, cur, torch.tensor([pos], device=self.device), self.params).clone()
        end = self.clock.now()
        kept = nxt[0].tolist()  # the round's one host synchronisation
        r = Round(Drafts(cur), 0, 0, kept, nxt, 0.0, self.clock.seconds(start, end), first=last)
        self.fall_behind(r)
        return r

    def catch_up(self, behind, x, base, E):
        """The draft step over [behind, x] at positions [base - 1, base]: one pass for both."""
        with self.stance("catch_up", E):
            return self.steps.catch_up(self.draft_model, torch.cat([behind, x], dim=1), base - 1 + self.offsets[:2],
                                       self.params, E)

    def draft(self, drafter: Transformer, cur, base, E, want: int, below=(), first=None) -> Drafts:
        """Up to `want` drafts from drafter's layers [0, E) at positions base, base + 1, ... (the
        first by `first`, if given), stopping early at a draft the policy is not confident in."""
        d = Drafts(cur)
        for j in range(want):
            if j == 0 and first is not None:
                step = first(d.last)
            else:
                with self.stance("draft", E):
                    step = self.steps.draft(drafter, d.last, (base + j).view(1), self.params, E, below)
            d.add(step)
            i = j - self.lag
            if self.policy.early_stop and i >= 0 and j + 1 < want and \
                    not self.policy.keep_drafting(E, float(d.confidences[i]), j + 1):
                d.stopped = True
                break
        return d

    def verify(self, d: Drafts, start, base, E, k: int, taps=()) -> Round:
        """The full model's verify pass over the round's first token and its drafts, padded to the
        policy's bucket (k = 0: the first token alone), then the round's one host synchronisation.
        The padded rows are computed, never kept (`last` limits the acceptance)."""
        b = self.policy.bucket(d.made) if k else 0
        pad = b - d.made
        tokens = torch.cat([d.cur] + d.tokens + [d.last] * pad, dim=1)
        exit_states = torch.cat(d.states + [self.zero_state] * (pad + 1), dim=1) if self.shared else None
        if self.params.greedy:
            draft_probs = None
        elif d.made:
            draft_probs = torch.stack(d.probs + [d.probs[-1]] * pad)
        else:  # no draft counts (limit 0); the rows only hold the shape
            draft_probs = torch.zeros(b, self.model.args.vocab_size, device=self.device)
        mid = self.clock.now()
        last = self.rows[d.made]  # one tensor for both: the compiled graph guards on whether they alias
        with self.stance("verify", E, b):
            n, nxt, verified_taps = self.steps.verify(self.model, tokens, exit_states, draft_probs,
                                                      base + self.offsets[:b + 1], last, self.params,
                                                      E if self.shared else None, taps, last)
        end = self.clock.now()
        [(a, kept)] = read_round(tokens, nxt, n)
        return Round(d, b, a, kept, nxt.view(1, 1).clone(), self.clock.seconds(start, mid),
                     self.clock.seconds(mid, end), taps, verified_taps)

    def observe(self, r: Round, E, k: int, stats: GenerationStats, round_start: float):
        """The round into the stats and the policy: its timings, its acceptance, now and then a probe."""
        d, a, policy = r.drafts, r.accepted, self.policy
        stats.accepted_per_round.append(a)
        stats.drafted += d.made
        stats.draft_s += r.draft_s
        stats.verify_s += r.verify_s
        stats.catch_ups += r.caught_up
        stats.early_stops += d.stopped
        stats.trace.append((E, k, d.made))
        if not self.guarded:
            policy.observe_times(E, d.made, r.bucket, r.draft_s, r.verify_s, time.perf_counter() - round_start)
        policy.observe(E, k, d.made, a, torch.stack(d.confidences).tolist() if policy.early_stop and d.made else [])
        row = policy.probe_row(a) if r.taps else None
        if row is not None:  # the full model's token after row `row` is kept[row] (row <= a)
            policy.observe_probe(E, r.taps, probe(self.steps, self.model, r.taps, E, row, d.taps, r.verified_taps),
                                 r.kept[row])


def read_round(tokens: torch.Tensor, nxt: torch.Tensor, n: torch.Tensor) -> list[tuple[int, list[int]]]:
    """A verify pass's verdict on the host, in one synchronisation, per row of tokens [B, 1 + k]
    (the last kept token, then the drafts): (accepted a, kept tokens: the first a drafts and the
    full model's token nxt after them [B] or [B, 1]); n: a per row [B], or 0-dim for one row."""
    host = torch.cat([tokens[:, 1:], nxt.view(-1, 1), n.view(-1, 1)], 1).tolist()
    return [(row[-1], row[:row[-1]] + [row[-2]]) for row in host]


def probe(steps: Steps, model: Transformer, taps, exit_layer: int, row: int, draft_taps, verified_taps) -> list:
    """The head's greedy token from each tapped layer at verified row `row` (its context is the
    full model's own tokens: row <= accepted): layers below E from the draft step of that row (or,
    for the newest token, the verify pass), the rest from the verify pass."""
    low, high = verified_taps
    states = []
    if low is not None:
        states.append(draft_taps[row][:, 0, -1] if row < len(draft_taps) else low[:, 0, -1])
    if high is not None:
        states.append(high[:, 0, row])
    return steps.probe(model, torch.cat(states)[None]).tolist()


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB

