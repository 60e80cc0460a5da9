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
