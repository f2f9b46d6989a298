"""Drafts from the text itself (prompt lookup): propose the tokens that followed the latest earlier
occurrence of the sequence's newest n tokens, for the longest n in [min_n, max_n] that occurred.

Summaries, code edits and chats copy spans of their input and of what they already wrote; such
spans cost no model call to draft. `NgramIndex` keeps, per n, a hash table from each n-gram to the
position of its latest occurrence that has a token after it, updated as tokens arrive (max_n
dictionary writes a token), so a proposal is max_n lookups and a slice, on the host, with no device
work: a round that drafts from it keeps its one host synchronisation (the verify pass's).
"""


class NgramIndex:
    """The n-grams of one sequence (prompt and generated tokens), n in [min_n, max_n]."""

    def __init__(self, tokens=(), max_n: int = 4, min_n: int = 1):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram lengths need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.max_n, self.min_n = max_n, min_n
        self.tokens: list[int] = []
        self.latest = {n: {} for n in range(min_n, max_n + 1)}  # n-gram -> end position of its latest occurrence
        self.extend(tokens)

    def extend(self, ids):
        """Appends tokens. An n-gram enters the tables once a token follows it: the one that ends
        the sequence has nothing to propose yet, and a lookup must find an earlier occurrence."""
        t = self.tokens
        for token in ids:
            end = len(t) - 1  # the n-grams ending here now have a continuation: the new token
            t.append(int(token))
            for n, table in self.latest.items():
                if end + 1 >= n:
                    table[tuple(t[end + 1 - n:end + 1])] = end

    def propose(self, k: int) -> tuple[list[int], int]:
        """Up to k tokens that followed the latest earlier occurrence of the newest n tokens, for
        the longest such n; and that n (0 and [] when no n-gram of the suffix occurred before)."""
        t = self.tokens
        for n in range(min(self.max_n, len(t)), self.min_n - 1, -1):
            end = self.latest[n].get(tuple(t[len(t) - n:]))
            if end is not None:
                return t[end + 1:end + 1 + k], n
        return [], 0


SOURCES = ("model", "ngram", "auto")  # --draft_source


def check_draft_source(source: str):
    if source not in SOURCES:
        raise ValueError(f"unknown --draft_source {source!r}; choose from {', '.join(SOURCES)}")


class SourceChooser:
    """Per round (per batch round, in batching.Batch): whether to verify the text's proposal or
    run the alternative round, which is the model's own draft round under --draft_source auto and
    a plain decode step under --draft_source ngram. The proposal's expected yield comes from the
    acceptance seen per match length n (longer matches copy more reliably); each kind of round's
    seconds and the alternative's tokens per round are moving averages of what the rounds took.
    A kind not yet timed is tried (its first round, which may compile, is not timed).

    Clocks do not decide where the choices must repeat: under tensor parallelism (every rank must
    choose alike) and when sampling (a seed repeats its output only if the rounds, which draw the
    random numbers, do). There the seconds are fixed estimates in units of a decode step, and only
    tokens decide."""

    def __init__(self, alternative_cost: float = 1.0, clocks: bool = True, prior: float = 0.5, weight: float = 2.0,
                 decay: float = 0.98):
        import torch.distributed as dist
        self.timing = clocks and not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)
        self.alternative_cost = alternative_cost  # decode steps per alternative round (without timing)
        self.prior, self.weight, self.decay = prior, weight, decay
        self.hits = {}  # match length n -> [accepted, judged] drafts, decaying
        self.seconds, self.tokens, self.seen = {}, {}, set()

    def rate(self, n: int) -> float:
        """Estimated chance that a proposed token from a match of length n is accepted, given the
        ones before it were."""
        accepted, judged = self.hits.get(n, (0.0, 0.0))
        return (accepted + self.prior * self.weight) / (judged + self.weight)

    def expected(self, n: int, m: int) -> float:
        """Tokens an n-gram round yields with m proposed tokens from a match of length n (the
        full model's own token included)."""
        p = self.rate(n)
        return sum(p ** i for i in range(m + 1))

    def use_ngram(self, expected: float, ngram_key, other_key) -> bool:
        """expected: the proposal round's tokens (summed over a batch's rows); the keys name the
        two kinds of round as `observe_round` was told them (their shapes)."""
        if not self.timing:
            return expected / (1.0 + 0.05 * ngram_key[-1]) >= self.tokens.get(other_key, 1.0) / self.alternative_cost
        t_ngram, t_other = self.seconds.get(ngram_key), self.seconds.get(other_key)
        if t_ngram is None:
            return True
        if t_other is None:
            return False
        return expected / t_ngram >= self.tokens[other_key] / t_other

    def observe_ngram(self, n: int, proposed: int, accepted: int):
        """An n-gram round's verdict: the proposal's accepted tokens and the first rejected one."""
        judged = accepted + (accepted < proposed)
        a, j = self.hits.get(n, (0.0, 0.0))
        self.hits[n] = [a * self.decay + accepted, j * self.decay + judged]

    def observe_round(self, key, seconds: float, tokens: int):
        """A round of kind `key` took `seconds` and yielded `tokens` (its first round not timed)."""
        self.tokens[key] = tokens if key not in self.tokens else 0.9 * self.tokens[key] + 0.1 * tokens
        if key not in self.seen:
            self.seen.add(key)
            return
        self.seconds[key] = seconds if key not in self.seconds else 0.9 * self.seconds[key] + 0.1 * seconds
