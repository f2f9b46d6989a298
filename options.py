"""The options every command shares, each defined once: the model (checkpoint, device, dtype,
quantization), decoding (strategy, exit layer, number of speculations, token budget, compile) and
sampling. A command adds the groups it needs and `check_options` validates them into one frozen
`EngineConfig`, which `engine.load_engine` then loads.

The LayerSkip reference code's spellings work as aliases, so its commands run as written:
--model (a converted checkpoint or a Hugging Face repo id), --max_steps, --sample True|False and
--top_k 0 (no top-k).
"""
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import hub
from decoding import BUCKETS, MAX_SPECULATIONS, STRATEGIES, Strategy
from ngram import SOURCES
from quantized import SchemeError, parse_quantize
from sampling import SamplingParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16")  # auto: the model's dtype; the CPU attention reads these two
AUTO_MAX_SPECULATIONS = BUCKETS[-1]
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
    g.add_argument("--kv_cache_dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="the KV cache's element type (auto: the model's dtype). bfloat16 with float32 on CPU: half "
                        "the cache's memory and the bytes a step reads; the attention widens each value exactly, "
                        "so greedy self-speculation and batched rows stay exact")


def add_decoding_options(p, strategies=STRATEGIES):
    """strategies=None: the command chooses (E, k) itself (a sweep) and takes only the rest."""
    g = p.add_argument_group("decoding")
    # what a command does not offer takes the engine's default (check_options reads every one)
    p.set_defaults(generation_strategy=Strategy.name, exit_layer=None, num_speculations=Strategy.num_speculations,
                   recalibrate=False, draft_quantize=None, draft_checkpoint_path=None, draft_source="model",
                   ngram_tokens=Strategy.ngram_tokens)
    if strategies:
        g.add_argument("--generation_strategy", default=strategies[0], choices=strategies,
                       help="autoregressive (with --exit_layer: early-exit inference), self_speculative (LayerSkip: "
                            "the first --exit_layer layers draft, the rest verify) or speculative "
                            "(--draft_checkpoint_path drafts)")
        g.add_argument("--exit_layer", type=int_or_auto, default=None,
                       help="E: layers [0, E) draft / produce tokens; auto (self_speculative): chosen per round from "
                            "measured step costs and acceptance read off the verify pass")
        g.add_argument("--num_speculations", type=int_or_auto, default=3,
                       help=f"k: draft tokens per speculative round (1-{MAX_SPECULATIONS}); auto: up to "
                            f"{AUTO_MAX_SPECULATIONS}, chosen per round, drafting stops early at an unsure draft")
        g.add_argument("--recalibrate", action="store_true",
                       help="with auto: measure the step costs again instead of reading them from the cache")
    if strategies and "self_speculative" in strategies:
        g.add_argument("--draft_quantize", default=None, metavar="SCHEME",
                       help="self_speculative: draft from a quantized copy (int8, int4 or int4-g<N>) of this model's "
                            "own layers [0, --exit_layer) (all layers without --exit_layer), made at load with its own "
                            "KV cache; the full-precision model verifies over all layers")
        g.add_argument("--draft_source", default="model", choices=SOURCES,
                       help="self_speculative / speculative: model (the drafts above), ngram (prompt lookup: the "
                            "tokens that followed the newest n-gram's latest earlier occurrence in the prompt or "
                            "output, verified over every layer; no draft model) or auto (per round, that proposal "
                            "or the model's drafts, whichever is expected to yield more tokens per second)")
        g.add_argument("--ngram_tokens", type=int, default=Strategy.ngram_tokens, metavar="N",
                       help="with --draft_source ngram or auto: the most tokens a proposal from the text drafts "
                            f"(1-{MAX_SPECULATIONS})")
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


@dataclass(frozen=True)
class EngineConfig:
    """What `engine.load_engine` loads and how the engine decodes, checked once: the options'
    values, or these defaults where a command has no such option."""
    checkpoint: str = str(hub.DEFAULT_CHECKPOINT)
    hf_token: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    quantize: str | None = None  # int8, int4 or int4-g<N>: the weights quantized in memory at load
    strategy: Strategy = Strategy()
    sampling: SamplingParams = SamplingParams()
    draft_checkpoint: Path | None = None  # the draft model of strategy speculative
    compile: bool = False
    compile_prefill: bool = False
    layers_per_graph: int | None = None
    recalibrate: bool = False  # adaptive strategies: measure the step costs again (else read the cache)
    kv_cache_dtype: str = "auto"  # one of KV_CACHE_DTYPES

    def __post_init__(self):
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"--kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.compile_prefill and not self.compile:
            raise ValueError("--compile_prefill needs --compile")
        if self.layers_per_graph is not None:
            if not self.compile:
                raise ValueError("--layers_per_graph needs --compile")
            if self.layers_per_graph < 0:
                raise ValueError(f"--layers_per_graph must be >= 0 (0: whole-step graphs), got {self.layers_per_graph}")
        self.strategy.check_draft(separate=self.draft_checkpoint is not None)
        if self.quantize:
            try:
                parse_quantize(self.quantize)
            except SchemeError as e:
                raise SchemeError(f"--quantize: {e}") from None

    @property
    def quantize_mode(self) -> tuple[str, int] | None:
        """--quantize as (mode, groupsize), or None."""
        return parse_quantize(self.quantize) if self.quantize else None


def check_options(p, a) -> EngineConfig:
    """Every check the options allow before anything is loaded; the engine's configuration.
    Errors end as parser errors (usage, exit 2)."""
    try:
        if a.max_new_tokens < 1:
            raise ValueError("--max_new_tokens must be >= 1")
        auto_exit, auto_k = a.exit_layer == "auto", a.num_speculations == "auto"
        strategy = Strategy(a.generation_strategy, None if auto_exit else a.exit_layer,
                            AUTO_MAX_SPECULATIONS if auto_k else a.num_speculations, a.draft_quantize,
                            auto_exit=auto_exit and a.draft_quantize is None, auto_k=auto_k,
                            draft_source=a.draft_source, ngram_tokens=a.ngram_tokens)
        if auto_exit and a.draft_quantize is not None:
            note("--exit_layer auto with --draft_quantize: the copy drafts with every layer (the adaptive exit "
                 "chooses among the model's own layers; --num_speculations auto still chooses k)")
        return EngineConfig(a.checkpoint_path, a.hf_token, a.device, a.dtype, a.quantize, strategy, sampling_params(a),
                            a.draft_checkpoint_path, a.compile, a.compile_prefill, a.layers_per_graph, a.recalibrate,
                            a.kv_cache_dtype)
    except ValueError as e:  # the checks' messages name the flags
        p.error(str(e))


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
