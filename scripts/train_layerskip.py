"""Continue training a converted checkpoint with the LayerSkip recipe, so its early layers predict
what the last layer will say (and self-speculation accepts more drafts).

    python scripts/train_layerskip.py --checkpoint_path checkpoints/SmolLM2-135M-Instruct \\
        --output_dir checkpoints/SmolLM2-135M-layerskip --steps 200 --batch_size 8 --seq_len 256
    python scripts/train_layerskip.py ... --data my_corpus.txt more.jsonl     # your own text
    python scripts/train_layerskip.py ... --resume                            # continue a stopped run

The recipe (Elhoushi et al., 2024, "LayerSkip"), in plain PyTorch on `model.Transformer`:
- layer dropout: layer l of L is skipped (its input passed through unchanged) with probability
  p_max * D(l) * S(t), D(l) = 2^(l/(L-1)) - 1 rising from 0 (first layer) to 1 (last), and S(t) a
  curriculum over steps (`--dropout_curriculum`: constant 1, or exponential 2^(t/T) - 1);
  a skip is drawn per layer per micro-batch;
- early-exit loss: the model's own final norm + shared LM head applied after layer l, its
  cross-entropy weighted by e_scale * sum_{i<=l} i (plus 1 for the last layer), normalised to sum 1
  over the exits active at step t, so deeper exits weigh more; the exit curriculum
  (`--exit_curriculum`) is every layer, or a rotating one that enables every R-th layer, shifted by
  one each step (the last layer is always on);
- optional self-distillation (`--distill_weight`): KL(last layer || exit l) on the same positions,
  which directly raises the draft's agreement with the verifier, i.e. the acceptance rate.

AdamW with warm-up and cosine decay, gradient accumulation, bf16 autocast on CUDA, a checkpoint
(model, optimiser, step, RNG and data position) every --save_every steps that --resume continues
bit-for-bit, a progress bar with the loss per exit, and the result in our checkpoint format, which
generate.py loads directly.

Default data, with nothing to download: the source files of this Python's standard library
(sysconfig's `stdlib` path): present on every machine, large (tens of millions of tokens), and
code, like the HumanEval prompts the speed-up is measured on. Files are split into train and
held-out sets by a hash of their path.
"""
import hashlib
import json
import math
import os
import random
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import cli  # noqa: E402

cli.start(__name__)  # first: a Ctrl-C during the imports below is `interrupted` too (cli.py)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# --- schedules (pure functions, unit-tested) ---


def layer_dropout_probs(n_layers: int, step: int, total_steps: int, p_max: float, curriculum: str) -> list[float]:
    """Skip probability of each layer at this step: p_max * D(l) * S(t)."""
    if curriculum == "constant":
        s = 1.0
    elif curriculum == "exponential":
        s = 2 ** (step / max(total_steps, 1)) - 1
    else:
        raise ValueError(f"unknown dropout curriculum {curriculum!r}")
    if n_layers == 1:
        return [0.0]
    return [p_max * (2 ** (l / (n_layers - 1)) - 1) * s for l in range(n_layers)]


def active_exits(n_layers: int, step: int, curriculum: str, rotation: int) -> list[int]:
    """Layers whose early-exit loss is on at this step (the last layer always is)."""
    if curriculum == "all":
        return list(range(n_layers))
    if curriculum == "rotational":
        return sorted({l for l in range(n_layers - 1) if (l + step) % rotation == 0} | {n_layers - 1})
    if curriculum == "none":
        return [n_layers - 1]
    raise ValueError(f"unknown exit curriculum {curriculum!r}")


def exit_weights(n_layers: int, exits: list[int], e_scale: float) -> dict[int, float]:
    """Normalised loss weight of each active exit: grows with depth (sum of layer indices)."""
    raw = {}
    for l in exits:
        tri = l * (l + 1) / 2  # sum_{i<=l} i
        raw[l] = e_scale * tri + (1.0 if l == n_layers - 1 else 0.0)
    total = sum(raw.values())
    return {l: w / total for l, w in raw.items()}


# --- data ---


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)


def read_texts(paths: list[Path]) -> list[tuple[str, str]]:
    """(name, text) per document: .jsonl lines (field text, or prompt + response), other files whole."""
    docs = []
    for path in paths:
        if path.suffix == ".jsonl":
            for i, line in enumerate(path.read_text(errors="replace").splitlines()):
                if line.strip():
                    row = json.loads(line)
                    docs.append((f"{path}:{i}", row["text"] if "text" in row else row["prompt"] + row["response"]))
        else:
            docs.append((str(path), path.read_text(errors="replace")))
    return docs


def is_heldout(name: str, share: float) -> bool:
    return int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 2**32 < share


def token_stream(docs, tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    eos = tokenizer.eos_id
    ids = []
    for _, text in docs:
        ids += tokenizer.encode(text) + [eos]
        if max_tokens and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)


class Batches:
    """Random seq_len + 1 windows of a token stream, reproducible from (seed, position)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int):
        if len(tokens) < seq_len + 2:
            raise ValueError(f"the training text has {len(tokens)} tokens, fewer than --seq_len + 2")
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.position = 0

    def next(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.position)
        self.position += 1
        starts = torch.randint(0, len(self.tokens) - self.seq_len - 1, (self.batch_size,), generator=g)
        return torch.stack([self.tokens[s:s + self.seq_len + 1] for s in starts.tolist()])


# --- the loss ---


def layerskip_loss(model, batch: torch.Tensor, exits: list[int], weights: dict[int, float], drop: list[float],
                   distill_weight: float, rng: random.Random):
    """Weighted early-exit cross-entropies (+ distillation), with layer dropout; returns (loss, per-exit losses)."""
    x, y = batch[:, :-1], batch[:, 1:]
    n = model.args.n_layers
    h = model.embed(x)
    exit_logits = {}
    for l in range(n):
        if rng.random() >= drop[l]:
            h = model.run_layers(h, None, start=l, end=l + 1)
        if l in weights:
            exit_logits[l] = model.head(h).float()
    per_exit, loss = {}, 0.0
    last = exit_logits[n - 1]
    target_p = F.softmax(last.detach(), dim=-1) if distill_weight > 0 else None
    for l, logits in exit_logits.items():
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        per_exit[l] = ce.item()
        term = ce
        if distill_weight > 0 and l != n - 1:
            kl = F.kl_div(F.log_softmax(logits, -1), target_p, reduction="batchmean") / logits.shape[1]
            term = term + distill_weight * kl
        loss = loss + weights[l] * term
    return loss, per_exit


@torch.no_grad()
def evaluate(model, tokens: torch.Tensor, exit_layer: int, seq_len: int, max_windows: int = 8) -> dict:
    """Held-out loss of the last layer and of exit E, and their greedy agreement (the draft acceptance proxy)."""
    model.eval()
    n_win = min(max_windows, (len(tokens) - 1) // seq_len)
    if n_win < 1:
        raise ValueError("held-out text shorter than one window")
    last_loss = exit_loss = agree = count = 0.0
    for w in range(n_win):
        chunk = tokens[w * seq_len:(w + 1) * seq_len + 1][None].to(model.norm.weight.device)
        x, y = chunk[:, :-1], chunk[:, 1:]
        h_exit = model.run_layers(model.embed(x), None, end=exit_layer)
        h_last = model.run_layers(h_exit, None, start=exit_layer)
        le, ll = model.head(h_exit).float()[0], model.head(h_last).float()[0]
        exit_loss += F.cross_entropy(le, y[0], reduction="sum").item()
        last_loss += F.cross_entropy(ll, y[0], reduction="sum").item()
        agree += (le.argmax(-1) == ll.argmax(-1)).sum().item()
        count += y.numel()
    model.train()
    return {"last_loss": last_loss / count, "exit_loss": exit_loss / count, "agreement": agree / count,
            "last_ppl": math.exp(last_loss / count)}


# --- the run ---


def lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def save_state(path: Path, model, opt, step: int, batches: Batches, rng: random.Random):
    tmp = path.with_name(path.name + ".tmp")
    try:  # whole or absent, Ctrl-C included
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                    "data_position": batches.position, "rng": rng.getstate(), "torch_rng": torch.get_rng_state()}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def train(model, train_tokens, a, progress=True, state_path: Path | None = None, resume: bool = False,
          stop_after: int | None = None):
    """Runs a.steps optimiser steps (from a saved state with resume; stopping, with the state saved,
    after stop_after steps of this call when given). Returns the per-step log."""
    from tqdm import tqdm
    device = model.norm.weight.device
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=a.weight_decay, betas=(0.9, 0.95))
    batches = Batches(train_tokens, a.seq_len, a.batch_size, a.seed)
    rng = random.Random(a.seed)
    start = 0
    if resume and state_path is not None and state_path.is_file():
        st = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        start, batches.position = st["step"], st["data_position"]
        rng.setstate(st["rng"])
        torch.set_rng_state(st["torch_rng"])
    n = model.args.n_layers
    log = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    end = a.steps if stop_after is None else min(a.steps, start + stop_after)
    bar = tqdm(range(start, end), initial=start, total=a.steps, desc="layerskip", disable=not progress, file=sys.stderr)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, a.steps, a.lr, a.warmup)
        exits = active_exits(n, step, a.exit_curriculum, a.rotation)
        weights = exit_weights(n, exits, a.e_scale)
        drop = layer_dropout_probs(n, step, a.steps, a.layer_dropout, a.dropout_curriculum)
        opt.zero_grad(set_to_none=True)
        per_exit_sum = {}
        for _ in range(a.grad_accum):
            with autocast:
                loss, per_exit = layerskip_loss(model, batches.next().to(device), exits, weights, drop,
                                                a.distill_weight, rng)
            (loss / a.grad_accum).backward()
            for l, v in per_exit.items():
                per_exit_sum[l] = per_exit_sum.get(l, 0.0) + v / a.grad_accum
        torch.nn.utils.clip_grad_norm_(params, a.clip)
        opt.step()
        log.append({"step": step, "exits": per_exit_sum})
        bar.set_postfix({f"L{l}": f"{v:.2f}" for l, v in sorted(per_exit_sum.items())[-4:]})
        if state_path is not None and a.save_every and (step + 1) % a.save_every == 0:
            save_state(state_path, model, opt, step + 1, batches, rng)
    if state_path is not None:
        save_state(state_path, model, opt, end, batches, rng)
    model.eval()
    return log


def build_parser():
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint_path", type=Path, default=REPO / "checkpoints" / "SmolLM2-135M-Instruct")
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--data", type=Path, nargs="*", default=None, help="text files or JSONL (default: the Python stdlib)")
    p.add_argument("--max_train_tokens", type=int, default=2_000_000)
    p.add_argument("--heldout_share", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--layer_dropout", type=float, default=0.1, help="p_max, the last layer's skip probability")
    p.add_argument("--dropout_curriculum", default="exponential", choices=["constant", "exponential"])
    p.add_argument("--exit_curriculum", default="rotational", choices=["all", "rotational", "none"])
    p.add_argument("--rotation", type=int, default=4, help="rotational curriculum: every R-th layer")
    p.add_argument("--e_scale", type=float, default=1.0)
    p.add_argument("--distill_weight", type=float, default=0.0)
    p.add_argument("--eval_exit_layer", type=int, default=None, help="exit layer of the before/after report")
    p.add_argument("--save_every", type=int, default=50)
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/train_state.pt")
    p.add_argument("--stop_after", type=int, default=None,
                   help="stop after this many steps of this invocation (state saved; --resume goes on)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    return p


def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    if a.steps < 1 or a.batch_size < 1 or a.grad_accum < 1 or a.seq_len < 8:
        p.error("--steps, --batch_size, --grad_accum must be >= 1 and --seq_len >= 8")
    if not 0 <= a.layer_dropout < 1 or a.rotation < 1 or a.e_scale < 0 or a.distill_weight < 0:
        p.error("need 0 <= --layer_dropout < 1, --rotation >= 1, --e_scale >= 0, --distill_weight >= 0")
    for path in a.data or []:
        if not path.is_file():
            p.error(f"--data {path} does not exist")
    cli.check_output_dir(a.output_dir)
    from checkpoint import CheckpointError, load_model, read_metadata, resolve_checkpoint_path, save_checkpoint
    from tokenizer import load_tokenizer
    try:
        src = resolve_checkpoint_path(a.checkpoint_path)
        meta = read_metadata(src)
    except (FileNotFoundError, CheckpointError) as e:
        p.error(str(e))
    if meta["scheme"].get("mode", "none") != "none":
        p.error("train a float checkpoint, then quantize the result")
    n_layers = meta["config"]["num_hidden_layers"]
    eval_exit = a.eval_exit_layer or max(1, n_layers // 2)
    if not 1 <= eval_exit < n_layers:
        p.error(f"--eval_exit_layer must be in [1, {n_layers - 1}]")
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    torch.manual_seed(a.seed)
    tokenizer = load_tokenizer(src.parent)
    docs = read_texts(a.data or stdlib_files())
    train_docs = [d for d in docs if not is_heldout(d[0], a.heldout_share)]
    held_docs = [d for d in docs if is_heldout(d[0], a.heldout_share)] or docs[-1:]
    train_tokens = token_stream(train_docs, tokenizer, a.max_train_tokens)
    held_tokens = token_stream(held_docs, tokenizer, 16 * a.seq_len + 1)
    print(f"data: {len(train_docs)} documents, {len(train_tokens)} training tokens; {len(held_docs)} held out",
          file=sys.stderr)
    model = load_model(src, device, torch.float32, trainable=True)
    for prm in model.parameters():
        prm.requires_grad_(True)
    before = evaluate(model, held_tokens, eval_exit, a.seq_len)
    a.output_dir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    train(model, train_tokens, a, state_path=a.output_dir / "train_state.pt", resume=a.resume, stop_after=a.stop_after)
    seconds = time.perf_counter() - t
    after = evaluate(model, held_tokens, eval_exit, a.seq_len)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if model.args.tie_word_embeddings:
        state.pop("output.weight")
    save_checkpoint(state, meta["config"], a.output_dir / "checkpoint.safetensors")
    import shutil
    from convert_hf_checkpoint import TOKENIZER_FILES
    for name in ("config.json",) + TOKENIZER_FILES:
        if (src.parent / name).is_file():
            shutil.copyfile(src.parent / name, a.output_dir / name)
    report = {"before": before, "after": after, "exit_layer": eval_exit, "steps": a.steps,
              "tokens_seen": a.steps * a.grad_accum * a.batch_size * a.seq_len, "seconds": seconds,
              "config": {k: str(v) for k, v in vars(a).items()}}
    (a.output_dir / "train_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({"before": before, "after": after}))


if __name__ == "__main__":
    cli.run(main)
