"""Which two answers a voter sees next: balanced over model pairs, sides at random.

The pair is one with the fewest votes so far among the pairs this voter can still vote on, so
every model pair gets votes, whichever models were added last; within it, the prompt is one with
the fewest votes on that pair (prompts are covered evenly too). Ties are broken at random, and
the two answers are shown in random order, so position carries no information about the model.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from itertools import combinations

Battle = tuple[int, int, int]  # (prompt id, model shown as A, model shown as B)


def choose_battle(answered: dict[int, set[int]], counts: dict[tuple[int, int, int], int],
                  mine: set[tuple[int, int, int]], rng: random.Random) -> Battle | None:
    """``answered``: model -> prompts it answered; ``counts``: (lo, hi, prompt) -> votes cast;
    ``mine``: (lo, hi, prompt) this voter already voted on. None when nothing is left to vote on."""
    done: dict[tuple[int, int], set[int]] = defaultdict(set)
    for lo, hi, p in mine:
        done[(lo, hi)].add(p)
    per_pair: Counter[tuple[int, int]] = Counter()
    for (lo, hi, _), n in counts.items():
        per_pair[(lo, hi)] += n
    options = []
    for lo, hi in combinations(sorted(answered), 2):
        available = (answered[lo] & answered[hi]) - done[(lo, hi)]
        if available:
            options.append(((lo, hi), available))
    if not options:
        return None
    fewest = min(per_pair[pair] for pair, _ in options)
    (lo, hi), available = rng.choice([o for o in options if per_pair[o[0]] == fewest])
    least = min(counts.get((lo, hi, p), 0) for p in available)
    prompt = rng.choice(sorted(p for p in available if counts.get((lo, hi, p), 0) == least))
    return (prompt, lo, hi) if rng.random() < 0.5 else (prompt, hi, lo)
