"""The step functions every decoding loop calls (prefill, decode, draft, catch-up, verify, probe,
and their batched forms) over the model's API, and `compile_steps`, which turns them into
fixed-shape graphs: regionally (runs of layers through one shared graph, the CPU default) or whole.
The loops that drive them: decoding.py (one sequence) and batching.py (many)."""
import functools
import sys
import time
from dataclasses import dataclass

import torch

from model import Transformer, layer_graph, run_blocks
from sampling import (RowParams, SamplingParams, argmax, greedy_accept, logits_to_probs, sample, sample_from_probs,
                      speculative_accept)


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
        token = argmax(logits).unsqueeze(-1)
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


def batch_draft_step(model: Transformer, x, input_pos, params, exit_layer: int | None):
    """One draft token for each of B sequences: x [B, T] at their own positions input_pos [B, T]
    through layers [0, exit_layer) (all if None) and the head; the token follows x's last column
    (T = 2: a draft model's catch-up, batching.Batch). Returns (tokens [B, 1], layer-E states
    [B, T, dim], the draft distributions [B, V] when sampling, else None). params: a SamplingParams
    or, rows with their own, sampling.RowParams (here and in batch_verify_step and decode)."""
    h = model.run_layers(model.embed(x), input_pos, 0, exit_layer)
    logits = model.head(h[:, -1:])[:, -1]
    if params.greedy:
        return argmax(logits).unsqueeze(-1), h, None
    probs = logits_to_probs(logits, params)
    return sample_from_probs(probs), h, probs


def batch_verify_step(model: Transformer, tokens, exit_states, draft_probs, input_pos, limit, params,
                      exit_layer: int | None):
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
        return greedy_accept(drafts, logits, limit)
    each = params.rows if isinstance(params, RowParams) else [params] * len(tokens)
    rows = [speculative_accept(drafts[b], draft_probs[b], logits[b], each[b], limit[b]) for b in range(len(tokens))]
    return torch.stack([n for n, _ in rows]), torch.stack([t for _, t in rows])


def probe_step(model: Transformer, states):
    """The head's greedy token for each of states [1, n, dim] (hidden states entering n candidate
    exit layers at one position): [n]."""
    return argmax(model.head(states)[0])


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
    import cpu_kernels
    if device.type == "cpu" and cpu_kernels.built_for_this_cpu():
        # Before its first CPU graph, inductor builds and loads a C++ file for every vector ISA the
        # CPU reports (four on the AVX-512 Xeon: 11 s of a cold start; cached in its folder after).
        # Our kernels, built with -march=native by the same compiler, already showed that it
        # handles the CPU's instruction sets: inductor's first choice is the same without the builds.
        cfg.cpp.vec_isa_ok = True


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
        """dynamo's backend: inductor, recording each run. On CPU with the C++ wrapper: a graph of 6
        layers calls ~55 kernels (4 linears, attention and 4 fused loops a layer), whose calls from
        Python cost 4-11% of a SmolLM2 step against the whole-step graphs, 0-3% from C++, for about
        0.4 s more compile time a graph (BENCHMARKS.md, "The regional graphs' C++ wrapper"). Without size
        asserts (~100 checks a call of what the guarded first calls check already)."""
        from torch._inductor.compile_fx import compile_fx
        cpu = all(t.device.type == "cpu" for t in example_inputs if isinstance(t, torch.Tensor))
        fn = compile_fx(gm, example_inputs, config_patches={"size_asserts": False, "cpp_wrapper": cpu})
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
        cache = layers[0].attention.kv_cache
        # what makes dynamo compile another graph, so that each new one is announced: the call's
        # shapes and strides (key, less the model), the linears' kind, a slice of the cache's rows
        # (batching.Batch) and the cache's dtype
        rows_slice = cache is not None and cache.k_rows is not None
        cache_dtype = cache.k_cache.dtype if cache is not None else h.dtype
        kind = (*key[1:], type(wqkv), wqkv.weight.shape, rows_slice, cache_dtype)
        if kind in self.seen:
            out = self.fn(layers, h, cos, sin, mask, input_pos)
        else:
            self.seen.add(kind)
            batch = f"{h.shape[0]} sequences x " if h.shape[0] > 1 else ""
            how = "".join([", positions per sequence" if input_pos.dim() > 1 else "",
                           ", rows of the cache" if rows_slice else "",
                           f", {str(cache_dtype).removeprefix('torch.')} cache" if cache_dtype != h.dtype else ""])
            with compile_progress(f"{len(layers)} layers x {batch}{h.shape[1]} row{'s' if h.shape[1] > 1 else ''} "
                                  f"({type(wqkv).__name__}, width {h.shape[-1]}{how})"):
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

