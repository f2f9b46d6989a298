"""The options every command shares, each defined once: the model (checkpoint, device, dtype,
quantization), decoding (strategy, exit layer, number of speculations, token budget, compile) and
sampling. A command adds the groups it needs, `check_options` validates them in one place, and
`load_engine` returns an `Engine` whose `run` puts one prompt through the chosen strategy.

The LayerSkip reference code's spellings work as aliases, so its commands run as written:
--model (a converted checkpoint or a Hugging Face repo id), --max_steps, --sample True|False and
--top_k 0 (no top-k).
"""
import atexit
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import adaptive
import batching
import hub
import tp
from checkpoint import load_model, read_metadata, resolve_checkpoint_path
from decoding import STRATEGIES, Steps, Strategy, compile_steps, run
from quantized import SchemeError, pack_model, parse_quantize, quantize_model, quantized_copy
from sampling import SamplingParams
from tokenizer import load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO_MAX_SPECULATIONS = adaptive.BUCKETS[-1]
GENERATION_TEMPERATURE = 0.8  # generate.py samples; measuring commands decode greedily (as the paper's results)


def parse_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"expected True or False, got {text!r}")


parse_bool.__name__ = "True|False"  # argparse names the type in its error message


def int_or_auto(text: str):
    return "auto" if text == "auto" else int(text)


int_or_auto.__name__ = "integer or auto"


def add_model_options(p):
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint_path", "--model", dest="checkpoint_path", default=str(hub.DEFAULT_CHECKPOINT),
                   help="converted checkpoint file or folder, or a Hugging Face repo id (downloaded and converted on "
                        "first use); default: SmolLM2-135M-Instruct, prepared on first use. --model is LayerSkip's "
                        "spelling")
    g.add_argument("--hf_token", default=None, help="for gated hub repos (default: HF_TOKEN or the saved login)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    g.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="weights and activations (auto: bfloat16 on CUDA, float32 on CPU)")
    g.add_argument("--quantize", default=None, metavar="SCHEME",
                   help="int8, int4 or int4-g<N>: quantize the weights in memory at load (quantize.py writes them "
                        "to a checkpoint instead)")


def add_decoding_options(p, strategies=STRATEGIES):
    """strategies=None: the command chooses (E, k) itself (a sweep) and takes only the rest."""
    g = p.add_argument_group("decoding")
    if strategies:
        g.add_argument("--generation_strategy", default=strategies[0], choices=strategies,
                       help="autoregressive (with --exit_layer: early-exit inference), self_speculative (LayerSkip: "
                            "the first --exit_layer layers draft, the rest verify) or speculative "
                            "(--draft_checkpoint_path drafts)")
        g.add_argument("--exit_layer", type=int_or_auto, default=None,
                       help="E: layers [0, E) draft / produce tokens; auto (self_speculative): chosen per round from "
                            "measured step costs and acceptance read off the verify pass")
        g.add_argument("--num_speculations", type=int_or_auto, default=3,
                       help=f"k: draft tokens per speculative round; auto: up to {AUTO_MAX_SPECULATIONS}, chosen per "
                            "round, drafting stops early at an unsure draft")
        g.add_argument("--recalibrate", action="store_true",
                       help="with auto: measure the step costs again instead of reading them from the cache")
    if strategies and "self_speculative" in strategies:
        g.add_argument("--draft_quantize", default=None, metavar="SCHEME",
                       help="self_speculative: draft from a quantized copy (int8, int4 or int4-g<N>) of this model's "
                            "own layers [0, --exit_layer) (all layers without --exit_layer), made at load with its own "
                            "KV cache; the full-precision model verifies over all layers")
    if strategies and "speculative" in strategies:
        g.add_argument("--draft_checkpoint_path", type=Path, default=None,
                       help="draft model for --generation_strategy speculative (same tokenizer)")
    g.add_argument("--max_new_tokens", "--max_steps", dest="max_new_tokens", type=int, default=200,
                   help="tokens to generate at most (--max_steps is LayerSkip's spelling)")
    g.add_argument("--compile", action="store_true", help="compile the decode, draft and verify steps (CUDA graphs "
                   "on CUDA)")
    g.add_argument("--compile_prefill", action="store_true", help="also compile the prefill, with dynamic shapes")
    g.add_argument("--layers_per_graph", type=int, default=None, metavar="N",
                   help="with --compile: N consecutive layers per compiled graph, one graph reused by every run of N "
                        "layers (regional compilation: compile time independent of depth); 0: each step one whole "
                        "graph. Default: 6 on CPU, 0 on CUDA")


def add_sampling_options(p, temperature: float = 0.0):
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=None,
                   help=f"0 = greedy (default: {temperature}; with --sample True: {GENERATION_TEMPERATURE})")
    g.add_argument("--sample", type=parse_bool, default=None,
                   help="LayerSkip's spelling: False = greedy (--temperature 0), True = sample")
    g.add_argument("--top_k", type=int, default=200, help="0 = no top-k")
    g.add_argument("--top_p", type=float, default=None)
    g.add_argument("--seed", type=int, default=1234)
    p.set_defaults(default_temperature=temperature)


def add_options(p, sampling_temperature: float = 0.0, strategies=STRATEGIES):
    add_model_options(p)
    add_decoding_options(p, strategies)
    add_sampling_options(p, sampling_temperature)


def check_options(p, a):
    """Every check the options allow before anything is loaded; sets a.strategy, a.sampling and
    a.quantize_mode (mode, groupsize) or None. Errors end as parser errors (usage, exit 2)."""
    try:
        if a.max_new_tokens < 1:
            raise ValueError("--max_new_tokens must be >= 1")
        if a.compile_prefill and not a.compile:
            raise ValueError("--compile_prefill needs --compile")
        if getattr(a, "layers_per_graph", None) is not None:
            if not a.compile:
                raise ValueError("--layers_per_graph needs --compile")
            if a.layers_per_graph < 0:
                raise ValueError(f"--layers_per_graph must be >= 0 (0: whole-step graphs), got {a.layers_per_graph}")
        a.strategy = Strategy()
        if hasattr(a, "exit_layer"):
            draft = getattr(a, "draft_checkpoint_path", None)
            if a.generation_strategy == "speculative" and draft is None:
                raise ValueError("--generation_strategy speculative needs --draft_checkpoint_path")
            if a.generation_strategy != "speculative" and draft is not None:
                raise ValueError("--draft_checkpoint_path needs --generation_strategy speculative")
            draft_quantize = getattr(a, "draft_quantize", None)
            if draft_quantize is not None:
                if a.generation_strategy != "self_speculative":
                    raise ValueError("--draft_quantize needs --generation_strategy self_speculative")
                parse_quantize(draft_quantize)
            auto_exit, auto_k = a.exit_layer == "auto", a.num_speculations == "auto"
            a.strategy = Strategy(a.generation_strategy, None if auto_exit else a.exit_layer,
                                  AUTO_MAX_SPECULATIONS if auto_k else a.num_speculations, draft_quantize,
                                  auto_exit=auto_exit and draft_quantize is None, auto_k=auto_k)
            if auto_exit and draft_quantize is not None:
                note("--exit_layer auto with --draft_quantize: the copy drafts with every layer (its own KV cache "
                     "would lack the layers a smaller E skipped, so E cannot move during a generation)")
        if hasattr(a, "temperature"):
            a.sampling = sampling_params(a)
        if hasattr(a, "quantize"):
            a.quantize_mode = parse_quantize(a.quantize) if a.quantize else None
    except (ValueError, SchemeError) as e:
        # the engine's messages name its parameters; here they are flags
        names = "exit_layer|num_speculations|draft_quantize|temperature|top_p|top_k|generation strategy"
        p.error(re.sub(rf"(?<![-\w])({names})\b",
                       lambda m: "--" + m.group(1).replace(" ", "_"), str(e)))


def sampling_params(a) -> SamplingParams:
    if a.temperature is not None and a.sample is False and a.temperature != 0:
        raise ValueError("--sample False is greedy decoding; it contradicts --temperature "
                         f"{a.temperature}")
    if a.temperature is not None:
        temperature = a.temperature
    elif a.sample is not None:
        temperature = GENERATION_TEMPERATURE if a.sample else 0.0
    else:
        temperature = a.default_temperature
    if a.sample is True and temperature == 0:
        raise ValueError("--sample True contradicts --temperature 0 (greedy)")
    return SamplingParams(temperature, a.top_k or None, a.top_p)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: this engine runs on cpu and cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def pick_dtype(name: str, device: torch.device):
    """The compute dtype, with a one-line note where a choice is slow on this machine (BENCHMARKS.md).
    On CPU auto is float32, quantized or not: the int8/int4 kernels compute in float32 anyway, and
    float32 keeps greedy self-speculation equal to greedy decoding."""
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" else "float32"
    dtype = DTYPES[name]
    if device.type == "cpu" and dtype == torch.float16 and not cpu_has_native_float16():
        note("float16 on this CPU (no AVX-512 FP16) decodes about 5x slower than float32; prefer --dtype float32 "
             "or bfloat16")
    return dtype


def cpu_has_native_float16() -> bool:
    """AVX-512 FP16 (Sapphire Rapids and newer): float16 then runs as fast as float32 on CPU."""
    try:
        return "avx512_fp16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # cannot tell (not Linux): say nothing


def note(text: str):
    print(f"note: {text}", file=sys.stderr)


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
    policies: dict = field(default_factory=dict)  # adaptive policy per strategy, made at its first run

    def setup_caches(self, size: int, rows: int = 1):
        """KV caches of `size` positions for `rows` sequences at once (run_many's batch)."""
        for m in (self.model, self.draft_model, *self.drafts.values()):
            if m is not None:
                m.setup_caches(rows, size)

    def draft_for(self, strategy: Strategy):
        """The draft model a strategy drafts with: its quantized self-copy, the separate draft model, or None."""
        return self.drafts[strategy.draft_quantize] if strategy.draft_quantize else self.draft_model

    def run(self, prompt: torch.Tensor, max_new_tokens: int, on_tokens=None, sampling: SamplingParams | None = None,
            stop_ids=None):
        """Generates from prompt [T] with the engine's strategy; stops at the tokenizer's stop tokens
        unless stop_ids is given (() never stops early). Returns (tokens [1, T + n], stats)."""
        stops = self.tokenizer.stop_ids if stop_ids is None and self.tokenizer else stop_ids or ()
        return run(self.model, prompt, max_new_tokens, sampling or self.sampling, self.strategy,
                   self.draft_for(self.strategy), stops, on_tokens, self.steps, self.policy_for(self.strategy))

    def run_many(self, prompts: list, max_new_tokens: int, on_tokens=None, sampling: SamplingParams | None = None,
                 stop_ids=None):
        """Generates from every prompt (lists of ids), as many at once as the caches have rows
        (setup_caches), the rest queued for free rows; on_tokens(index, ids) streams. Returns
        ([batching.Sequence] in prompt order, batching.BatchStats)."""
        strategy = self.strategy
        if not strategy.batchable and self.model.max_batch_size > 1:
            raise ValueError(f"{strategy.describe()} runs one sequence at a time so far; set up the caches with "
                             "one row")
        stops = self.tokenizer.stop_ids if stop_ids is None and self.tokenizer else stop_ids or ()
        if strategy.batchable:
            k = 0 if strategy.name == "autoregressive" else min(strategy.num_speculations, max_new_tokens)
            return batching.generate_many(self.model, prompts, max_new_tokens, sampling or self.sampling, self.steps,
                                          strategy.exit_layer, stops, on_tokens, k, self.draft_for(strategy))
        t0, seqs = time.perf_counter(), []  # one at a time
        for i, p in enumerate(prompts):
            seq = batching.Sequence(list(p), max_new_tokens, frozenset(stops))
            tokens, seq.stats = self.run(torch.tensor(seq.prompt, device=self.device), max_new_tokens,
                                         (lambda ids, i=i: on_tokens(i, ids)) if on_tokens else None, sampling, stops)
            seq.take(tokens[0, len(seq.prompt):].tolist())
            seqs.append(seq)
        return seqs, batching.BatchStats.of(seqs, time.perf_counter() - t0, sum(s.stats.rounds for s in seqs), 1)

    def policy_for(self, strategy: Strategy):
        """An adaptive strategy's policy, kept across generations (its acceptance estimates carry
        over, decaying); at its first use the step costs are read from the cache or measured
        (which also compiles every graph the policy can use). None for a fixed strategy."""
        if not strategy.adaptive:
            return None
        if strategy not in self.policies:
            draft = self.draft_for(strategy)
            shared = draft is None
            n = self.model.args.n_layers
            exits = adaptive.exit_candidates(n) if strategy.auto_exit else (strategy.exit_layer,)
            ks = adaptive.buckets_up_to(strategy.num_speculations) if strategy.auto_k else (strategy.num_speculations,)
            taps = exits if shared else ()
            key = {"checkpoint": checkpoint_identity(self.path), "device": device_name(self.device),
                   "threads": torch.get_num_threads(), "dtype": str(self.dtype), "torch": torch.__version__,
                   "weights": weight_scheme(self.model), "draft": strategy.draft_quantize or
                   (weight_scheme(draft) if draft is not None else "self"), "compile": self.steps.verify is not
                   Steps.verify, "cache": self.model.max_seq_length, "exits": exits, "ks": ks,
                   "world_size": tp.world()[1]}
            t0 = time.perf_counter()
            costs, measured = adaptive.load_or_measure(
                key, lambda: adaptive.measure_costs(self.model, self.steps, exits, ks, draft, taps,
                                                    progress=tp.world()[0] == 0), self.recalibrate)
            how = f"measured in {time.perf_counter() - t0:.1f} s" if measured else f"read from {adaptive.cache_dir()}"
            print(f"Adaptive speculation: exit layers {exits if shared else (strategy.exit_layer or 'all',)}, "
                  f"k in {ks}; step costs {how}", file=sys.stderr)
            self.policies[strategy] = adaptive.AdaptivePolicy(costs, exits, ks, shared)
            self.policies[strategy].calibration_s = time.perf_counter() - t0 if measured else 0.0
        return self.policies[strategy]


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


def check_metadata(a, meta: dict, world_size: int, draft_meta: dict | None):
    """What the checkpoints' metadata can refuse before any weight is read."""
    n = meta["args"].n_layers
    E, schemes = a.strategy.exit_layer, draft_schemes(a)
    top = n if a.strategy.draft_quantize else n - 1  # a quantized self-draft may run every layer
    if E is not None and E > top:
        raise ValueError(f"--exit_layer must be in [1, {top}] for this {n}-layer model, got {E}")
    if schemes and meta["scheme"]["mode"] != "none":
        raise ValueError(f"--draft_quantize {','.join(schemes)}: the checkpoint is already quantized "
                         f"({meta['scheme']['mode']}); the draft is quantized from full-precision weights")
    if a.quantize_mode and meta["scheme"]["mode"] != "none":
        raise ValueError(f"--quantize {a.quantize}: the checkpoint is already quantized ({meta['scheme']['mode']})")
    if draft_meta is not None and draft_meta["args"].vocab_size != meta["args"].vocab_size:
        raise ValueError(f"the draft model's vocabulary ({draft_meta['args'].vocab_size}) differs from the model's "
                         f"({meta['args'].vocab_size}); speculative decoding needs the same tokenizer")
    if world_size > 1:
        check_shardable(meta["args"], meta["scheme"], a.quantize_mode, world_size)
        for scheme in schemes:
            check_shardable(meta["args"], meta["scheme"], parse_quantize(scheme), world_size)
        if draft_meta is not None:
            check_shardable(draft_meta["args"], draft_meta["scheme"], None, world_size)


def check_shardable(model_args, scheme: dict, quantize_mode, world_size: int):
    """tp.check_shardable for a model with this stored scheme, quantized in memory to quantize_mode
    (mode, groupsize) or not: int4's group size constrains the split."""
    mode, groupsize = quantize_mode or (scheme["mode"], scheme.get("groupsize"))
    tp.check_shardable(model_args, world_size, groupsize if mode == "int4" else None)


def draft_schemes(a) -> list[str]:
    """The quantized self-drafts to make at load: --draft_quantize's, or the list a sweep sets."""
    return getattr(a, "draft_schemes", None) or ([a.strategy.draft_quantize] if a.strategy.draft_quantize else [])


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


def own_bytes(model, shared_with=None) -> int:
    """Bytes of the model's parameters and weight buffers (not caches or tables), counting each
    tensor once and none that shared_with also holds."""
    def tensors(m):
        return {t.data_ptr(): t.numel() * t.element_size() for name, t in [*m.named_parameters(), *m.named_buffers()]
                if "cache" not in name and name not in ("rope_cos", "rope_sin", "causal_mask")}
    theirs = tensors(shared_with) if shared_with is not None else {}
    return sum(n for ptr, n in tensors(model).items() if ptr not in theirs)


def init_distributed(a) -> tuple[int, int]:
    """(rank, world size) under torchrun, else (0, 1); sets a.device to this rank's device. Only
    rank 0 prints; errors still reach every rank's stderr (cli.run)."""
    rank, world_size, a.device = tp.init_from_env(a.device)
    if world_size > 1:
        atexit.register(tp.shutdown)
    if rank != 0:
        sys.stdout = sys.stderr = open("/dev/null", "w")
    return rank, world_size


def load_engine(a, rank: int = 0, world_size: int = 1, check=None) -> Engine:
    """Loads what the options name. check(meta, tokenizer), if given, refuses what the metadata and
    tokenizer already show is impossible, before any weight is read."""
    device = pick_device(a.device)
    path = resolve_checkpoint_path(hub.find_checkpoint(a.checkpoint_path, a.hf_token, world_size))
    meta = read_metadata(path)
    draft_path = getattr(a, "draft_checkpoint_path", None)
    draft_meta = read_metadata(draft_path) if draft_path is not None else None
    tokenizer = load_tokenizer(path.parent)
    check_metadata(a, meta, world_size, draft_meta)
    if check is not None:
        check(meta, tokenizer)
    dtype = pick_dtype(a.dtype, device)
    t0 = time.perf_counter()
    schemes = draft_schemes(a)
    layers = getattr(a, "draft_layers", a.strategy.exit_layer)
    drafts = {}

    def prepare(m):  # the drafts are quantized from the full-precision weights, before anything else
        for scheme in schemes:
            drafts[scheme] = make_draft(m, scheme, layers, rank, world_size)
        return quantize_and_shard(m, a.quantize_mode, rank, world_size)
    model = load_model(path, device, dtype, prepare=prepare)
    shards = f", tensor parallel over {world_size} ranks" if world_size > 1 else ""
    how = f", quantized to {a.quantize} in memory" if a.quantize else ""
    print(f"Loaded {path} ({dtype}, {device}{how}{shards}) in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    for scheme, d in drafts.items():
        extra, full = own_bytes(d, shared_with=model), own_bytes(model)
        print(f"Draft: {scheme} copy of layers [0, {d.args.n_layers}) and the LM head, +{extra / 1e6:.0f} MB "
              f"(+{extra / full:.0%} of the model's weights)", file=sys.stderr)
    draft = None
    if draft_path is not None:
        draft = load_model(resolve_checkpoint_path(draft_path), device, dtype,
                           prepare=lambda m: quantize_and_shard(m, None, rank, world_size))
    steps = compile_steps(device, a.compile_prefill, getattr(a, "layers_per_graph", None)) if a.compile else Steps()
    return Engine(model, draft, tokenizer, device, dtype, steps, a.strategy, getattr(a, "sampling", SamplingParams()),
                  path, drafts, getattr(a, "recalibrate", False))
