"""Rewards a tiny random policy can learn within a few steps (RLHF tests)."""


def vowel_share(text: str) -> float:
    """Share of the completion's characters that are lower-case vowels (about 5 % at random)."""
    chars = text.replace(" ", "")
    return sum(c in "aeiou" for c in chars) / max(1, len(chars))


def batch_length(prompts: list[str], completions: list[str]) -> list[float]:
    """TRL-style batch signature: a small bonus for short completions."""
    return [-0.01 * len(c.replace(" ", "")) for c in completions]
