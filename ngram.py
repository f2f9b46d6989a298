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
        """k tokens that followed the latest earlier occurrence of the newest n tokens, for the
        longest such n; and that n (0 and [] when no n-gram of the suffix occurred before).

        Where that continuation runs into the newest token (the occurrence is fewer than k tokens
        back: the text is repeating a period of d tokens, as greedy decoding's loops do), it goes
        on with the period: token i of the proposal is the one d before it, so a loop is drafted
        k tokens a round instead of d."""
        t = self.tokens
        for n in range(min(self.max_n, len(t)), self.min_n - 1, -1):
            end = self.latest[n].get(tuple(t[len(t) - n:]))
            if end is not None:
                out, d = t[end + 1:end + 1 + k], len(t) - 1 - end
                while len(out) < k:
                    out.append(out[len(out) - d])
                return out, n
        return [], 0


SOURCES = ("model", "ngram", "auto")  # --draft_source


def check_draft_source(source: str):
    if source not in SOURCES:
        raise ValueError(f"unknown --draft_source {source!r}; choose from {', '.join(SOURCES)}")


EXPLORE_EVERY = 64  # rounds: a kind of round not run for this long is tried again ...
EXPLORE_WITHIN = 0.8  # ... if its last estimate was at least this share of the best's tokens per second
CARRIED_PROPOSALS = 2.0  # what earlier texts' proposals count for in a new text's estimates, at most


class SourceChooser:
    """Per round (per batch round, in batching.Batch), which kind of round to run: verify the
    text's proposal ("ngram"), a plain decode step ("plain"), or, under --draft_source auto, the
    model's own draft round ("model"): the one expected to yield the most tokens per second.

    A proposal's expected yield comes from what proposals from matches of the same length n kept
    so far (longer matches copy more reliably), position by position: of the proposals whose
    token i was checked (all before it kept), the share that kept it. The chance of keeping the
    first i tokens is the product of those shares, and a proposal of m tokens yields the sum of
    those chances over i <= m. A copy tends to be kept whole or lost at its first token, so the
    shares after the first are high, but copies also end (a summary copies a phrase, not the
    passage): the shares say where, so a long verify pass is chosen only where the tokens it adds
    are usually kept. Positions no proposal has reached yet take the share of the one before
    (copies go on as they went). A plain step yields one token a row; a model round, the moving
    average of what its rounds kept per running row, times the rows running now. Each kind's
    seconds (per shape: rows, padded drafts) are moving averages of what its rounds took (a round
    is counted as at most twice the estimate, so that one stall does not make a kind look slow
    for long). A kind not yet timed is tried first (its first round, which may compile, is not
    timed), and one not run for EXPLORE_EVERY rounds is tried again (its yield may have changed
    with the text) if its last estimate came within EXPLORE_WITHIN of the best, except a
    proposal, whose first token every other round checks for free (observe_unverified): trying a
    model round costs more than the round when its draft has fallen far behind (it catches up
    first), so a kind that lost clearly is left alone. That catch-up (a draft model with its own
    cache has not seen what n-gram and plain rounds kept) is timed apart, as a part per catch-up
    and a part per token (catch_up_cost): where model rounds are the best kind without it, another
    kind's round is charged what its tokens would add to it (the next model round will pay for
    them); otherwise a model round is charged it for the positions the draft is behind (the price
    of switching back), and a model round not yet timed (a batch of a new size) is not tried while
    the draft is behind.

    Clocks do not decide where the choices must repeat: under tensor parallelism (every rank must
    choose alike) and when sampling (a seed repeats its output only if the rounds, which draw the
    random numbers, do). There the seconds are fixed estimates in decode steps (a proposal round
    1 + 0.05 a padded draft, a model round of k drafts 1 + k / 2: the drafts about half a step
    each, and the verify pass), only tokens decide, and a model round is run once before its
    yield is trusted."""

    def __init__(self, k: int = 0, clocks: bool = True, prior: float = 0.5, weight: float = 2.0,
                 decay: float = 0.98):
        import torch.distributed as dist
        self.timing = clocks and not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)
        self.model_cost = 1.0 + 0.5 * k  # decode steps per model round (without clocks)
        self.prior, self.weight, self.decay = prior, weight, decay
        self.hits = {}  # match length n -> per proposal position: [checked, kept] counts, decaying
        self.seconds, self.tokens, self.seen, self.last = {}, {}, set(), {}
        self.rounds = 0
        # a draft model with its own cache: its catch-ups as moving averages of 1, tokens, tokens^2,
        # seconds and tokens x seconds (catch_up_cost fits seconds = a + c tokens to them)
        self.catch_ups = None

    def expected(self, n: int, m: int) -> float:
        """Tokens an n-gram round yields with m proposed tokens from a match of length n (the
        full model's own token included)."""
        counts = self.hits.get(n, ())
        share, kept_all, total = self.prior, 1.0, 1.0
        for i in range(m):
            checked, kept = counts[i] if i < len(counts) else (0.0, 0.0)
            share = (kept + share * self.weight) / (checked + self.weight)  # shrunk toward the position before
            kept_all *= share
            total += kept_all
        return total

    def cost(self, key) -> float:
        """Decode steps a round of this kind takes, where clocks do not decide."""
        if key[0] == "ngram":
            return 1.0 + 0.05 * key[-1]
        return 1.0 if key[0] == "plain" else self.model_cost

    def choose(self, options: dict, behind: int = 0, rows: float = 1.0):
        """options: {kind of round (a tuple whose first item is "ngram", "plain" or "model"):
        its expected tokens, or None for the moving average of that kind's rounds (per running
        row, times `rows`, those running now)}; behind: the positions a draft model with its own
        cache must catch up on before a model round. Returns the kind to run."""
        self.rounds += 1

        def tokens(key):
            return options[key] if options[key] is not None else self.tokens.get(key, 1.0) * rows
        if not self.timing:
            # a kind whose yield only its rounds tell (the model's) is run once first: from the
            # default of one token a round it would never look worth its cost
            untried = [key for key in options if options[key] is None and key not in self.tokens]
            return untried[0] if untried else max(options, key=lambda key: tokens(key) / self.cost(key))
        if behind and self.catch_ups:  # trying a model round (of a new shape) would first pay a catch-up
            options = {key: v for key, v in options.items() if key[0] != "model" or key in self.seconds}
        untimed = [key for key in options if key not in self.seconds]
        if untimed:
            return untimed[0]
        # The draft model's catch-up (a model round pays it for every position the draft is behind)
        # goes to whichever side is the exception: where model rounds pay best without it, a round
        # of another kind is charged what its tokens would add to it (the next model round pays for
        # them: with the draft in step, a whole pass); otherwise the model round is charged what is
        # behind now, the price of switching.
        steady = max(options, key=lambda key: tokens(key) / self.seconds[key])
        model_mode = steady[0] == "model"

        def rate(key):
            extra = 0.0
            if key[0] == "model" and not model_mode:
                extra = self.catch_up_cost(behind)
            elif key[0] != "model" and model_mode:  # what its tokens add to the next model round's catch-up
                extra = self.catch_up_cost(behind + tokens(key)) - self.catch_up_cost(behind)
            return tokens(key) / (self.seconds[key] + extra)
        best = max(options, key=rate)
        # (a proposal's yield needs no trying: every round tells it, observe_unverified)
        stale = [key for key in options if key[0] != "ngram" and self.rounds - self.last.get(key, 0) > EXPLORE_EVERY
                 and rate(key) >= EXPLORE_WITHIN * rate(best)]
        return stale[0] if stale else best

    def new_text(self):
        """A new text starts (a generation, or a sequence joining a batch): how well proposals copy
        depends on the text (a code edit copies whole lines, chat hardly anything), so what earlier
        texts' proposals kept carries over as a prior of at most CARRIED_PROPOSALS proposals per
        match length and position, its shares unchanged. Kept at full weight, a record from a text
        that copied little kept proposals from ever being tried on one that copies a lot (HumanEval
        completions after one such prompt: auto ran only model rounds, 64.7 tokens/s; with this,
        122)."""
        for counts in self.hits.values():
            for c in counts:
                if c[0] > CARRIED_PROPOSALS:
                    c[1] *= CARRIED_PROPOSALS / c[0]
                    c[0] = CARRIED_PROPOSALS

    def observe_ngram(self, n: int, proposed: int, accepted: int):
        """An n-gram round's verdict: how many of the proposed tokens it kept."""
        counts = self.hits.setdefault(n, [])
        counts.extend([0.0, 0.0] for _ in range(proposed - len(counts)))
        # checked: every kept token and the first rejected; each position's counts decay as it is
        # checked again (were all to decay at every verdict, the first position's free verdicts,
        # observe_unverified, would wear the later ones' away to the prior, copies going on)
        for i in range(min(accepted + 1, proposed)):
            counts[i][0] = counts[i][0] * self.decay + 1.0
            counts[i][1] = counts[i][1] * self.decay + float(i < accepted)

    def observe_unverified(self, n: int, proposal: list, tokens: list):
        """A round of another kind produced `tokens` (the full model's) where the text proposed
        `proposal` from a match of length n: a verify pass of the proposal would have kept its
        first token if it is the round's first (greedy, exactly its verdict; sampling, the drawn
        token is the proposed one with the chance that the verify pass keeps it). So every round
        tells whether the text is being copied, free: without it a text's proposals were judged
        only by the rounds that verified them, and after a few misses never again (HumanEval
        completions after a prompt that copied little: auto 64.7 -> 120 tokens/s with an int4
        self-draft). Only the first token: a round yields more tokens where the text is
        predictable, and copied text is, so its later positions would be seen mostly where a copy
        goes on (chat's estimates for 8 tokens came out twice what those rounds kept)."""
        if proposal and tokens:
            self.observe_ngram(n, 1, int(proposal[0] == tokens[0]))

    def observe_catch_up(self, seconds: float, tokens: int):
        """A model round first caught its draft model up on `tokens` positions that n-gram and
        plain rounds kept without it (the draft has its own cache), in `seconds` (not part of the
        round's own seconds): what choose charges where it is due (catch_up_cost)."""
        if not tokens:
            return
        if self.catch_ups:  # a stall counts as twice the estimate at most
            seconds = min(seconds, 2 * self.catch_up_cost(tokens))
        new = (1.0, tokens, tokens * tokens, seconds, tokens * seconds)
        self.catch_ups = new if not self.catch_ups else [0.9 * a + 0.1 * b for a, b in zip(self.catch_ups, new)]

    def catch_up_cost(self, tokens: float) -> float:
        """Seconds a catch-up on `tokens` positions is expected to take: a + c tokens, fitted (least
        squares) to the catch-ups so far, or proportional to the tokens while they all had one
        length. A catch-up has a fixed part, which a per-token average over long catch-ups spreads
        thin (1.5 ms a token): as a pass of its own, 2 positions took 13 ms and 16 about 25
        (SmolLM2's int8 self-draft; a batch's rows catch up so); on the round's first draft step
        (decoding.Speculation.merged_catch_up), 2 positions cost 3-6 ms more than the step."""
        if not self.catch_ups or not tokens:
            return 0.0
        w, t, tt, s, ts = self.catch_ups
        mean_t, mean_s = t / w, s / w
        var = tt / w - mean_t * mean_t
        c = (ts / w - mean_t * mean_s) / var if var > 1e-6 * mean_t * mean_t else 0.0
        if not 0.0 < c <= mean_s / mean_t:  # one length so far (or no fixed part): proportional
            return mean_s / mean_t * tokens
        return mean_s + c * (tokens - mean_t)

    def observe_round(self, key, seconds: float | None, tokens: int, rows: int = 1):
        """A round of this kind took `seconds` (None: not a steady round, its compiled steps'
        guards evaluated) and yielded `tokens` for `rows` running rows (its first round not timed).
        The yield is kept per row: a batch's round of few rows (the others finished) yields less
        than one of many, at nearly the same cost."""
        self.last[key] = self.rounds
        tokens = tokens / max(rows, 1)
        self.tokens[key] = tokens if key not in self.tokens else 0.9 * self.tokens[key] + 0.1 * tokens
        if seconds is None:
            return
        if key not in self.seen:
            self.seen.add(key)
            return
        if key in self.seconds:  # a stall (the collector, the machine's neighbours) counts as twice the estimate at most
            seconds = 0.9 * self.seconds[key] + 0.1 * min(seconds, 2 * self.seconds[key])
        self.seconds[key] = seconds
