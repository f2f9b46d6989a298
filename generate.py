"""Generate text with a converted Llama checkpoint.

    python generate.py --prompt "Hello, my name is"        # the default model, on CPU
    python generate.py --interactive --compile              # chat, streamed
    python generate.py --checkpoint_path checkpoints/meta-llama/Llama-2-7b-hf --compile --device cuda
    python generate.py --generation_strategy self_speculative --exit_layer 8 --num_speculations 6 --compile
    torchrun --standalone --nproc_per_node=2 generate.py --compile      # tensor parallel (tp.py)
"""
import contextlib
import itertools
import os
import re
import sys
import time
from pathlib import Path

import torch

import cli
from checkpoint import load_model, read_metadata, resolve_checkpoint_path
from decoding import (Steps, check_num_speculations, compile_steps, generate, peak_memory_gb, speculative_generate,
                      synchronize, weight_bytes_per_token)
from sampling import SamplingParams
import tp
from tokenizer import load_tokenizer

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "SmolLM2-135M-Instruct"
STRATEGIES = ("autoregressive", "self_speculative", "speculative")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def pick_dtype(name: str, device: torch.device, quantized: bool = False, strategy: str = "autoregressive"):
    """The compute dtype, with a one-line note where a choice is slow on this machine (BENCHMARKS.md)."""
    slow_quantized = ("PyTorch's CPU int8/int4 kernels are 3x (AVX-512 BF16 CPUs) to 20x (AVX2 CPUs) slower with "
                      "float32 activations than with bfloat16")
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        if quantized and strategy == "autoregressive":
            note(f"quantized weights on CPU compute in bfloat16 ({slow_quantized}); --dtype float32 forces float32")
            return torch.bfloat16
        name = "float32"
    dtype = DTYPES[name]
    if device.type == "cpu" and quantized and dtype == torch.float32:
        note(f"quantized weights with float32 activations decode slowly ({slow_quantized}); float32 keeps greedy "
             "self-speculation token-for-token equal to greedy decoding, --dtype bfloat16 is faster")
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


class StreamPrinter:
    """Prints text as tokens arrive, without stop tokens (end-of-turn markup); holds back a partial
    UTF-8 character until it completes."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.tokenizer, self.out, self.ids, self.printed = tokenizer, out, [], ""

    def __call__(self, ids: list[int]):
        self.ids += [i for i in ids if i not in self.tokenizer.stop_ids]
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text


def random_prompt_length(args) -> int | None:
    """--prompt N, in ASCII digits and without --chat, asks for a random prompt of N tokens (for timing)."""
    return int(args.prompt) if not args.chat and re.fullmatch("[0-9]+", args.prompt) else None


def encode_prompt(args, tokenizer, device):
    n = random_prompt_length(args)
    if n is not None:
        g = torch.Generator().manual_seed(args.seed)
        return torch.randint(0, tokenizer.vocab_size, (n,), generator=g).to(device)
    if args.chat:
        ids = tokenizer.encode_chat([*system_message(args), {"role": "user", "content": args.prompt}])
    else:
        ids = tokenizer.encode(args.prompt)
    return torch.tensor(ids, dtype=torch.long, device=device)


def system_message(args):
    return [{"role": "system", "content": args.system}] if args.system else []


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT,
                   help="converted checkpoint file, or its directory (default: SmolLM2-135M-Instruct, prepared on first use)")
    p.add_argument("--prompt", default="Hello, my name is",
                   help="prompt text, or an integer N (ASCII digits) for a random prompt of N tokens")
    p.add_argument("--chat", action="store_true", help="wrap --prompt in the model's chat template and print "
                   "the reply")
    p.add_argument("--system", default=None, help="system message for --chat and --interactive")
    p.add_argument("--interactive", action="store_true", help="chat loop with streamed output")
    p.add_argument("--num_samples", type=int, default=1, help="generations of the same prompt (5 for timing)")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--max_seq_length", type=int, default=None,
                   help="KV cache size (default: prompt + max_new_tokens; 2048 in --interactive)")
    p.add_argument("--generation_strategy", default="autoregressive", choices=STRATEGIES,
                   help="autoregressive (with --exit_layer: early-exit inference), self_speculative (LayerSkip: "
                        "draft with the first --exit_layer layers, verify with the rest), or speculative "
                        "(a separate --draft_checkpoint_path model drafts)")
    p.add_argument("--exit_layer", type=int, default=None, help="E: layers [0, E) draft / produce tokens")
    p.add_argument("--num_speculations", type=int, default=3, help="k: draft tokens per speculative round")
    p.add_argument("--draft_checkpoint_path", type=Path, default=None, help="draft model for --generation_strategy "
                   "speculative (same tokenizer)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--compile", action="store_true", help="compile the decode step (CUDA graphs on CUDA)")
    p.add_argument("--compile_prefill", action="store_true", help="also compile the prefill, with dynamic shapes")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="weights and activations (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--profile", type=Path, default=None, help="write a torch.profiler trace of the last sample here")
    args = p.parse_args(argv)
    for name in ("num_samples", "max_new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.max_seq_length is not None and args.max_seq_length < 2:
        p.error("--max_seq_length must be >= 2")
    if args.compile_prefill and not args.compile:
        p.error("--compile_prefill needs --compile")
    strategy = args.generation_strategy
    if args.exit_layer is not None and args.exit_layer < 1:
        p.error(f"--exit_layer must be >= 1, got {args.exit_layer}")
    if strategy == "self_speculative" and args.exit_layer is None:
        p.error("--generation_strategy self_speculative needs --exit_layer")
    if strategy == "speculative" and args.draft_checkpoint_path is None:
        p.error("--generation_strategy speculative needs --draft_checkpoint_path")
    if strategy == "speculative" and args.exit_layer is not None:
        p.error("--exit_layer does not apply to --generation_strategy speculative (the draft model drafts)")
    if strategy != "speculative" and args.draft_checkpoint_path is not None:
        p.error("--draft_checkpoint_path needs --generation_strategy speculative")
    if args.system is not None and not (args.chat or args.interactive):
        p.error("--system needs --chat or --interactive")
    if random_prompt_length(args) == 0:
        p.error("--prompt 0 asks for a random prompt of 0 tokens; give text or a length >= 1")
    try:
        check_num_speculations(args.num_speculations)
        args.sampling = SamplingParams(args.temperature, args.top_k, args.top_p)
        if args.profile is not None:
            cli.check_output_file(args.profile, "--profile")
    except (ValueError, OSError) as e:
        p.error(str(e).replace("num_speculations", "--num_speculations", 1))
    return args


def prepare_default_model(world_size: int):
    if world_size > 1:  # ranks would race to write the same folder
        raise FileNotFoundError("the default model is not prepared yet: run `python scripts/prepare_smollm2.py` "
                                "once, then torchrun")
    print("The default model is not prepared yet; preparing it (python scripts/prepare_smollm2.py) ...",
          file=sys.stderr)
    sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
    import prepare_smollm2
    prepare_smollm2.prepare(DEFAULT_CHECKPOINT)


def check_before_loading(args, meta, tokenizer, world_size: int):
    """What the checkpoints' metadata and the tokenized prompt can refuse, before any weight is read."""
    n = meta["args"].n_layers
    if args.exit_layer is not None and args.exit_layer >= n:
        raise ValueError(f"--exit_layer must be in [1, {n - 1}] for this {n}-layer model, got {args.exit_layer}")
    metas = [meta]
    if args.draft_checkpoint_path is not None:
        draft = read_metadata(args.draft_checkpoint_path)
        if draft["args"].vocab_size != meta["args"].vocab_size:
            raise ValueError(f"the draft model's vocabulary ({draft['args'].vocab_size}) differs from the model's "
                             f"({meta['args'].vocab_size}); speculative decoding needs the same tokenizer")
        metas.append(draft)
    if world_size > 1:
        for m in metas:
            tp.check_shardable(m["args"], world_size, m["scheme"].get("groupsize") if m["scheme"]["mode"] == "int4"
                               else None)
    if args.interactive and tokenizer.chat_format is None:
        raise ValueError("this tokenizer has no chat format; --interactive needs an instruct model's tokenizer")
    if not args.interactive:
        n = random_prompt_length(args)
        cache_size(args, meta["args"], n if n is not None else len(encode_prompt(args, tokenizer, "cpu")))


def load(args, rank=0, world_size=1):
    device = pick_device(args.device)
    if args.checkpoint_path == DEFAULT_CHECKPOINT and not (DEFAULT_CHECKPOINT / "checkpoint.safetensors").is_file():
        prepare_default_model(world_size)
    path = resolve_checkpoint_path(args.checkpoint_path)
    meta = read_metadata(path)
    tokenizer = load_tokenizer(path.parent)
    check_before_loading(args, meta, tokenizer, world_size)
    dtype = pick_dtype(args.dtype, device, meta["scheme"]["mode"] != "none", args.generation_strategy)
    shard = (lambda m: tp.shard_model(m, rank, world_size)) if world_size > 1 else None
    t0 = time.perf_counter()
    model = load_model(path, device, dtype, prepare=shard)
    shards = f", tensor parallel over {world_size} ranks" if world_size > 1 else ""
    print(f"Loaded {path} ({dtype}, {device}{shards}) in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    draft_model = None
    if args.draft_checkpoint_path is not None:
        draft_model = load_model(resolve_checkpoint_path(args.draft_checkpoint_path), device, dtype, prepare=shard)
    return model, draft_model, tokenizer, device


def lookahead(args) -> int:
    """Cache positions a speculative round may write beyond the tokens it keeps (k, which
    speculative_generate caps at max_new_tokens)."""
    return 0 if args.generation_strategy == "autoregressive" else min(args.num_speculations, args.max_new_tokens)


def setup_caches(args, model, draft_model, size):
    for m in (model, draft_model):
        if m is not None:
            m.setup_caches(1, size)


def run_generation(args, model, draft_model, prompt, max_new_tokens, steps, stop_ids, on_tokens=None):
    """Dispatches to the chosen loop; on_tokens(list of ids) streams output."""
    if args.generation_strategy == "autoregressive":
        on_token = (lambda t: on_tokens([int(t)])) if on_tokens else None
        return generate(model, prompt, max_new_tokens, args.sampling, stop_ids=stop_ids, on_token=on_token,
                        steps=steps, exit_layer=args.exit_layer)
    return speculative_generate(model, prompt, max_new_tokens, args.sampling, args.num_speculations,
                                exit_layer=args.exit_layer, draft_model=draft_model, stop_ids=stop_ids,
                                on_tokens=on_tokens, steps=steps)


def speculation_summary(stats) -> str:
    if not stats.rounds:
        return ""
    return (f"; acceptance rate {stats.acceptance_rate:.1%}, {stats.tokens_per_round:.2f} tokens/round over "
            f"{stats.rounds} rounds, accepted-length histogram {stats.accepted_histogram}, "
            f"draft {stats.draft_share:.0%} / verify {1 - stats.draft_share:.0%} of round time")


def cache_size(args, model_args, prompt_len: int) -> int:
    """KV cache positions for a prompt of prompt_len tokens; a clear error where they do not fit."""
    if prompt_len < 1:
        raise ValueError("the prompt is empty; give some text")
    need = prompt_len + args.max_new_tokens + lookahead(args)
    context = model_args.max_position_embeddings
    what = f"the prompt ({prompt_len} tokens) plus --max_new_tokens ({args.max_new_tokens})"
    if lookahead(args):
        what += f" and {lookahead(args)} positions of speculation lookahead"
    if args.max_seq_length is not None:
        if args.max_seq_length > context:
            raise ValueError(f"--max_seq_length {args.max_seq_length} exceeds this model's context of {context}")
        if need > args.max_seq_length:
            raise ValueError(f"{what} needs {need} positions but the KV cache holds {args.max_seq_length} "
                             "(--max_seq_length)")
        return args.max_seq_length
    if need > context:
        raise ValueError(f"{what} needs {need} positions, more than this model's context of {context}; shorten "
                         "the prompt or lower --max_new_tokens")
    return need


def printable(tokenizer, ids: list[int]) -> str:
    """The text of ids without a final stop token (its markup, e.g. <|im_end|>, is not part of the reply)."""
    return tokenizer.decode(ids[:-1] if ids and ids[-1] in tokenizer.stop_ids else ids)


def run_samples(args, model, draft_model, tokenizer, device, steps):
    prompt = encode_prompt(args, tokenizer, device)
    setup_caches(args, model, draft_model, cache_size(args, model.args, len(prompt)))
    bytes_per_token = weight_bytes_per_token(model)
    if args.chat:  # the user's message as typed, not the chat template around it
        print(f"user: {args.prompt}")
    # A compiled run starts with one untimed generation: it pays for compilation.
    samples = itertools.chain([None] if args.compile else [], range(args.num_samples))
    for i in samples:
        torch.manual_seed(args.seed + (i or 0))
        profiling = args.profile is not None and i == args.num_samples - 1
        prof = torch.profiler.profile() if profiling else contextlib.nullcontext()
        t0 = time.perf_counter()
        with prof:
            tokens, stats = run_generation(args, model, draft_model, prompt, args.max_new_tokens, steps,
                                           tokenizer.stop_ids)
        synchronize(device)
        if i is None:
            print(f"Compilation time: {time.perf_counter() - t0:.2f} s", file=sys.stderr)
            continue
        if profiling:
            prof.export_chrome_trace(str(args.profile))
            print(f"Profile written to {args.profile}", file=sys.stderr)
        ids = tokens[0].tolist()
        if args.chat:
            print(f"assistant: {printable(tokenizer, ids[len(prompt):]).strip()}")
        else:
            print(printable(tokenizer, ids))
        print(f"Sample {i + 1}: {stats.new_tokens} tokens in {stats.total_s:.2f} s: {stats.tokens_per_s:.2f} tokens/s "
              f"(decode {stats.decode_tokens_per_s:.2f} tokens/s, {1000 / stats.decode_tokens_per_s:.1f} ms/token; "
              f"prefill {stats.prompt_tokens} tokens in {stats.prefill_s * 1000:.0f} ms), "
              f"bandwidth {bytes_per_token * stats.decode_tokens_per_s / 1e9:.2f} GB/s, "
              f"peak memory {peak_memory_gb(device):.2f} GB{speculation_summary(stats)}", file=sys.stderr)


def chat_loop(args, model, draft_model, tokenizer, device, steps):
    setup_caches(args, model, draft_model, args.max_seq_length or min(2048, model.args.max_position_embeddings))
    messages = system_message(args)
    print("Chat with the model; an empty line or Ctrl-D ends it.", file=sys.stderr)
    while True:
        try:
            text = input("> ") if tp.world()[0] == 0 else None
        except EOFError:
            text = ""
        if tp.world()[1] > 1:  # every rank runs the same generation on rank 0's input
            box = [text]
            torch.distributed.broadcast_object_list(box, src=0)
            text = box[0]
        if not text.strip():
            break
        messages.append({"role": "user", "content": text})
        prompt = torch.tensor(tokenizer.encode_chat(messages), dtype=torch.long, device=device)
        budget = model.max_seq_length - len(prompt) - lookahead(args)
        if budget < 1:
            print("[the conversation fills the KV cache; starting a new one]", file=sys.stderr)
            messages = system_message(args) + [messages[-1]]
            prompt = torch.tensor(tokenizer.encode_chat(messages), dtype=torch.long, device=device)
            budget = model.max_seq_length - len(prompt) - lookahead(args)
            if budget < 1:
                print("[this message alone is longer than the KV cache]", file=sys.stderr)
                messages.pop()
                continue
        tokens, stats = run_generation(args, model, draft_model, prompt, min(args.max_new_tokens, budget), steps,
                                       tokenizer.stop_ids, on_tokens=StreamPrinter(tokenizer))
        reply_ids = [t for t in tokens[0, len(prompt):].tolist() if t not in tokenizer.stop_ids]
        messages.append({"role": "assistant", "content": tokenizer.decode(reply_ids)})
        print(f"\n[{stats.new_tokens} tokens, {stats.tokens_per_s:.1f} tokens/s{speculation_summary(stats)}]",
              file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    try:
        rank, world_size, args.device = tp.init_from_env(args.device)
        if rank != 0:  # only rank 0 prints; errors still reach every rank's stderr (cli.run)
            sys.stdout = sys.stderr = open(os.devnull, "w")
        model, draft_model, tokenizer, device = load(args, rank, world_size)
        steps = compile_steps(device, args.compile_prefill) if args.compile else Steps()
        if args.interactive:
            chat_loop(args, model, draft_model, tokenizer, device, steps)
        else:
            run_samples(args, model, draft_model, tokenizer, device, steps)
    except torch.distributed.DistError as e:
        raise ConnectionError(f"a collective failed, most likely because another rank exited or timed out: "
                              f"{e}") from e
    finally:
        tp.shutdown()


if __name__ == "__main__":
    cli.run(main, label=tp.error_label)
