"""Tokenizers for packing: trained byte-level BPE, character-level, or an existing file."""
from __future__ import annotations

import hashlib
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def char_level(chars: Iterable[str], special_tokens: list[str]) -> Tokenizer:
    """One id per distinct character (nanoGPT's char-level setup), special tokens first."""
    vocab = {t: i for i, t in enumerate(special_tokens)}
    for c in sorted(set(chars)):
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=special_tokens[0]))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok


def fingerprint(tokenizer_json: str) -> str:
    return "sha256:" + hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest()


def _byte_symbols() -> list[str]:
    """The printable stand-in of each byte (the byte-level BPE convention): byte b -> symbols[b]."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def byte_level(eos: str = EOS) -> Tokenizer:
    """Raw UTF-8 bytes as ids 0..255 and `eos` as 256: the vocabulary of lmjobs' byte corpora
    (data_pipelines.text), as a `tokenizers` file any Hugging Face loader reads."""
    vocab = {s: b for b, s in enumerate(_byte_symbols())}
    vocab[eos] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=eos))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        pre_tokenizers.Split("", behavior="isolated")])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([eos])
    return tok
