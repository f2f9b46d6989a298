"""Generate text with a converted Llama checkpoint.

    python generate.py --prompt "Hello, my name is"        # the default model, on CPU
    python generate.py --interactive --compile              # chat, streamed
    python generate.py --checkpoint_path checkpoints/meta-llama/Llama-2-7b-hf --compile --device cuda
    python generate.py --generation_strategy self_speculative --exit_layer 8 --num_speculations 6 --compile
    python generate.py --quantize int8 --compile            # weights quantized in memory at load
    python generate.py --prompt "Hi" --prompt "Bye" --prompt_file prompts.txt --batch_size 4   # batched
    torchrun --standalone --nproc_per_node=2 generate.py --compile      # tensor parallel (tp.py)
    torchrun generate.py --model facebook/layerskip-llama2-7B --sample True --max_steps 512 \\
        --generation_strategy self_speculative --exit_layer 8 --num_speculations 6   # LayerSkip's spelling

The model, decoding and sampling options are shared with every command (options.py).
"""
import contextlib
import itertools
import json
import re
import sys
import time
from pathlib import Path

import cli

cli.start(__name__)  # first: a Ctrl-C during the imports below is `interrupted` too (cli.py)

import torch  # noqa: E402

from engine import cache_size, init_distributed, load_engine, weight_bytes  # noqa: E402
import options  # noqa: E402
from decoding import peak_memory_gb  # noqa: E402
from steps import synchronize  # noqa: E402
import tp  # noqa: E402


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


DEFAULT_PROMPT = "Hello, my name is"
DEFAULT_MAX_BATCH = 8  # --batch_size's default cap: rows beyond it cost cache memory for little more speed


def random_prompt_length(args, text: str) -> int | None:
    """--prompt N, in ASCII digits and without --chat, asks for a random prompt of N tokens (for timing)."""
    return int(text) if not args.chat and re.fullmatch("[0-9]+", text) else None


def encode_prompt(args, text: str, tokenizer, device, index: int = 0):
    """The ids of one prompt; a random prompt (--prompt N) draws from seed + its index among the prompts."""
    n = random_prompt_length(args, text)
    if n is not None:
        g = torch.Generator().manual_seed(args.seed + index)
        return torch.randint(0, tokenizer.vocab_size, (n,), generator=g).to(device)
    if args.chat:
        ids = tokenizer.encode_chat([*system_message(args), {"role": "user", "content": text}])
    else:
        ids = tokenizer.encode(text)
    return torch.tensor(ids, dtype=torch.long, device=device)


def read_prompt_file(path: Path) -> list[str]:
    """One prompt per line (blank lines skipped), or JSON lines, each an object with a "prompt" string."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--prompt_file {path}: cannot read it ({e.strerror or e})") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"--prompt_file {path}, line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(record.get("prompt"), str):
                raise ValueError(f"--prompt_file {path}, line {n}: a JSON line needs a \"prompt\" string")
            prompts.append(record["prompt"])
        else:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"--prompt_file {path} holds no prompt")
    return prompts


def system_message(args):
    return [{"role": "system", "content": args.system}] if args.system else []


def parse_args(argv=None):
    """(flags, EngineConfig, the prompts' texts, rows generated at once)."""
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--prompt", action="append", default=None,
                   help=f"prompt text, or an integer N (ASCII digits) for a random prompt of N tokens; repeat it for "
                        f"several prompts, generated as a batch (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--prompt_file", type=Path, default=None,
                   help="prompts to generate as a batch (after any --prompt): one per line, or JSON lines with a "
                        "\"prompt\" field")
    p.add_argument("--batch_size", type=int, default=None,
                   help=f"sequences generated at once (default: the number of prompts, at most {DEFAULT_MAX_BATCH}); "
                        "further prompts wait for a free row")
    p.add_argument("--chat", action="store_true", help="wrap --prompt in the model's chat template and print "
                   "the reply")
    p.add_argument("--system", default=None, help="system message for --chat and --interactive")
    p.add_argument("--interactive", action="store_true", help="chat loop with streamed output")
    p.add_argument("--num_samples", type=int, default=1, help="generations of the same prompt (5 for timing)")
    p.add_argument("--max_seq_length", type=int, default=None,
                   help="KV cache size (default: prompt + max_new_tokens; 2048 in --interactive)")
    p.add_argument("--profile", type=Path, default=None, help="write a torch.profiler trace of the last sample here")
    options.add_options(p, sampling_temperature=options.GENERATION_TEMPERATURE)
    args = p.parse_args(argv)
    config = options.check_options(p, args)
    if args.num_samples < 1:
        p.error("--num_samples must be >= 1")
    if args.max_seq_length is not None and args.max_seq_length < 2:
        p.error("--max_seq_length must be >= 2")
    if args.system is not None and not (args.chat or args.interactive):
        p.error("--system needs --chat or --interactive")
    try:
        prompts = (args.prompt or []) + (read_prompt_file(args.prompt_file) if args.prompt_file else [])
    except ValueError as e:
        p.error(str(e))
    prompts = prompts or [DEFAULT_PROMPT]
    if any(random_prompt_length(args, t) == 0 for t in prompts):
        p.error("--prompt 0 asks for a random prompt of 0 tokens; give text or a length >= 1")
    if args.interactive and (len(prompts) > 1 or args.batch_size is not None):
        p.error("--interactive is one conversation: it takes no --prompt_file, several --prompt or --batch_size")
    if args.batch_size is not None and args.batch_size < 1:
        p.error(f"--batch_size must be >= 1, got {args.batch_size}")
    batch_size = args.batch_size or min(len(prompts), DEFAULT_MAX_BATCH)
    if args.profile is not None:
        try:
            cli.check_output_file(args.profile, "--profile")
        except (ValueError, OSError) as e:
            p.error(str(e))
    return args, config, prompts, batch_size


def check_prompt(args, prompts, strategy, tokenizer, model_args):
    """What the tokenizer and the model's context refuse, before any weight is read."""
    if args.interactive and tokenizer.chat_format is None:
        raise ValueError("this tokenizer has no chat format; --interactive needs an instruct model's tokenizer")
    if not args.interactive:
        for i, text in enumerate(prompts):
            n = random_prompt_length(args, text)
            try:
                length = n if n is not None else len(encode_prompt(args, text, tokenizer, "cpu"))
                cache_size(length, args.max_new_tokens, strategy, model_args.max_position_embeddings,
                           args.max_seq_length)
            except ValueError as e:
                raise ValueError(f"prompt {i + 1} of {len(prompts)}: {e}" if len(prompts) > 1 else str(e)) \
                    from None


def speculation_summary(stats) -> str:
    if not stats.rounds:
        return ""
    return (f"; acceptance rate {stats.acceptance_rate:.1%}, {stats.tokens_per_round:.2f} tokens/round over "
            f"{stats.rounds} rounds, accepted-length histogram {stats.accepted_histogram}, "
            f"draft {stats.draft_share:.0%} / verify {1 - stats.draft_share:.0%} of round time"
            + (f"; chosen per round: {stats.chosen}, drafting stopped early in {stats.early_stops} rounds"
               if stats.adaptive else "")
            + (f"; draft sources: {stats.sources}" if stats.sources else ""))


def printable(tokenizer, ids: list[int]) -> str:
    """The text of ids without a final stop token (its markup, e.g. <|im_end|>, is not part of the reply)."""
    return tokenizer.decode(ids[:-1] if ids and ids[-1] in tokenizer.stop_ids else ids)


def run_samples(args, engine, texts: list[str], batch_size: int):
    tokenizer, device = engine.tokenizer, engine.device
    prompts = [encode_prompt(args, text, tokenizer, device, i) for i, text in enumerate(texts)]
    rows = min(batch_size, len(prompts))
    engine.setup_caches_for([len(p) for p in prompts], args.max_new_tokens, rows, size=args.max_seq_length)
    bytes_per_token = weight_bytes(engine.model, per_token=True)
    single = len(prompts) == 1
    # A compiled run starts with one untimed generation: it pays for compilation.
    samples = itertools.chain([None] if args.compile else [], range(args.num_samples))
    for i in samples:
        torch.manual_seed(args.seed + (i or 0))
        profiling = args.profile is not None and i == args.num_samples - 1
        prof = torch.profiler.profile() if profiling else contextlib.nullcontext()
        t0 = time.perf_counter()
        with prof:
            if i is None:
                engine.warm_up([p.tolist() for p in prompts], args.max_new_tokens, many=not single)
            elif single:
                tokens, stats = engine.run(prompts[0], args.max_new_tokens)
                outputs = [tokens[0, len(prompts[0]):].tolist()]
            else:
                seqs, batch = engine.run_many([p.tolist() for p in prompts], args.max_new_tokens)
                outputs = [s.tokens for s in seqs]
        synchronize(device)
        if i is None:
            print(f"Compilation time: {time.perf_counter() - t0:.2f} s", file=sys.stderr)
            continue
        if profiling:
            prof.export_chrome_trace(str(args.profile))
            print(f"Profile written to {args.profile}", file=sys.stderr)
        for n, (text, prompt, ids) in enumerate(zip(texts, prompts, outputs)):
            if not single:
                print(f"--- prompt {n + 1} of {len(prompts)}")
            if args.chat:  # the user's message as typed, not the chat template around it
                print(f"user: {text}")
                print(f"assistant: {printable(tokenizer, ids).strip()}")
            else:
                print(printable(tokenizer, prompt.tolist() + ids))
        if single:
            print(f"Sample {i + 1}: {stats.new_tokens} tokens in {stats.total_s:.2f} s: {stats.tokens_per_s:.2f} "
                  f"tokens/s (decode {stats.decode_tokens_per_s:.2f} tokens/s, {1000 / stats.decode_tokens_per_s:.1f} "
                  f"ms/token; prefill {stats.prompt_tokens} tokens in {stats.prefill_s * 1000:.0f} ms), "
                  f"bandwidth {bytes_per_token * stats.decode_tokens_per_s / 1e9:.2f} GB/s, "
                  f"peak memory {peak_memory_gb(device):.2f} GB{speculation_summary(stats)}", file=sys.stderr)
        else:
            print(f"Sample {i + 1}: {len(prompts)} prompts, {batch.max_rows} at a time: {batch.new_tokens} tokens in "
                  f"{batch.wall_s:.2f} s: {batch.tokens_per_s:.2f} tokens/s in all"
                  f"{f' over {batch.steps} steps' if batch.max_rows > 1 else ''}"
                  f"{f', acceptance rate {batch.acceptance_rate:.1%}' if batch.drafted else ''}"
                  f"{f', rounds {batch.chosen}' if batch.chosen else ''}"
                  f"{f', draft sources: {batch.sources}' if batch.sources else ''}, peak memory {peak_memory_gb(device):.2f} GB",
                  file=sys.stderr)


def chat_loop(args, engine):
    tokenizer, model = engine.tokenizer, engine.model
    engine.setup_caches(args.max_seq_length or min(2048, model.args.max_position_embeddings))
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
        prompt = torch.tensor(tokenizer.encode_chat(messages), dtype=torch.long, device=engine.device)
        budget = engine.budget(len(prompt), args.max_new_tokens)
        if budget < 1:
            print("[the conversation fills the KV cache; starting a new one]", file=sys.stderr)
            messages = system_message(args) + [messages[-1]]
            prompt = torch.tensor(tokenizer.encode_chat(messages), dtype=torch.long, device=engine.device)
            budget = engine.budget(len(prompt), args.max_new_tokens)
            if budget < 1:
                print("[this message alone is longer than the KV cache]", file=sys.stderr)
                messages.pop()
                continue
        tokens, stats = engine.run(prompt, budget, on_tokens=StreamPrinter(tokenizer))
        reply_ids = [t for t in tokens[0, len(prompt):].tolist() if t not in tokenizer.stop_ids]
        messages.append({"role": "assistant", "content": tokenizer.decode(reply_ids)})
        print(f"\n[{stats.new_tokens} tokens, {stats.tokens_per_s:.1f} tokens/s{speculation_summary(stats)}]",
              file=sys.stderr)


def main(argv=None):
    args, config, prompts, batch_size = parse_args(argv)
    with tp.command_scope():
        rank, world_size, config = init_distributed(config)
        engine = load_engine(config, rank, world_size, check=lambda meta, tokenizer: check_prompt(
            args, prompts, config.strategy, tokenizer, meta["args"]))
        if args.interactive:
            chat_loop(args, engine)
        else:
            run_samples(args, engine, prompts, batch_size)


if __name__ == "__main__":
    cli.run(main, label=tp.error_label)
