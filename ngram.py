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
