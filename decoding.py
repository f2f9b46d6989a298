"""Decoding loops over the model's API: prefill, then one token at a time."""
import resource
import time
from dataclasses import dataclass

import torch

from model import Transformer
from sampling import SamplingParams, sample


def prefill(model: Transformer, x: torch.Tensor, input_pos: torch.Tensor, params: SamplingParams):
    """Runs the prompt x [B, T] at positions input_pos [T]; returns the first new token [B, 1]."""
    logits = model(x, input_pos)
    return sample(logits[:, -1], params)


def decode_one_token(model: Transformer, x: torch.Tensor, input_pos: torch.Tensor, params: SamplingParams):
    """One step: token x [B, 1] at position input_pos [1] -> next token [B, 1]."""
    logits = model(x, input_pos)
    return sample(logits[:, -1], params)


def configure_inductor(device: torch.device):
    """Inductor settings that measured fastest for our decode step (see BENCHMARKS.md)."""
    import torch._inductor.config as cfg
    if device.type == "cuda":
        cfg.coordinate_descent_tuning = True
        cfg.triton.unique_kernel_names = True
    cfg.fx_graph_cache = True


def compile_steps(device: torch.device, compile_prefill: bool = False):
    """The decode step as one fixed-shape graph (CUDA graphs on CUDA) and, if asked, the prefill
    compiled with dynamic shapes. Returns (prefill_fn, decode_fn)."""
    configure_inductor(device)
    mode = "reduce-overhead" if device.type == "cuda" else None
    decode_fn = torch.compile(decode_one_token, mode=mode, fullgraph=True)
    prefill_fn = torch.compile(prefill, fullgraph=True, dynamic=True) if compile_prefill else prefill
    return prefill_fn, decode_fn


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced by the decode loop (all but the prefill's token) per second of decoding."""
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 else float("nan")


def check_fits(model: Transformer, prompt_len: int, max_new_tokens: int):
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompt_len < 1:
        raise ValueError("the prompt is empty")
    need = prompt_len + max_new_tokens
    if need > model.max_seq_length:
        raise ValueError(f"the prompt ({prompt_len} tokens) plus max_new_tokens ({max_new_tokens}) needs {need} "
                         f"positions but the KV cache holds {model.max_seq_length}; shorten the prompt, lower "
                         "max_new_tokens or set up a larger cache")


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, params: SamplingParams,
             stop_ids=(), on_token=None, prefill_fn=prefill, decode_fn=decode_one_token):
    """Autoregressive generation from prompt [T] or [B, T].

    Returns (tokens [B, T + n], stats) with n <= max_new_tokens: it stops early once every row has
    produced one of stop_ids (that token is kept). on_token(tokens [B, 1]) is called after each step.
    """
    if prompt.dim() == 1:
        prompt = prompt[None]
    bsz, T = prompt.shape
    check_fits(model, T, max_new_tokens)
    if bsz > model.max_batch_size:
        raise ValueError(f"batch of {bsz} exceeds the cache's max_batch_size={model.max_batch_size}")
    device = prompt.device
    stop = torch.tensor(sorted(stop_ids), dtype=prompt.dtype, device=device)
    done = torch.zeros(bsz, dtype=torch.bool, device=device)

    t0 = time.perf_counter()
    cur = prefill_fn(model, prompt, torch.arange(T, device=device), params)
    out = [cur]
    synchronize(device)
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
            cur = decode_fn(model, cur, input_pos, params).clone()
        input_pos += 1
        out.append(cur)
        if on_token:
            on_token(cur)
    synchronize(device)
    t2 = time.perf_counter()
    tokens = torch.cat([prompt] + out, dim=1)
    return tokens, GenerationStats(T, len(out), t1 - t0, t2 - t1)


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every parameter once, except that an untied
    embedding table contributes only the rows looked up (negligible)."""
    params = {p.data_ptr(): p for p in model.parameters()}
    total = sum(p.numel() * p.element_size() for p in params.values())
    if not model.args.tie_word_embeddings:
        total -= model.tok_embeddings.weight.numel() * model.tok_embeddings.weight.element_size()
    return total


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB
