"""Decoding loops over the model's API: autoregressive (optionally early-exit), self-speculative
(LayerSkip) and two-model speculative. Each loop is a short function over a few step functions,
which `compile_steps` turns into fixed-shape graphs."""
import functools
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from model import Transformer, layer_graph, run_blocks
from sampling import SamplingParams, logits_to_probs, sample, sample_from_probs, speculative_accept


def prefill(model: Transformer, x, input_pos, params: SamplingParams, exit_layer: int | None = None):
    """Runs the prompt x [B, T] at positions input_pos [T] through layers [0, exit_layer) (all by
    default); returns the first new token [B, 1] and whether the logits it came from were finite."""
    h = model.run_layers(model.embed(x), input_pos, 0, exit_layer)
    logits = model.head(h[:, -1:])[:, -1]
    return sample(logits, params), torch.isfinite(logits).all()


class NonFiniteLogitsError(ValueError):
    pass


def check_finite(finite: torch.Tensor):
    """Once per generation, at the prefill (whose result is waited for anyway): NaN or inf logits
    would otherwise decode silently into garbage, typically one token repeated."""
    if not bool(finite):
        raise NonFiniteLogitsError(
            "the model's logits for the prompt are not finite (NaN or inf): the checkpoint's weights may hold "
            "NaN/inf (a corrupt file or a diverged training run), or float16 overflowed (try --dtype bfloat16 "
            "or float32)")


def decode_one_token(model: Transformer, x, input_pos, params: SamplingParams, exit_layer: int | None = None):
    """One step: token x [B, 1] at position input_pos [1] -> next token [B, 1]. With exit_layer E
    this is early-exit inference: layers [0, E), then the model's own final norm and LM head."""
    h = model.run_layers(model.embed(x), input_pos, 0, exit_layer)
    return sample(model.head(h)[:, -1], params)


def run_tapped(model: Transformer, h, input_pos, start: int, end: int, taps=()):
    """run_layers over [start, end), also returning the hidden state entering each layer c of taps
    (start <= c < end), i.e. what an exit at c would feed the head: [len(taps), B, T, dim], or None."""
    states = []
    for c in taps:
        h = model.run_layers(h, input_pos, start, c)
        states.append(h)
        start = c
    return model.run_layers(h, input_pos, start, end), (torch.stack(states) if states else None)


def draft_step(model: Transformer, x, input_pos, params: SamplingParams, exit_layer: int | None = None, taps=()):
    """One draft token: like decode_one_token, but also returns the layer-`exit_layer` hidden state
    [1, T, dim] (for the verify pass to resume from), when sampling the draft distribution [V]
    (else None), the draft's probability of its token (its confidence, 0-dim) and the states
    entering the layers in taps (run_tapped)."""
    h, tapped = run_tapped(model, model.embed(x), input_pos, 0, exit_layer or model.args.n_layers, taps)
    logits = model.head(h)[0, -1]
    if params.greedy:
        token = logits.argmax(-1, keepdim=True)
        return token[None], h, None, (logits.max() - logits.logsumexp(-1)).exp(), tapped
    probs = logits_to_probs(logits, params)
    token = sample_from_probs(probs)
    return token[None], h, probs, probs[token[0]], tapped


def catch_up_draft_step(model: Transformer, x, input_pos, params: SamplingParams, exit_layer: int | None = None):
    """draft_step over x [1, 2]: the previous round's last draft, which a draft model with its own
    cache has not seen when every draft was accepted, and the round's first token. One pass for
    both: the CPU kernels read each weight once for the two rows. Its own function, so that it
    compiles to its own graph (a second shape of draft_step would be a recompile)."""
    return draft_step(model, x, input_pos, params, exit_layer)


def verify_step(model: Transformer, tokens, exit_states, draft_probs, input_pos, limit, params: SamplingParams,
                exit_layer: int | None = None, taps=(), last=None):
    """Scores tokens [1, k+1] = [last accepted, d1..dk] at input_pos [k+1] with the full model and
    decides how many drafts to keep, at most `limit` (a 0-dim tensor: a round that drafted fewer
    than k, near the end of the token budget or stopped early, pads the rest). Returns
    (n_accepted, next token, taps), all on the device.

    Self-speculative (exit_layer E): the drafted positions already went through layers [0, E), so
    they resume from their layer-E states exit_states [1, k+1, dim]; only the newest token, at row
    `last` (a 0-dim tensor, default k), which no layer has seen, runs layers [0, E) here and takes
    that row. Rows after it are padding: computed, written to cache positions no kept token reads
    before they are written again, never kept. k may be 0 (a plain decode step that also taps).
    Two-model (exit_layer None): all k+1 run every layer. taps (self-speculative only): the layers
    whose entering states to return (run_tapped), those < E for the newest token [n, 1, 1, dim]
    and those >= E for every row [n, 1, k+1, dim], for the adaptive policy's acceptance probes.
    """
    if exit_layer is None:
        return *speculative_accept(tokens[0, 1:], draft_probs, model(tokens, input_pos)[0], params, limit), None
    k = tokens.shape[1] - 1
    last = torch.tensor([k], device=tokens.device) if last is None else last.view(1)
    below, above = tuple(c for c in taps if c < exit_layer), tuple(c for c in taps if c >= exit_layer)
    newest, low = run_tapped(model, model.embed(tokens.index_select(1, last)), input_pos.index_select(0, last), 0,
                             exit_layer, below)
    h, high = run_tapped(model, exit_states.index_copy(1, last, newest), input_pos, exit_layer, model.args.n_layers,
                         above)
    n, nxt = speculative_accept(tokens[0, 1:], draft_probs, model.head(h)[0], params, limit)
    return n, nxt, ((low, high) if taps else None)


def batch_draft_step(model: Transformer, x, input_pos, params: SamplingParams, exit_layer: int | None):
    """One draft token for each of B sequences: x [B, T] at their own positions input_pos [B, T]
    through layers [0, exit_layer) (all if None) and the head; the token follows x's last column
    (T = 2: a draft model's catch-up, batching.Batch). Returns (tokens [B, 1], layer-E states
    [B, T, dim], the draft distributions [B, V] when sampling, else None)."""
    h = model.run_layers(model.embed(x), input_pos, 0, exit_layer)
    logits = model.head(h[:, -1:])[:, -1]
    if params.greedy:
        return logits.argmax(-1, keepdim=True), h, None
    probs = logits_to_probs(logits, params)
    return sample_from_probs(probs), h, probs


def batch_verify_step(model: Transformer, tokens, exit_states, draft_probs, input_pos, limit,
                      params: SamplingParams, exit_layer: int | None):
    """verify_step for B sequences at once, each at its own positions: tokens [B, k+1] = [last
    kept, d1..dk], draft_probs [B, k, V] or None (greedy), input_pos [B, k+1], limit [B] (drafts
    that count per row). Self-speculative (exit_layer E): exit_states [B, k, dim] are the drafted
    positions' layer-E states, and only the newest token runs layers [0, E) here; with a draft
    model (exit_layer None) all k+1 run every layer. Returns (n_accepted [B], next token [B, 1]),
    on the device."""
    if exit_layer is None:
        logits = model(tokens, input_pos)
    else:
        # contiguous: the same graph as the draft steps' (a strided position view would be another)
        newest = model.run_layers(model.embed(tokens[:, -1:]), input_pos[:, -1:].contiguous(), 0, exit_layer)
        h = model.run_layers(torch.cat([exit_states, newest], 1), input_pos, exit_layer, model.args.n_layers)
        logits = model.head(h)
    drafts = tokens[:, 1:]
    if params.greedy:
        target = logits.argmax(-1)
        n = torch.minimum(torch.cumprod(drafts == target[:, :-1], 1).sum(1), limit)
        return n, target.gather(1, n[:, None])
    rows = [speculative_accept(drafts[b], draft_probs[b], logits[b], params, limit[b]) for b in range(len(tokens))]
    return torch.stack([n for n, _ in rows]), torch.stack([t for _, t in rows])


def probe_step(model: Transformer, states):
    """The head's greedy token for each of states [1, n, dim] (hidden states entering n candidate
    exit layers at one position): [n]."""
    return model.head(states)[0].argmax(-1)


@dataclass(frozen=True)
class Steps:
    """The functions a loop calls: plain or compiled."""
    prefill: object = prefill
    decode: object = decode_one_token
    draft: object = draft_step
    catch_up: object = catch_up_draft_step
    verify: object = verify_step
    probe: object = probe_step
    batch_draft: object = batch_draft_step  # batched self-speculation (batching.py)
    batch_verify: object = batch_verify_step


def configure_inductor(device: torch.device):
    """Inductor settings that measured fastest for our decode step (see BENCHMARKS.md)."""
    import torch._dynamo.config
    import torch._inductor.config as cfg
    # Each (model, exit layer, number of speculations) is its own graph of the same Python
    # function; a sweep over them must not fall back to eager after dynamo's default of 8.
    torch._dynamo.config.recompile_limit = 256
    if device.type == "cuda":
        cfg.coordinate_descent_tuning = True
        cfg.triton.unique_kernel_names = True
    cfg.fx_graph_cache = True


# Regional compilation (compile_steps' layers_per_graph): on CPU, runs of this many layers share
# one compiled graph; 0 compiles every step whole. Measured in BENCHMARKS.md ("Compile time").
DEFAULT_LAYERS_PER_GRAPH = {"cpu": 6, "cuda": 0}


def compile_steps(device: torch.device, compile_prefill: bool = False, layers_per_graph: int | None = None) -> Steps:
    """The decode step, the draft step and the verify pass, fixed-shape (CUDA graphs on CUDA).

    layers_per_graph N > 0 (regional compilation, the CPU default): the layers run N at a time
    through one compiled graph whose inputs are the weights, so every run of N layers with the same
    shapes reuses it, whatever the model's depth, exit layer or step; the little around the layers
    (embedding, head, sampling, acceptance) runs eagerly. 0: each step is one whole graph, compiled
    once per (exit layer, number of speculations) on first use (the CUDA default: one CUDA graph
    per step). The prefill, if asked, is one whole graph with dynamic shapes."""
    configure_inductor(device)
    size = DEFAULT_LAYERS_PER_GRAPH.get(device.type, 0) if layers_per_graph is None else layers_per_graph
    if size < 0:
        raise ValueError(f"layers_per_graph must be >= 0, got {size}")
    pre = torch.compile(prefill, fullgraph=True, dynamic=True) if compile_prefill else prefill
    if size:
        graph = layer_graph(CompiledBlocks(), size)
        return Steps(prefill=pre, decode=regional(decode_one_token, graph), draft=regional(draft_step, graph),
                     catch_up=regional(catch_up_draft_step, graph), verify=regional(verify_step, graph),
                     probe=regional(probe_step, graph), batch_draft=regional(batch_draft_step, graph),
                     batch_verify=regional(batch_verify_step, graph))
    if device.type == "cuda":
        fixed = lambda fn: torch.compile(fn, mode="reduce-overhead", fullgraph=True, dynamic=False)  # noqa: E731
    else:
        # A C++ wrapper calls the graph's kernels (~120 int8/int4 kernels, ~200 fused loops per
        # SmolLM2 step) without a Python call each: 1.6 ms of a 15.4 ms int8 step (BENCHMARKS.md).
        fixed = lambda fn: torch.compile(fn, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})  # noqa: E731
    return Steps(prefill=pre, decode=fixed(decode_one_token), draft=fixed(draft_step),
                 catch_up=fixed(catch_up_draft_step), verify=fixed(verify_step), probe=fixed(probe_step),
                 batch_draft=fixed(batch_draft_step), batch_verify=fixed(batch_verify_step))


def regional(fn, graph: layer_graph):
    """fn with its model's layers running through the regionally compiled graph."""
    @functools.wraps(fn)
    def step(*args, **kwargs):
        with graph:
            return fn(*args, **kwargs)
    step.layer_graph = graph
    return step


class CompiledBlocks:
    """model.run_blocks compiled (one graph per number of layers, rows and model shape), saying on
    stderr when it meets a new kind of call and how long that took: compiling, or loading from
    inductor's caches.

    Calls the loops make with guard evaluation skipped (every call of a step after its first in a
    generation) go straight to inductor's compiled graph with the inputs gathered as dynamo gathered
    them on that run's guarded first call: dynamo's own entry costs ~60 us a call even with guards
    skipped, 5 calls a SmolLM2 step (BENCHMARKS.md, "Compile time"). A guarded call checks that the
    gathered inputs and the output are the very tensors dynamo used; if not, dynamo's path stays."""

    def __init__(self):
        self.seen, self.direct, self.ran = set(), {}, None
        self.direct_calls = 0
        self.fn = torch.compile(run_blocks, backend=self.compile, fullgraph=True, dynamic=False)

    def compile(self, gm, example_inputs):
        """dynamo's backend: inductor (without size asserts in the graph's Python wrapper, ~100 checks
        a call of 6 layers of what the guarded first calls check already), recording each run."""
        from torch._inductor.compile_fx import compile_fx
        fn = compile_fx(gm, example_inputs, config_patches={"size_asserts": False})
        gather = input_gatherer(gm)

        def run(*args):
            out = fn(*args)
            self.ran = (gather, fn, args, out)
            return out
        return run

    def __call__(self, layers, h, cos, sin, mask, input_pos):
        # strides too: a graph compiled for a strided view must not take a contiguous tensor (or back)
        key = (id(layers[0]), len(layers), h.shape, h.stride(), h.dtype, input_pos.shape, input_pos.stride(),
               torch.is_grad_enabled())
        if skipping_guards() and key in self.direct:
            gather, fn = self.direct[key]
            self.direct_calls += 1
            return fn(*gather(layers, h, cos, sin, mask, input_pos))[0]
        self.direct.pop(key, None)
        self.ran = None
        wqkv = layers[0].attention.wqkv
        kind = (len(layers), h.shape, h.dtype, type(wqkv), wqkv.weight.shape)
        if kind in self.seen:
            out = self.fn(layers, h, cos, sin, mask, input_pos)
        else:
            self.seen.add(kind)
            batch = f"{h.shape[0]} sequences x " if h.shape[0] > 1 else ""
            with compile_progress(f"{len(layers)} layers x {batch}{h.shape[1]} row{'s' if h.shape[1] > 1 else ''} "
                                  f"({type(wqkv).__name__}, width {h.shape[-1]})"):
                out = self.fn(layers, h, cos, sin, mask, input_pos)
        ran, self.ran = self.ran, None
        if ran is not None and ran[0] is not None:
            gather, fn, args, result = ran
            try:
                mine = gather(layers, h, cos, sin, mask, input_pos)
            except (AttributeError, KeyError, IndexError, TypeError):
                mine = ()
            if (len(mine) == len(args) and all(a is b for a, b in zip(mine, args))
                    and len(result) == 1 and result[0] is out):
                self.direct[key] = (gather, fn)
        return out


def skipping_guards() -> bool:
    """Whether torch.compiler.set_stance(skip_guard_eval_unsafe=True) is in force."""
    from torch._dynamo import eval_frame
    check = getattr(eval_frame, "_is_skip_guard_eval_unsafe_stance", None)
    return bool(check and check())


def input_gatherer(gm):
    """A function of run_blocks' arguments that returns the graph's inputs in order, built from the
    sources dynamo recorded for them (e.g. L['layers'][0]._modules['attention']...), or None."""
    names = []
    for node in gm.graph.find_nodes(op="placeholder"):
        source = getattr(node.meta.get("grapharg"), "source", None)
        name = getattr(source, "name", None)
        name = name() if callable(name) else name
        if not isinstance(name, str) or not name.startswith("L["):
            return None
        names.append(name)
    code = ("def gather(layers, h, cos, sin, mask, input_pos):\n"
            "    L = dict(layers=layers, h=h, cos=cos, sin=sin, mask=mask, input_pos=input_pos)\n"
            f"    return ({''.join(n + ', ' for n in names)})\n")
    namespace = {}
    try:
        exec(compile(code, "<regional graph inputs>", "exec"), namespace)
        return namespace["gather"]
    except SyntaxError:  # a source dynamo spells in a way we do not read
        return None


class compile_progress:
    """Says on stderr which graph is being prepared, then how long it took and whether inductor
    compiled it or found it in its caches."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        from torch._dynamo.utils import counters
        self.hits, self.t0 = counters["inductor"]["fxgraph_cache_hit"], time.perf_counter()
        print(f"compiling the graph of {self.what} ...", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        from torch._dynamo.utils import counters
        if exc[0] is None:
            how = "from the cache" if counters["inductor"]["fxgraph_cache_hit"] > self.hits else "compiled"
            print(f"  ... {how} in {time.perf_counter() - self.t0:.1f} s", file=sys.stderr, flush=True)


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced after the prefill's, per second of decoding."""
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 else float("nan")

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
        counts = Counter((E, k) for E, k, _ in self.trace)
        names = {(E, k): "plain" if k == 0 else f"E={E or 'all'} k={k}" for E, k in counts}
        return ", ".join(f"{names[c]} {n / len(self.trace):.0%}" for c, n in counts.most_common())

    @property
    def draft_share(self) -> float:
        """Draft time / (draft + verify) time."""
        busy = self.draft_s + self.verify_s
        return self.draft_s / busy if busy else float("nan")


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


MAX_SPECULATIONS = 64


def check_num_speculations(k: int):
    # Every round verifies k + 1 positions and keeps k drafts only if all of them are accepted:
    # far beyond what any draft achieves, a larger k only makes each round slower.
    if not 1 <= k <= MAX_SPECULATIONS:
        raise ValueError(f"num_speculations must be in [1, {MAX_SPECULATIONS}], got {k}")


def check_exit_layer(model: Transformer, exit_layer: int | None, last: bool = False):
    """last: E may be every layer (a draft model's own layers), else E < n (layers must remain)."""
    n = model.args.n_layers
    top = n if last else n - 1
    if exit_layer is not None and not 1 <= exit_layer <= top:
        raise ValueError(f"exit_layer must be in [1, {top}] for this {n}-layer {'draft ' if last else ''}model, "
                         f"got {exit_layer}")


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

    def __post_init__(self):
        if self.name not in STRATEGIES:
            raise ValueError(f"unknown generation strategy {self.name!r}; choose from {', '.join(STRATEGIES)}")
        if self.exit_layer is not None and self.exit_layer < 1:
            raise ValueError(f"exit_layer must be >= 1, got {self.exit_layer}")
        if self.draft_quantize is not None and self.name != "self_speculative":
            raise ValueError("draft_quantize applies to generation strategy self_speculative only")
        if (self.auto_exit or self.auto_k) and self.name == "autoregressive":
            raise ValueError("exit_layer auto and num_speculations auto apply to the speculative strategies")
        if self.auto_exit and self.name != "self_speculative":
            raise ValueError("exit_layer auto applies to generation strategy self_speculative (a separate draft "
                             "model drafts with all its layers)")
        if self.auto_exit and self.exit_layer is not None:
            raise ValueError("exit_layer is either a number or auto")
        if self.name == "self_speculative" and self.exit_layer is None and self.draft_quantize is None \
                and not self.auto_exit:
            raise ValueError("generation strategy self_speculative needs exit_layer (or draft_quantize)")
        if self.name == "speculative" and self.exit_layer is not None:
            raise ValueError("exit_layer does not apply to generation strategy speculative (the draft model drafts)")
        check_num_speculations(self.num_speculations)

    @property
    def needs_draft_model(self) -> bool:
        """Drafts come from another model (a separate checkpoint, or the quantized self-copy)."""
        return self.name == "speculative" or self.draft_quantize is not None

    @property
    def adaptive(self) -> bool:
        return self.auto_exit or self.auto_k

    @property
    def batchable(self) -> bool:
        """Runs many sequences at once (batching.Batch): every strategy with a fixed exit layer and
        k; auto (the adaptive policy) runs one sequence at a time so far."""
        return not self.adaptive

    def lookahead(self, max_new_tokens: int) -> int:
        """Cache positions a round may write beyond the tokens it keeps (k; capped at max_new_tokens
        for a fixed k, whose verify pass then shrinks; an adaptive one keeps its compiled shapes)."""
        if self.name == "autoregressive":
            return 0
        return self.num_speculations if self.auto_k else min(self.num_speculations, max_new_tokens)

    def describe(self) -> str:
        if self.name == "autoregressive":
            return "autoregressive" + (f" (exit layer {self.exit_layer})" if self.exit_layer else "")
        draft = f" {self.draft_quantize} draft" if self.draft_quantize else ""
        exit_layer = f" E={self.exit_layer}" if self.exit_layer else (" E=auto" if self.auto_exit else
                                                                     " E=all" if draft else "")
        k = f"auto (<= {self.num_speculations})" if self.auto_k else self.num_speculations
        return f"{self.name}{draft}{exit_layer} k={k}"


def run(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, params: SamplingParams,
        strategy: Strategy = Strategy(), draft_model: Transformer | None = None, stop_ids=(), on_tokens=None,
        steps: Steps = Steps(), policy=None):
    """Runs prompt [T] through the chosen strategy; on_tokens(list of ids) streams the output.
    policy: an adaptive strategy's adaptive.AdaptivePolicy. Returns (tokens [1, T + n], stats)."""
    if strategy.adaptive and policy is None:
        raise ValueError("an adaptive strategy (exit_layer or num_speculations auto) needs its policy "
                         "(engine.Engine makes it)")
    if strategy.needs_draft_model != (draft_model is not None):
        raise ValueError("a draft model is given exactly for generation strategy speculative and for "
                         "self_speculative with draft_quantize")
    if strategy.name == "autoregressive":
        on_token = (lambda t: on_tokens(t[0].tolist())) if on_tokens else None
        return generate(model, prompt, max_new_tokens, params, stop_ids=stop_ids, on_token=on_token, steps=steps,
                        exit_layer=strategy.exit_layer)
    return speculative_generate(model, prompt, max_new_tokens, params, strategy.num_speculations,
                                exit_layer=strategy.exit_layer, draft_model=draft_model, stop_ids=stop_ids,
                                on_tokens=on_tokens, steps=steps, policy=policy)


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
    check_exit_layer(model, exit_layer)
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


class FixedPolicy:
    """k drafts from exit layer E every round (the flags as given); adaptive.AdaptivePolicy chooses
    them per round instead. The loop asks a policy: choose() -> (E, k) for the round (k = 0: the
    full model's token only), taps(E), bucket(n) -> the verify pass's fixed number of drafts for n
    made, keep_drafting(E, confidence, made) when early_stop, observe(...) and observe_times(...)
    after each round, and probe_row(a) -> a verified row to probe (observe_probe), or None."""
    early_stop = False

    def __init__(self, exit_layer: int | None, k: int):
        self.exit_layer, self.max_k = exit_layer, k

    def choose(self):
        return self.exit_layer, self.max_k

    def taps(self, exit_layer):
        return ()

    def bucket(self, n: int) -> int:
        return self.max_k

    def observe(self, exit_layer, k, made, accepted, confidences):
        pass

    def observe_times(self, exit_layer, made, bucket, draft_s, verify_s, round_s):
        pass

    def probe_row(self, accepted):
        return None


@torch.no_grad()
def speculative_generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, params: SamplingParams,
                         num_speculations: int, exit_layer: int | None = None, draft_model: Transformer | None = None,
                         stop_ids=(), on_tokens=None, steps: Steps = Steps(), policy=None):
    """Speculative decoding of prompt [T] (batch 1): each round drafts k = num_speculations tokens,
    verifies them with the full model in one pass and keeps what the acceptance rule allows, plus
    one token of the full model's own. Greedy output equals `generate`'s token for token; sampled
    output has the same distribution.

    The drafts come from layers [0, exit_layer) (all if None) and the final norm and LM head of:
    - `model` itself, without draft_model (LayerSkip self-speculation): the draft shares the one KV
      cache and the verify pass resumes the drafted positions at layer E;
    - draft_model, with its own KV cache (a separate model, or a quantized copy of `model`'s own
      weights, quantized.quantized_copy): the verify pass runs every layer of `model`.
    With `policy` (adaptive.AdaptivePolicy), E and k are chosen per round instead and drafting
    may stop early (FixedPolicy explains the protocol).

    A round writes at most k positions past the last token it keeps; they are never read: the next
    round overwrites them before any position after them attends (the causal mask hides them).
    No round drafts past the token budget: with r tokens still to produce, r - 1 drafts and the
    full model's token suffice; a round that drafts fewer than k pads the fixed-shape verify pass.
    on_tokens(list of ids) is called with each round's kept tokens. Returns (tokens [1, T + n], stats).
    """
    check_num_speculations(num_speculations if policy is None else policy.max_k)
    policy = policy or FixedPolicy(exit_layer, min(num_speculations, max_new_tokens))
    if policy.exit_layer is None and draft_model is None:
        raise ValueError("give a draft source: exit_layer (self-speculative), draft_model or both")
    k = policy.max_k  # the most drafts a round makes
    check_exit_layer(model if draft_model is None else draft_model, policy.exit_layer, last=draft_model is not None)
    shared = draft_model is None  # one KV cache: the verify pass resumes the drafts at layer E
    if prompt.dim() == 2:
        if prompt.shape[0] != 1:
            raise ValueError("speculative decoding runs one sequence at a time (batch size 1)")
        prompt = prompt[0]
    T = len(prompt)
    check_fits(model, T, max_new_tokens, lookahead=k)
    drafter = model if draft_model is None else draft_model
    if draft_model is not None:
        check_fits(draft_model, T, max_new_tokens, lookahead=k)
        if draft_model.args.vocab_size != model.args.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({draft_model.args.vocab_size}) differs from the "
                             f"model's ({model.args.vocab_size})")
    device, clock = prompt.device, _Clock(prompt.device)
    stop = set(stop_ids)
    stats = GenerationStats(T, 0, 0.0, 0.0, num_speculations=k, adaptive=not isinstance(policy, FixedPolicy))

    t0 = time.perf_counter()
    positions = torch.arange(T, device=device)
    cur, finite = steps.prefill(model, prompt[None], positions, params)
    check_finite(finite)
    if draft_model is not None:
        check_finite(steps.prefill(draft_model, prompt[None], positions, params, policy.exit_layer)[1])
        if T >= 2 and steps.catch_up is not catch_up_draft_step:
            # compiles the catch-up graph now rather than at the first fully accepted round, inside
            # the timed loop; it rewrites the prompt's last two draft-cache positions with themselves
            steps.catch_up(draft_model, prompt[-2:].view(1, 2), positions[-2:], params, policy.exit_layer)
    out = [int(cur)]
    t1 = time.perf_counter()
    if on_tokens:
        on_tokens(out[:])
    pos = T  # position of `cur`, the last kept token: no layer has processed it yet
    catch_up = None  # own-cache draft: the draft model has not seen the previous round's last draft
    offsets = torch.arange(k + 1, device=device)
    rows = torch.arange(k + 1, device=device)  # rows[n]: the verify pass's `last` for n drafts
    zero_state = torch.zeros(1, 1, model.args.dim, device=device, dtype=model.norm.weight.dtype)
    lag = 1 if device.type == "cuda" else 0  # early stop reads a confidence one step late, not waiting for the GPU
    seen = set()

    def stance(*graph):
        """Every call of a compiled step after its first in this generation has the same model,
        shapes and settings, so its guards (about 1 ms for ~300 weight tensors) need not be
        evaluated again; the first call evaluates them (and compiles, if the graph is new)."""
        skip = graph in seen
        seen.add(graph)
        return torch.compiler.set_stance(skip_guard_eval_unsafe=skip)

    while len(out) < max_new_tokens and out[-1] not in stop:
        round_start = time.perf_counter()
        E, k_round = policy.choose()
        taps = policy.taps(E) if shared else ()
        below = tuple(c for c in taps if c < E)
        start = clock.now()
        base = torch.tensor(pos, device=device)
        x, drafts, states, probs, confidences, tapped = cur, [], [], [], [], []
        want = min(k_round, max_new_tokens - len(out) - 1)  # r tokens to go: r - 1 drafts suffice
        for j in range(want):
            if j == 0 and catch_up is not None:
                stats.catch_ups += 1
                with stance("catch_up", E):
                    step = steps.catch_up(drafter, torch.cat([catch_up, x], dim=1), base - 1 + offsets[:2],
                                          params, E)
            else:
                with stance("draft", E):
                    step = steps.draft(drafter, x, (base + j).view(1), params, E, below)
            x, h, q, c, t = (v.clone() if v is not None else None for v in step)
            drafts.append(x)
            states.append(h[:, -1:])
            probs.append(q)
            confidences.append(c)
            tapped.append(t)
            i = j - lag
            if policy.early_stop and i >= 0 and j + 1 < want and not policy.keep_drafting(E, float(confidences[i]), j + 1):
                stats.early_stops += 1
                break
        made = len(drafts)
        b = policy.bucket(made) if k_round else 0  # the verify pass's fixed shape: b drafts
        pad = b - made  # the padded rows are never kept (limit), only computed
        tokens = torch.cat([cur] + drafts + [x] * pad, dim=1)
        exit_states = torch.cat(states + [zero_state] * (pad + 1), dim=1) if shared else None
        if params.greedy:
            draft_probs = None
        elif made:
            draft_probs = torch.stack(probs + [probs[-1]] * pad)
        else:  # no draft counts (limit 0); the rows only hold the shape
            draft_probs = torch.zeros(b, model.args.vocab_size, device=device)
        mid = clock.now()
        last = rows[made]  # one tensor for both: the compiled graph guards on whether they alias
        with stance("verify", E, b):
            n, nxt, verified_taps = steps.verify(model, tokens, exit_states, draft_probs, base + offsets[:b + 1],
                                                 last, params, E if shared else None, taps, last)
        end = clock.now()
        host = torch.cat([tokens[0, 1:], nxt, n.view(1)]).tolist()  # the round's one synchronisation
        a = host[-1]
        stats.accepted_per_round.append(a)
        stats.drafted += made
        draft_s, verify_s = clock.seconds(start, mid), clock.seconds(mid, end)
        stats.draft_s += draft_s
        stats.verify_s += verify_s
        stats.trace.append((E, k_round, made))
        policy.observe_times(E, made, b, draft_s, verify_s, time.perf_counter() - round_start)
        policy.observe(E, k_round, made, a, torch.stack(confidences).tolist() if policy.early_stop and made else [])
        row = policy.probe_row(a) if taps else None
        if row is not None:
            policy.observe_probe(E, taps, probe(steps, model, taps, E, row, tapped, verified_taps),
                                 host[row] if row < a else host[b])
        kept = host[:a] + [host[b]]
        for i, t in enumerate(kept):  # truncate at a stop token or the token budget
            if t in stop or len(out) + i + 1 == max_new_tokens:
                kept = kept[:i + 1]
                break
        out += kept
        if on_tokens:
            on_tokens(kept)
        pos += a + 1
        cur = nxt.view(1, 1).clone()
        # the last draft, whose input the draft model has not seen; strides (1, 1) as the draft
        # step's usual input (tokens[:, -1:] has (k + 1, 1): a guard failure, i.e. a recompile)
        catch_up = drafts[-1] if draft_model is not None and made and a == made else None
    synchronize(device)
    stats.prefill_s, stats.decode_s = t1 - t0, time.perf_counter() - t1
    stats.new_tokens = len(out)
    return torch.cat([prompt, torch.tensor(out, dtype=prompt.dtype, device=device)])[None], stats


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


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every parameter and quantized weight buffer once,
    except that an embedding table not shared with the LM head contributes only the rows looked
    up (negligible). Caches and rope/mask tables are not weights."""
    seen, total = set(), 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.data_ptr() in seen or "cache" in name or name in ("rope_cos", "rope_sin", "causal_mask"):
            continue
        seen.add(t.data_ptr())
        if name == "tok_embeddings.weight" and getattr(model.output, "weight", None) is not t:
            continue
        total += t.numel() * t.element_size()
    return total


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB
