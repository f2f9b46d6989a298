"""Turning logits into tokens: temperature, top-k, top-p and the draw, shared by every decoding loop."""
import math
from dataclasses import dataclass

import torch

import cpu_kernels


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"--temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"--top_k must be >= 1 (None, or 0 on the command line: no top-k), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class RowParams:
    """A batch whose rows sample with settings of their own: rows[b] is row b's (greedy or not).
    sample and logits_to_probs take it in place of one SamplingParams for logits [B, ..., V]; rows
    with the same settings are drawn together (a server's batch holds a few kinds)."""
    rows: tuple

    @property
    def greedy(self) -> bool:
        return all(p.greedy for p in self.rows)

    def groups(self, device) -> list[tuple[SamplingParams, torch.Tensor]]:
        """(settings, the rows with them as an index tensor on device), each kind once."""
        by = {}
        for b, p in enumerate(self.rows):
            by.setdefault(p, []).append(b)
        return [(p, torch.tensor(rows, device=device)) for p, rows in by.items()]


def logits_to_probs(logits: torch.Tensor, params) -> torch.Tensor:
    """Probabilities after temperature, then top-k, then top-p (the order transformers applies them).
    With RowParams, each row's own (a greedy row's: all mass on its argmax)."""
    if isinstance(params, RowParams):
        probs = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        for p, rows in params.groups(logits.device):
            part = logits.index_select(0, rows)
            probs[rows] = (torch.nn.functional.one_hot(part.argmax(-1), part.shape[-1]).float() if p.greedy
                           else logits_to_probs(part, p))
        return probs
    # Shifted by the maximum first: a tiny temperature then sends the other logits to -inf (the
    # greedy limit) instead of overflowing them all to inf, which softmax turns into NaN.
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token once the more likely ones already hold top_p of the mass; the first always stays.
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= params.top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits.softmax(dim=-1)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax(x, -1); float32 on the CPU through cpu_kernels.argmax (the same answer, ten
    times sooner)."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and cpu_kernels.load(quiet=True):
        return cpu_kernels.argmax(x)
    return x.argmax(-1)


def sample_from_probs(probs: torch.Tensor) -> torch.Tensor:
    # argmax(p / Exp(1)) draws from p like multinomial does, without a host synchronisation.
    noise = torch.empty_like(probs).exponential_(1)
    return argmax(probs / noise).unsqueeze(-1)


def sample(logits: torch.Tensor, params) -> torch.Tensor:
    """Next token ids [..., 1] from logits [..., vocab] (with RowParams: [B, ..., vocab], each row its own)."""
    if isinstance(params, RowParams):
        out = torch.empty((*logits.shape[:-1], 1), dtype=torch.long, device=logits.device)
        for p, rows in params.groups(logits.device):
            out[rows] = sample(logits.index_select(0, rows), p)
        return out
    if params.greedy:
        return argmax(logits).unsqueeze(-1)
    return sample_from_probs(logits_to_probs(logits, params))


def accepted_prefix(accept: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """Drafts kept: the leading run of accepted ones (accept [..., k] booleans), at most limit."""
    return torch.minimum(torch.cumprod(accept, -1).sum(-1), limit)


def greedy_accept(drafts: torch.Tensor, target_logits: torch.Tensor, limit: torch.Tensor):
    """Greedy acceptance of one sequence's drafts [k] (target_logits [k+1, V], limit 0-dim) or a
    batch's [B, k] ([B, k+1, V], [B]): the longest prefix equal to the full model's argmax, at most
    limit, and the argmax after it ([1] or [B, 1]); gather keeps n on the device (no .item())."""
    target = argmax(target_logits)
    n = accepted_prefix(drafts == target[..., :-1], limit)
    return n, target.gather(-1, n.unsqueeze(-1))


def speculative_accept(drafts: torch.Tensor, draft_probs: torch.Tensor | None, target_logits: torch.Tensor,
                       params: SamplingParams, limit: torch.Tensor | None = None):
    """How many of the k drafted tokens to keep, and the token that follows them.

    drafts [k]; draft_probs [k, V] the (filtered) distributions they were drawn from, None when
    greedy; target_logits [k+1, V] the full model's logits at the k+1 verified positions.
    Greedy: keep the longest prefix that equals the full model's argmax, then take its argmax.
    Sampling (speculative sampling): keep draft x with probability min(1, p(x) / q(x)); at the first
    rejection draw from max(0, p - q) renormalised; if all k are kept, draw a bonus token from p.
    The output tokens are then distributed exactly as sampling from p one token at a time.
    With `limit` (a 0-dim tensor), only the first `limit` drafts count (the rest are padding): at
    most that many are kept, and once all of them are, the next token is drawn from p as a bonus.
    Returns (n_accepted, next_token [1]), both on the device: no host synchronisation here.
    """
    k = drafts.shape[0]
    limit = torch.tensor(k, device=drafts.device) if limit is None else limit
    if params.greedy:
        return greedy_accept(drafts, target_logits, limit)
    p = logits_to_probs(target_logits, params)
    if k == 0:  # a round without drafts: the full model's own token
        return torch.zeros((), dtype=torch.long, device=drafts.device), sample_from_probs(p[0])
    rows = torch.arange(k, device=drafts.device)
    p_x, q_x = p[rows, drafts], draft_probs[rows, drafts]
    keep = torch.rand(k, device=drafts.device) * q_x < p_x  # u < p/q without dividing by q
    n = accepted_prefix(keep, limit)
    p_n = p.index_select(0, n.view(1))[0]
    # Draft n+1 was rejected: draw from max(0, p - q) there; every counted draft was kept: a bonus from p.
    residual = (p[:k] - draft_probs).clamp_min(0).index_select(0, n.clamp(max=k - 1).view(1))[0]
    fallback = torch.where(n < limit, residual, p_n)
    fallback = torch.where(fallback.sum() > 0, fallback, p_n)  # p == q: nothing can be rejected
    return n, sample_from_probs(fallback / fallback.sum())
