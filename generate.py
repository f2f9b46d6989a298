"""Generate text with a converted Llama checkpoint.

    python generate.py --prompt "Hello, my name is"        # the default model, on CPU
    python generate.py --interactive --compile              # chat, streamed
    python generate.py --checkpoint_path checkpoints/meta-llama/Llama-2-7b-hf --compile --device cuda
"""
import argparse
import contextlib
import itertools
import sys
import time
from pathlib import Path

import torch

from checkpoint import CheckpointError, load_model, resolve_checkpoint_path
from decoding import compile_steps, decode_one_token, generate, peak_memory_gb, prefill, synchronize, \
    weight_bytes_per_token
from sampling import SamplingParams
from tokenizer import load_tokenizer

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "SmolLM2-135M-Instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but CUDA is not available on this machine")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


class StreamPrinter:
    """Prints text as tokens arrive; holds back a partial UTF-8 character until it completes."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.tokenizer, self.out, self.ids, self.printed = tokenizer, out, [], ""

    def __call__(self, token):
        self.ids.append(int(token[0, 0]))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text


def encode_prompt(args, tokenizer, device):
    if args.prompt.isdigit():
        g = torch.Generator().manual_seed(args.seed)
        return torch.randint(0, tokenizer.vocab_size, (int(args.prompt),), generator=g).to(device)
    if args.chat:
        ids = tokenizer.encode_chat([*system_message(args), {"role": "user", "content": args.prompt}])
    else:
        ids = tokenizer.encode(args.prompt)
    return torch.tensor(ids, dtype=torch.long, device=device)


def system_message(args):
    return [{"role": "system", "content": args.system}] if args.system else []


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT,
                   help="converted checkpoint file, or its directory (default: SmolLM2-135M-Instruct, prepared on first use)")
    p.add_argument("--prompt", default="Hello, my name is",
                   help="prompt text, or an integer N for a random prompt of N tokens")
    p.add_argument("--chat", action="store_true", help="wrap --prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message for --chat and --interactive")
    p.add_argument("--interactive", action="store_true", help="chat loop with streamed output")
    p.add_argument("--num_samples", type=int, default=5)
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--max_seq_length", type=int, default=None,
                   help="KV cache size (default: prompt + max_new_tokens; 2048 in --interactive)")
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
    try:
        args.sampling = SamplingParams(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        p.error(str(e))
    return args


def load(args):
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    if args.checkpoint_path == DEFAULT_CHECKPOINT and not (DEFAULT_CHECKPOINT / "checkpoint.safetensors").is_file():
        print("The default model is not prepared yet; preparing it (python scripts/prepare_smollm2.py) ...",
              file=sys.stderr)
        sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
        from prepare_smollm2 import prepare
        prepare(DEFAULT_CHECKPOINT)
    path = resolve_checkpoint_path(args.checkpoint_path)
    t0 = time.perf_counter()
    model = load_model(path, device, dtype)
    tokenizer = load_tokenizer(path.parent)
    print(f"Loaded {path} ({dtype}, {device}) in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    return model, tokenizer, device


def run_samples(args, model, tokenizer, device, steps):
    prompt = encode_prompt(args, tokenizer, device)
    model.setup_caches(1, args.max_seq_length or len(prompt) + args.max_new_tokens)
    bytes_per_token = weight_bytes_per_token(model)
    # A compiled run starts with one untimed generation: it pays for compilation.
    samples = itertools.chain([None] if args.compile else [], range(args.num_samples))
    for i in samples:
        torch.manual_seed(args.seed + (i or 0))
        profiling = args.profile is not None and i == args.num_samples - 1
        prof = torch.profiler.profile() if profiling else contextlib.nullcontext()
        t0 = time.perf_counter()
        with prof:
            tokens, stats = generate(model, prompt, args.max_new_tokens, args.sampling,
                                     stop_ids=tokenizer.stop_ids, prefill_fn=steps[0], decode_fn=steps[1])
        synchronize(device)
        if i is None:
            print(f"Compilation time: {time.perf_counter() - t0:.2f} s", file=sys.stderr)
            continue
        if profiling:
            prof.export_chrome_trace(str(args.profile))
            print(f"Profile written to {args.profile}", file=sys.stderr)
        print(tokenizer.decode(tokens[0].tolist()))
        print(f"Sample {i + 1}: {stats.new_tokens} tokens in {stats.total_s:.2f} s: {stats.tokens_per_s:.2f} tokens/s "
              f"(decode {stats.decode_tokens_per_s:.2f} tokens/s, {1000 / stats.decode_tokens_per_s:.1f} ms/token; "
              f"prefill {stats.prompt_tokens} tokens in {stats.prefill_s * 1000:.0f} ms), "
              f"bandwidth {bytes_per_token * stats.decode_tokens_per_s / 1e9:.2f} GB/s, "
              f"peak memory {peak_memory_gb(device):.2f} GB", file=sys.stderr)


def chat_loop(args, model, tokenizer, device, steps):
    if tokenizer.chat_format is None:
        raise ValueError("this tokenizer has no chat format; --interactive needs an instruct model")
    model.setup_caches(1, args.max_seq_length or min(2048, model.args.max_position_embeddings))
    messages = system_message(args)
    print("Chat with the model; an empty line or Ctrl-D ends it.", file=sys.stderr)
    while True:
        try:
            text = input("> ")
        except EOFError:
            break
        if not text.strip():
            break
        messages.append({"role": "user", "content": text})
        prompt = torch.tensor(tokenizer.encode_chat(messages), dtype=torch.long, device=device)
        budget = model.max_seq_length - len(prompt)
        if budget < 1:
            print("[the conversation fills the KV cache; starting a new one]", file=sys.stderr)
            messages = system_message(args) + [messages[-1]]
            prompt = torch.tensor(tokenizer.encode_chat(messages), dtype=torch.long, device=device)
            budget = model.max_seq_length - len(prompt)
            if budget < 1:
                print("[this message alone is longer than the KV cache]", file=sys.stderr)
                messages.pop()
                continue
        printer = StreamPrinter(tokenizer)
        tokens, stats = generate(model, prompt, min(args.max_new_tokens, budget), args.sampling,
                                 stop_ids=tokenizer.stop_ids, on_token=printer,
                                 prefill_fn=steps[0], decode_fn=steps[1])
        reply_ids = [t for t in tokens[0, len(prompt):].tolist() if t not in tokenizer.stop_ids]
        messages.append({"role": "assistant", "content": tokenizer.decode(reply_ids)})
        print(f"\n[{stats.new_tokens} tokens, {stats.tokens_per_s:.1f} tokens/s]", file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    try:
        model, tokenizer, device = load(args)
        steps = compile_steps(device, args.compile_prefill) if args.compile else (prefill, decode_one_token)
        if args.interactive:
            chat_loop(args, model, tokenizer, device, steps)
        else:
            run_samples(args, model, tokenizer, device, steps)
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
