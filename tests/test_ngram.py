"""ngram.NgramIndex against a brute-force search of the text."""
import random

import pytest

from ngram import NgramIndex


def brute_force(tokens, k, max_n, min_n):
    """The longest n in [min_n, max_n] whose newest n-gram occurred earlier (ending before the last
    token), and the k tokens after its latest such occurrence."""
    L = len(tokens)
    for n in range(min(max_n, L), min_n - 1, -1):
        suffix = tokens[L - n:]
        for end in range(L - 2, n - 2, -1):
            if tokens[end + 1 - n:end + 1] == suffix:
                return tokens[end + 1:end + 1 + k], n
    return [], 0


@pytest.mark.parametrize("max_n, min_n", [(4, 1), (3, 2), (1, 1), (6, 3)])
@pytest.mark.parametrize("alphabet", [2, 5, 50])
def test_proposals_equal_a_brute_force_search(max_n, min_n, alphabet):
    """At every length of random token sequences (small alphabets repeat a lot, large ones rarely),
    fed one token or several at a time, the proposal is the brute-force one."""
    rng = random.Random(alphabet * 100 + max_n * 10 + min_n)
    for trial in range(20):
        tokens = [rng.randrange(alphabet) for _ in range(rng.randrange(1, 80))]
        index = NgramIndex(tokens[:1], max_n=max_n, min_n=min_n)
        i = 1
        while True:
            for k in (1, 3, 8):
                assert index.propose(k) == brute_force(tokens[:i], k, max_n, min_n), (tokens[:i], k)
            if i == len(tokens):
                break
            step = rng.randrange(1, 4)
            index.extend(tokens[i:i + step])
            i = min(i + step, len(tokens))


def test_a_copied_span_is_proposed_and_the_longest_match_wins():
    text = [7, 1, 2, 3, 4, 5, 9, 9, 1, 2, 3]
    assert NgramIndex(text).propose(3) == ([4, 5, 9], 3)
    # "3" alone last followed by 4 (position 3); with 2-grams, "2 3" too; the 4-gram "9 1 2 3" never occurred
    assert NgramIndex(text, max_n=2).propose(2) == ([4, 5], 2)
    assert NgramIndex([1, 2, 3]).propose(4) == ([], 0)
    assert NgramIndex([]).propose(4) == ([], 0)
    with pytest.raises(ValueError, match="min_n"):
        NgramIndex([], max_n=2, min_n=3)
