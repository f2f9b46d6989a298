"""The engine: what the options' `EngineConfig` names, loaded (model, draft models, tokenizer, quantization,
sharding, compiled steps) into an `Engine` whose `run` puts one prompt, and `run_many` many
prompts at once, through a strategy. Every command goes through it, so a strategy behaves the same
in generate.py, the evaluation tools and the speed harness."""
import atexit
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

import adaptive
import batching
import hub
import tp
from checkpoint import is_random, load_model, read_metadata, resolve_checkpoint_path
from decoding import Strategy, buckets_up_to, check_draft_vocab, check_exit_layer, compile_ngram_rounds, run
from ngram import SourceChooser
from steps import Steps, compile_steps
from options import DTYPES, EngineConfig, pick_device, pick_dtype
from quantized import pack_model, parse_quantize, quantize_model, quantized_copy
from sampling import SamplingParams
from tokenizer import load_tokenizer


@dataclass
class Engine:
    """A loaded model (and draft model), its tokenizer and steps, and the chosen strategy and sampling."""
    model: object
    draft_model: object
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    steps: Steps
    strategy: Strategy
    sampling: SamplingParams
    path: Path
    drafts: dict = field(default_factory=dict)  # quantized self-drafts by scheme (--draft_quantize)
    recalibrate: bool = False  # adaptive strategies: measure the step costs again (else read the cache)
    # adaptive policy per strategy (and rows), n-gram source chooser per strategy, rows and sampling
    # kind; each made at its first run
    policies: dict = field(default_factory=dict)
    calibration_s: float = 0.0  # the last step-cost measurement's seconds (0: read from the cache)

    def setup_caches(self, size: int, rows: int = 1):
        """KV caches of `size` positions for `rows` sequences at once (run_many's batch). The
        quantized self-drafts draft into the model's own caches (Transformer.share_caches)."""
        for m in (self.model, self.draft_model):
            if m is not None:
                m.setup_caches(rows, size)
        for d in self.drafts.values():
            d.share_caches(self.model)

    def setup_caches_for(self, prompt_lens, max_new_tokens: int, rows: int = 1, strategies=(), size=None):
        """Caches of one size (a compiled graph is specialised to it) that hold max_new_tokens
        after every prompt length with every strategy (default: the engine's); cache_size says
        what does not fit."""
        context = self.model.args.max_position_embeddings
        self.setup_caches(max(cache_size(n, max_new_tokens, s, context, size) for n in prompt_lens
                              for s in strategies or (self.strategy,)), rows)

    def budget(self, prompt_len: int, max_new_tokens: int, strategy: Strategy | None = None) -> int:
        """Tokens, at most max_new_tokens, that the caches as set up hold after a prompt of prompt_len."""
        strategy = strategy or self.strategy
        return min(max_new_tokens, self.model.max_seq_length - prompt_len - strategy.lookahead(max_new_tokens))

    def draft_for(self, strategy: Strategy):
        """The draft model a strategy drafts with: its quantized self-copy, the separate draft model, or None."""
        return self.drafts[strategy.draft_quantize] if strategy.draft_quantize else self.draft_model

    def run(self, prompt: torch.Tensor, max_new_tokens: int, on_tokens=None, sampling: SamplingParams | None = None,
            stop_ids=None, strategy: Strategy | None = None):
        """Generates from prompt [T] with `strategy` (default: the one the options chose); stops at
        the tokenizer's stop tokens unless stop_ids is given (() never stops early). Returns
        (tokens [1, T + n], stats)."""
        strategy = strategy or self.strategy
        sampling = sampling or self.sampling
        return run(self.model, prompt, max_new_tokens, sampling, strategy, self.draft_for(strategy),
                   self.stops(stop_ids), on_tokens, self.steps, self.policy_for(strategy),
                   self.chooser_for(strategy, sampling))

    def stops(self, stop_ids=None):
        return self.tokenizer.stop_ids if stop_ids is None and self.tokenizer else stop_ids or ()

    def run_many(self, prompts: list, max_new_tokens: int, on_tokens=None, sampling: SamplingParams | None = None,
                 stop_ids=None, strategy: Strategy | None = None):
        """Generates from every prompt (lists of ids), as many at once as the caches have rows
        (setup_caches), the rest queued for free rows; on_tokens(index, ids) streams. Returns
        ([batching.Sequence] in prompt order, batching.BatchStats)."""
        strategy = strategy or self.strategy
        stops = self.stops(stop_ids)
        rows = self.model.max_batch_size
        if rows > 1 or not strategy.adaptive:  # one row and auto: the one-sequence loop (probes, early stop)
            k, policy = self.batch_rounds(strategy, max_new_tokens)
            sampling = sampling or self.sampling
            return batching.generate_many(self.model, prompts, max_new_tokens, sampling, self.steps,
                                          strategy.exit_layer, stops, on_tokens, k, self.draft_for(strategy), policy,
                                          draft_source=strategy.draft_source, ngram_tokens=strategy.ngram_tokens,
                                          chooser=self.chooser_for(strategy, sampling, rows))
        t0, seqs = time.perf_counter(), []  # one at a time
        for i, p in enumerate(prompts):
            seq = batching.Sequence(list(p), max_new_tokens, frozenset(stops))
            tokens, seq.stats = self.run(torch.tensor(seq.prompt, device=self.device), max_new_tokens,
                                         (lambda ids, i=i: on_tokens(i, ids)) if on_tokens else None, sampling, stops,
                                         strategy)
            seq.take(tokens[0, len(seq.prompt):].tolist())
            seqs.append(seq)
        return seqs, batching.BatchStats.of(seqs, time.perf_counter() - t0, sum(s.stats.rounds for s in seqs), 1)

    def warm_up(self, prompts: list, max_new_tokens: int, strategy: Strategy | None = None, many: bool = False):
        """An untimed start that compiles (with compiled steps) every graph a generation of these
        prompts (lists of ids) with strategy meets, through run (one prompt at a time) or, with
        `many`, run_many, in a time that does not grow with the budget or the number of prompts:
        a few rounds (warmup_tokens) of as many prompts as run at once, then, with several rows,
        every step and round of fewer rows (compile_batched)."""
        strategy = strategy or self.strategy
        if not many:
            prompt = torch.tensor(prompts[0], device=self.device)
            self.run(prompt, max(1, self.budget(len(prompt), warmup_tokens(strategy, max_new_tokens), strategy)),
                     strategy=strategy)
            return
        rows = self.model.max_batch_size
        self.run_many(prompts[:rows], warmup_tokens(strategy, max_new_tokens), strategy=strategy)
        if rows > 1:
            self.compile_batched(strategy)

    def batch_rounds(self, strategy: Strategy, max_new_tokens: int | None = None):
        """(k, policy) of a batched generation with strategy: the drafts a round of the model's
        drafts makes (0: none; at most max_new_tokens) and the adaptive BatchPolicy (or None)."""
        k = 0 if strategy.name == "autoregressive" or not strategy.model_drafts else strategy.num_speculations
        if max_new_tokens is not None:
            k = min(k, max_new_tokens)
        return k, self.batch_policy_for(strategy) if strategy.adaptive else None

    def compile_batched(self, strategy: Strategy | None = None, sampling: SamplingParams | None = None):
        """With compiled steps: every shape a batched generation (batching.Batch) with strategy can
        step at the caches' rows (each bucket of rows: rows that finish early step smaller ones;
        each round a policy can choose), compiled now rather than inside the first generations
        that meet them (Batch.compile_rounds)."""
        strategy = strategy or self.strategy
        if self.steps.verify is Steps.verify:
            return
        k, policy = self.batch_rounds(strategy)
        batching.Batch(self.model, sampling or self.sampling, self.steps, strategy.exit_layer, k,
                       self.draft_for(strategy), policy, strategy.draft_source, strategy.ngram_tokens).compile_rounds()

    def policy_for(self, strategy: Strategy):
        """An adaptive strategy's policy for one sequence, kept across generations (its acceptance
        estimates carry over, decaying); at its first use the step costs are read from the cache or
        measured (which also compiles every graph the policy can use). None for a fixed strategy."""
        if not strategy.adaptive:
            return None
        if strategy not in self.policies:
            draft, exits, ks, taps = self.candidates(strategy)
            costs, _ = self.costs(strategy, {"exits": exits, "ks": ks}, lambda: adaptive.measure_costs(
                self.model, self.steps, exits, ks, draft, taps, progress=tp.world()[0] == 0))
            self.policies[strategy] = adaptive.AdaptivePolicy(costs, exits, ks, draft is None)
            self.policies[strategy].calibration_s = self.calibration_s
        return self.policies[strategy]

    def chooser_for(self, strategy: Strategy, sampling: SamplingParams, rows: int = 1):
        """With n-gram drafts, the strategy's SourceChooser for this many rows, kept across
        generations (its timings and acceptance per match length carry over, decaying); None
        without. One per sampling kind: clocks decide only greedy choices (ngram.SourceChooser).
        With compiled steps, made after compiling every shape of round the chooser can pick."""
        if strategy.draft_source == "model" or strategy.name == "autoregressive":
            return None
        key = ("chooser", strategy, rows, sampling.greedy)
        if key not in self.policies:
            k = strategy.num_speculations if strategy.model_drafts else 0
            if self.steps.verify is not Steps.verify:  # compiled: every shape of round now, not mid-generation
                print(f"Compiling the rounds the draft sources can take ({rows} row{'s' if rows > 1 else ''}) ...",
                      file=sys.stderr)
                if rows == 1:
                    compile_ngram_rounds(self.model, self.steps, sampling, strategy.ngram_tokens,
                                         self.draft_for(strategy))
                else:
                    batching.Batch(self.model, sampling, self.steps, strategy.exit_layer, k, self.draft_for(strategy),
                                   None, strategy.draft_source, strategy.ngram_tokens).compile_rounds()
            self.policies[key] = SourceChooser(k, clocks=sampling.greedy)
        return self.policies[key]

    def batch_policy_for(self, strategy: Strategy):
        """The adaptive policy over batched rounds at the caches' rows (adaptive.BatchPolicy), its
        round costs per bucket of rows read from the cache or measured (Batch.measure_costs)."""
        rows = self.model.max_batch_size
        if (strategy, rows) not in self.policies:
            draft, exits, ks, _ = self.candidates(strategy)

            def measure():
                batch = batching.Batch(self.model, SamplingParams(), self.steps, exits[0], max(ks), draft)
                return adaptive.BatchCosts(batch.measure_costs(exits, ks, progress=tp.world()[0] == 0))
            costs, _ = self.costs(strategy, {"exits": exits, "ks": ks, "rows": rows, "batched": True}, measure,
                                  adaptive.BatchCosts)
            self.policies[(strategy, rows)] = adaptive.BatchPolicy(costs.by_rows, exits, ks, draft is None)
        return self.policies[(strategy, rows)]

    def candidates(self, strategy: Strategy):
        """(draft model or None, candidate exit layers, candidate k, exit layers the probes tap)."""
        draft = self.draft_for(strategy)
        exits = adaptive.exit_candidates(self.model.args.n_layers) if strategy.auto_exit else (strategy.exit_layer,)
        ks = buckets_up_to(strategy.num_speculations) if strategy.auto_k else (strategy.num_speculations,)
        return draft, exits, ks, exits if draft is None else ()

    def costs(self, strategy: Strategy, what: dict, measure, kind=adaptive.StepCosts):
        """Step costs of this engine's model, device, build and caches, for `what` (the candidates),
        read from the cache or measured (what measure() returns); sets calibration_s."""
        draft = self.draft_for(strategy)
        key = {"checkpoint": checkpoint_identity(self.path), "device": device_name(self.device),
               "threads": torch.get_num_threads(), "dtype": str(self.dtype), "torch": torch.__version__,
               "weights": weight_scheme(self.model), "kv_cache": str(self.model.kv_cache_dtype or self.dtype),
               "draft": strategy.draft_quantize or
               (weight_scheme(draft) if draft is not None else "self"), "compile": self.steps.verify is not
               Steps.verify, "cache": self.model.max_seq_length, "world_size": tp.world()[1], **what}
        t0 = time.perf_counter()
        costs, measured = adaptive.load_or_measure(key, measure, self.recalibrate, kind)
        self.calibration_s = time.perf_counter() - t0 if measured else 0.0
        how = f"measured in {self.calibration_s:.1f} s" if measured else f"read from {adaptive.cache_dir()}"
        shown = what["exits"] if draft is None else (strategy.exit_layer or "all",)
        rows = f", {what['rows']} rows at once" if "rows" in what else ""
        print(f"Adaptive speculation: exit layers {shown}, k in {what['ks']}{rows}; step costs {how}",
              file=sys.stderr)
        return costs, measured


def warmup_tokens(strategy: Strategy, max_new_tokens: int) -> int:
    """The budget of the untimed generation that compiles one prompt's steps (Engine.warm_up): a
    few rounds meet every graph (the prefill, a decode step, speculative rounds, the second round's
    first draft step catching an own-cache draft up; n-gram verify shapes are compiled up front),
    so the start-up does not also generate the whole budget."""
    k = max(strategy.num_speculations, strategy.ngram_tokens if strategy.draft_source != "model" else 0)
    return min(max_new_tokens, 3 * (k + 1) + 2)


def checkpoint_identity(path: Path) -> str:
    """The checkpoint file's path, size and modification time: a rewritten file is another model."""
    try:
        st = Path(path).stat()
        return f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return str(path)  # random weights (the speed harness's random:<shape>)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return "cpu"


def weight_scheme(model) -> str:
    """How the model's linear weights are stored: the first layer's query/key/value projection's
    class, storage dtype (int8, packed int4 or floats) and shape; enough to tell quantizations apart."""
    wqkv = model.layers[0].attention.wqkv
    w = next(t for name, t in [*wqkv.named_buffers(), *wqkv.named_parameters()] if "weight" in name)
    return f"{type(wqkv).__name__}:{w.dtype}:{tuple(w.shape)}"


def check_metadata(config: EngineConfig, meta: dict, world_size: int, draft_meta: dict | None, schemes: list[str]):
    """What the checkpoints' metadata can refuse before any weight is read."""
    # a quantized self-draft may run every layer
    check_exit_layer(meta["args"].n_layers, config.strategy.exit_layer, last=config.strategy.draft_quantize is not None)
    if schemes and meta["scheme"]["mode"] != "none":
        raise ValueError(f"--draft_quantize {','.join(schemes)}: the checkpoint is already quantized "
                         f"({meta['scheme']['mode']}); the draft is quantized from full-precision weights")
    if config.quantize and meta["scheme"]["mode"] != "none":
        raise ValueError(f"--quantize {config.quantize}: the checkpoint is already quantized ({meta['scheme']['mode']})")
    if draft_meta is not None:
        check_draft_vocab(meta["args"].vocab_size, draft_meta["args"].vocab_size)
    if world_size > 1:
        check_shardable(meta["args"], meta["scheme"], config.quantize_mode, world_size)
        for scheme in schemes:
            check_shardable(meta["args"], meta["scheme"], parse_quantize(scheme), world_size)
        if draft_meta is not None:
            check_shardable(draft_meta["args"], draft_meta["scheme"], None, world_size)


def check_shardable(model_args, scheme: dict, quantize_mode, world_size: int):
    """tp.check_shardable for a model with this stored scheme, quantized in memory to quantize_mode
    (mode, groupsize) or not: int4's group size constrains the split."""
    mode, groupsize = quantize_mode or (scheme["mode"], scheme.get("groupsize"))
    tp.check_shardable(model_args, world_size, groupsize if mode == "int4" else None)


def make_draft(model, scheme: str, n_layers: int | None, rank: int = 0, world_size: int = 1):
    """The quantized self-draft (--draft_quantize): a `scheme` copy of the model's layers [0, n_layers),
    made from the loaded full-precision model before it is quantized or sharded, then sharded
    like it and packed."""
    copy = quantized_copy(model, *parse_quantize(scheme), n_layers=n_layers, pack=False)
    return pack_model(tp.shard_model(copy, rank, world_size) if world_size > 1 else copy)


def quantize_and_shard(model, quantize_mode, rank: int, world_size: int):
    """In-memory quantization before sharding (tp splits the quantized modules) and before packing
    (load_model packs); then this rank's shard."""
    if quantize_mode:
        quantize_model(model, *quantize_mode, pack=False)
    return tp.shard_model(model, rank, world_size) if world_size > 1 else model


def cache_size(prompt_len: int, max_new_tokens: int, strategy: Strategy, context: int, size: int | None = None) -> int:
    """The KV cache positions a generation of max_new_tokens after a prompt of prompt_len tokens
    needs (with what a speculative round writes past the last token it keeps), or `size`
    (--max_seq_length) once checked to hold them; a ValueError naming the flags where they exceed
    it or the model's context."""
    if prompt_len < 1:
        raise ValueError("the prompt is empty; give some text")
    lookahead = strategy.lookahead(max_new_tokens)
    need = prompt_len + max_new_tokens + lookahead
    what = f"the prompt ({prompt_len} tokens) plus --max_new_tokens ({max_new_tokens})"
    if lookahead:
        what += f" and {lookahead} positions of speculation lookahead"
    if size is not None:
        if size > context:
            raise ValueError(f"--max_seq_length {size} exceeds this model's context of {context}")
        if need > size:
            raise ValueError(f"{what} needs {need} positions but the KV cache holds {size} (--max_seq_length)")
        return size
    if need > context:
        raise ValueError(f"{what} needs {need} positions, more than this model's context of {context}; shorten "
                         "the prompt or lower --max_new_tokens")
    return need


def weight_bytes(model, shared_with=None, per_token: bool = False) -> int:
    """Bytes of the model's parameters and weight buffers (not caches or rope/mask tables), each
    tensor once and none that shared_with also holds. per_token: what one decode step reads, which
    leaves out an embedding table not shared with the LM head (a step reads one row of it)."""
    def tensors(m):
        return {t.data_ptr(): (name, t) for name, t in [*m.named_parameters(), *m.named_buffers()]
                if "cache" not in name and name not in ("rope_cos", "rope_sin", "causal_mask")}
    theirs = tensors(shared_with) if shared_with is not None else {}
    untied_embedding = model.tok_embeddings.weight is not model.output.weight
    return sum(t.numel() * t.element_size() for ptr, (name, t) in tensors(model).items()
               if ptr not in theirs and not (per_token and untied_embedding and name == "tok_embeddings.weight"))


def init_distributed(config: EngineConfig) -> tuple[int, int, EngineConfig]:
    """(rank, world size) under torchrun, else (0, 1), and the config on this rank's device. Only
    rank 0 prints; errors still reach every rank's stderr (cli.run)."""
    rank, world_size, device = tp.init_from_env(config.device)
    if world_size > 1:
        atexit.register(tp.shutdown)
    if rank != 0:
        sys.stdout = sys.stderr = open("/dev/null", "w")
    return rank, world_size, replace(config, device=device)


def load_engine(config: EngineConfig, rank: int = 0, world_size: int = 1, check=None,
                draft_schemes: list[str] | None = None) -> Engine:
    """Loads what the configuration names. check(meta, tokenizer), if given, refuses what the metadata and
    tokenizer already show is impossible, before any weight is read. draft_schemes: the quantized
    self-drafts to make, each of every layer (a sweep's or the speed harness's rows share them),
    instead of --draft_quantize's copy of layers [0, --exit_layer)."""
    device = pick_device(config.device)
    path = resolve_checkpoint_path(hub.find_checkpoint(config.checkpoint, config.hf_token, world_size))
    meta = read_metadata(path)
    draft_path = config.draft_checkpoint
    draft_meta = read_metadata(draft_path) if draft_path is not None else None
    tokenizer = None if is_random(path) else load_tokenizer(path.parent)  # random weights: random prompts
    schemes, layers = (draft_schemes, None) if draft_schemes is not None else \
        ([config.strategy.draft_quantize] if config.strategy.draft_quantize else [], config.strategy.exit_layer)
    check_metadata(config, meta, world_size, draft_meta, schemes)
    if check is not None:
        check(meta, tokenizer)
    dtype = pick_dtype(config.dtype, device)
    t0 = time.perf_counter()
    drafts = {}

    def prepare(m):  # the drafts are quantized from the full-precision weights, before anything else
        for scheme in schemes:
            drafts[scheme] = make_draft(m, scheme, layers, rank, world_size)
        return quantize_and_shard(m, config.quantize_mode, rank, world_size)
    model = load_model(path, device, dtype, prepare=prepare)
    shards = f", tensor parallel over {world_size} ranks" if world_size > 1 else ""
    how = f", quantized to {config.quantize} in memory" if config.quantize else ""
    print(f"Loaded {path} ({dtype}, {device}{how}{shards}) in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    for scheme, d in drafts.items():
        d.tok_embeddings.weight = model.tok_embeddings.weight  # the same table, in the layout packing chose
        extra, full = weight_bytes(d, shared_with=model), weight_bytes(model)
        print(f"Draft: {scheme} copy of layers [0, {d.args.n_layers}) and the LM head, +{extra / 1e6:.0f} MB "
              f"(+{extra / full:.0%} of the model's weights)", file=sys.stderr)
    draft = None
    if draft_path is not None:
        draft = load_model(resolve_checkpoint_path(draft_path), device, dtype,
                           prepare=lambda m: quantize_and_shard(m, None, rank, world_size))
    if config.kv_cache_dtype != "auto":
        for m in (model, draft, *drafts.values()):
            if m is not None:
                m.kv_cache_dtype = DTYPES[config.kv_cache_dtype]
    steps = compile_steps(device, config.compile_prefill, config.layers_per_graph) if config.compile else Steps()
    return Engine(model, draft, tokenizer, device, dtype, steps, config.strategy, config.sampling, path, drafts,
                  config.recalibrate)
