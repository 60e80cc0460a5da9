"""Document cleaning: Unicode normalisation, Gopher/C4-style quality rules, PII scrubbing.

Pure functions on one document's text, so Ray Data can run them in `map_batches` and the
benchmark peer can run the very same code.  Rules return the name of the first rule a document
fails (for per-rule counts in the manifest) or None.
"""
from __future__ import annotations

import re
import unicodedata

from cluster.spec import Section

# Control characters other than newline and tab (C0, DEL, C1).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_BLANK_RUNS = re.compile(r"\n{3,}")
_WORD = re.compile(r"\S+")
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
# IPv4: four octets 0-255 without leading zeros, not inside a longer dotted run (1.2.3.4.5,
# v1.2.3.4) and not all single digits: "1.2.3.4" is far likelier a version than an address, and
# the few real all-single-digit addresses (1.1.1.1, 8.8.8.8) are public resolvers, not personal.
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.])(?!\d\.\d\.\d\.\d(?!\d)){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\d)")
# Phone: the North American 3-3-4 shape (area code maybe in parentheses, optional 1 / +1), or
# a + country code and digit groups; 10-15 digits either way (E.164 allows at most 15), so
# lists of numbers ("100 200 300") and dates do not count.
_PHONE = re.compile(r"(?<![\w+.-])(?:(?:\+?1[ .-]?)?(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}"
                    r"|\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?[ .-]?\d+(?:[ .-]\d+)*)(?!\w|[.-]\d)")
_PHONE_DIGITS = range(10, 16)
_END_PUNCT = tuple(".!?\"'”’)")
_BULLETS = ("•", "●", "○", "▪", "-", "*", "–")


def normalize(text: str) -> str:
    """NFC, no control characters, no trailing spaces, at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CONTROL.sub("", text)
    text = _TRAILING_SPACE.sub("\n", text)
    return _BLANK_RUNS.sub("\n\n", text).strip()


def scrub_pii(text: str) -> str:
    text = _EMAIL.sub("<EMAIL>", text)
    text = _IPV4.sub("<IP>", text)
    return _PHONE.sub(lambda m: "<PHONE>" if sum(c.isdigit() for c in m[0]) in _PHONE_DIGITS else m[0], text)


class QualityRules(Section):
    """Gopher (Rae et al. 2021) and C4 heuristics; null disables a rule."""

    min_words: int | None = 50
    max_words: int | None = 100_000
    min_mean_word_len: float | None = 3.0
    max_mean_word_len: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1  # '#' and '...' per word
    min_punct_line_frac: float | None = None  # C4 keeps lines ending in punctuation; off for verse
    max_dup_line_frac: float | None = 0.3
    max_bullet_line_frac: float | None = 0.9
    max_ellipsis_line_frac: float | None = 0.3
    min_alpha_word_frac: float | None = 0.8


def quality_failure(text: str, rules: QualityRules) -> str | None:
    """The first rule `text` fails, or None when it passes them all."""
    words = _WORD.findall(text)
    n = len(words)
    if rules.min_words is not None and n < rules.min_words:
        return "min_words"
    if rules.max_words is not None and n > rules.max_words:
        return "max_words"
    if n == 0:
        return "min_words"
    mean_len = sum(len(w) for w in words) / n
    if rules.min_mean_word_len is not None and mean_len < rules.min_mean_word_len:
        return "min_mean_word_len"
    if rules.max_mean_word_len is not None and mean_len > rules.max_mean_word_len:
        return "max_mean_word_len"
    if rules.max_symbol_word_ratio is not None:
        symbols = text.count("#") + text.count("...") + text.count("…")
        if symbols / n > rules.max_symbol_word_ratio:
            return "max_symbol_word_ratio"
    if rules.min_alpha_word_frac is not None:
        alpha = sum(any(c.isalpha() for c in w) for w in words)
        if alpha / n < rules.min_alpha_word_frac:
            return "min_alpha_word_frac"
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if lines:
        if rules.min_punct_line_frac is not None:
            if sum(ln.endswith(_END_PUNCT) for ln in lines) / len(lines) < rules.min_punct_line_frac:
                return "min_punct_line_frac"
        if rules.max_dup_line_frac is not None and len(lines) > 1:
            if 1 - len(set(lines)) / len(lines) > rules.max_dup_line_frac:
                return "max_dup_line_frac"
        if rules.max_bullet_line_frac is not None:
            if sum(ln.startswith(_BULLETS) for ln in lines) / len(lines) > rules.max_bullet_line_frac:
                return "max_bullet_line_frac"
        if rules.max_ellipsis_line_frac is not None:
            ell = sum(ln.endswith(("...", "…")) for ln in lines)
            if ell / len(lines) > rules.max_ellipsis_line_frac:
                return "max_ellipsis_line_frac"
    return None


_LANGUAGE_ID = None


def language_of(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) from py3langid, whose model ships inside the package."""
    global _LANGUAGE_ID
    if _LANGUAGE_ID is None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        _LANGUAGE_ID = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    lang, prob = _LANGUAGE_ID.classify(text)
    return lang, float(prob)
