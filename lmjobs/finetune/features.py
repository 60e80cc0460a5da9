"""Canonical labelled rows -> fixed-width feature arrays, one function per task.  No Ray, no torch.

Every task returns {column: array with one row per training row}; rows are padded to
`max_len` here and cut to their micro-batch's longest row at training time.  Label positions
that are not scored hold IGNORE (-100), as Hugging Face heads expect.
"""
from __future__ import annotations

import numpy as np

IGNORE = -100


def _pad(seqs: list[list[int]], max_len: int, value: int, dtype=np.int32) -> np.ndarray:
    out = np.full((len(seqs), max_len), value, dtype=dtype)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s[:max_len]
    return out


def _mask(seqs: list[list[int]], max_len: int) -> np.ndarray:
    return _pad([[1] * len(s) for s in seqs], max_len, 0, np.int8)


def classification(rows: list[dict], tokenizer, labels: list[str], max_len: int) -> dict:
    """{text, label} or {text_a, text_b, label} -> input_ids, attention_mask, [token_type_ids], labels."""
    index = {name: i for i, name in enumerate(labels)}
    pair = "text_a" in rows[0]
    first = [r["text_a"] if pair else r["text"] for r in rows]
    second = [r["text_b"] for r in rows] if pair else None
    enc = tokenizer(first, second, truncation=True, max_length=max_len)
    out = {"input_ids": _pad(enc["input_ids"], max_len, tokenizer.pad_token_id),
           "attention_mask": _mask(enc["input_ids"], max_len),
           "labels": np.asarray([index[r["label"]] for r in rows], dtype=np.int64)}
    if pair and "token_type_ids" in enc:
        out["token_type_ids"] = _pad(enc["token_type_ids"], max_len, 0, np.int8)
    return out


def tokens(rows: list[dict], tokenizer, tags: list[str], max_len: int) -> dict:
    """{tokens, tags} -> input_ids, attention_mask, labels: each word's tag on its first sub-word,
    IGNORE on the others and on special tokens.  Words cut off by max_len are not trained on and
    are predicted O at evaluation (`words_kept` says how many words each row holds)."""
    index = {name: i for i, name in enumerate(tags)}
    enc = tokenizer([r["tokens"] for r in rows], is_split_into_words=True, truncation=True, max_length=max_len)
    labels, kept = [], []
    for i, row in enumerate(rows):
        word_ids = enc.word_ids(i)
        seen, lab = set(), []
        for w in word_ids:
            lab.append(IGNORE if w is None or w in seen else index[row["tags"][w]])
            if w is not None:
                seen.add(w)
        labels.append(lab)
        kept.append(len(seen))
    return {"input_ids": _pad(enc["input_ids"], max_len, tokenizer.pad_token_id),
            "attention_mask": _mask(enc["input_ids"], max_len),
            "labels": _pad(labels, max_len, IGNORE, np.int64), "words_kept": np.asarray(kept, dtype=np.int32)}


def qa(rows: list[dict], tokenizer, max_len: int, doc_stride: int) -> tuple[dict, list[dict]]:
    """{id, question, context, answers} -> windows over each context, doc_stride tokens apart:
    features (input_ids, attention_mask, [token_type_ids], start_positions, end_positions) and one
    {id, offsets} per window for post-processing.  A window without the (first) answer points at
    token 0, as in BERT's SQuAD recipe.  Contexts longer than a window yield several windows."""
    overlap = max_len - doc_stride
    if overlap <= 0:
        raise ValueError(f"data.doc_stride ({doc_stride}) must be below data.max_seq_len ({max_len})")
    enc = tokenizer([r["question"] for r in rows], [r["context"] for r in rows], truncation="only_second",
                    max_length=max_len, stride=doc_stride, return_overflowing_tokens=True,
                    return_offsets_mapping=True)
    starts, ends, windows = [], [], []
    for w, example in enumerate(enc["overflow_to_sample_mapping"]):
        row = rows[example]
        sequence = enc.sequence_ids(w)
        offsets = [o if sequence[i] == 1 else (-1, -1) for i, o in enumerate(enc["offset_mapping"][w])]
        windows.append({"id": row["id"], "offsets": offsets})
        lo = row["answers"]["answer_start"][0]
        hi = lo + len(row["answers"]["text"][0])
        first = next(i for i, s in enumerate(sequence) if s == 1)
        last = max(i for i, s in enumerate(sequence) if s == 1)
        if not (offsets[first][0] <= lo and offsets[last][1] >= hi):
            starts.append(0)
            ends.append(0)
            continue
        s = first
        while s <= last and offsets[s][1] <= lo:
            s += 1
        e = last
        while e >= first and offsets[e][0] >= hi:
            e -= 1
        starts.append(s)
        ends.append(e)
    out = {"input_ids": _pad(enc["input_ids"], max_len, tokenizer.pad_token_id),
           "attention_mask": _mask(enc["input_ids"], max_len),
           "start_positions": np.asarray(starts, np.int64), "end_positions": np.asarray(ends, np.int64)}
    if "token_type_ids" in enc:
        out["token_type_ids"] = _pad(enc["token_type_ids"], max_len, 0, np.int8)
    return out, windows


def sft_pieces(row: dict, tokenizer) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one SFT row.  With a chat template: the conversation up to the
    last assistant turn (with the generation prompt) is the prompt, that turn the response;
    without one: prompt text, a newline, the response and EOS (or SEP)."""
    if "messages" in row and row["messages"] is not None:
        messages = list(row["messages"])
    else:
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[:last + 1], tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the chat template does not extend the prompt; cannot mask it out of the loss")
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return p, tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    prompt = "\n\n".join(m["content"] for m in messages[:last]) + "\n"
    response = tokenizer(messages[last]["content"], add_special_tokens=False)["input_ids"]
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    return tokenizer(prompt, add_special_tokens=False)["input_ids"], response + ([end] if end is not None else [])


def sft(rows: list[dict], tokenizer, max_len: int, pack: bool) -> dict:
    """Prompt/response (or chat) rows -> input_ids, attention_mask, labels with the loss on
    response tokens only.  pack: examples laid end to end in full max_len rows (attention crosses
    example boundaries, as in simple packing); otherwise one example a row, cut at max_len."""
    seqs, labs = [], []
    for row in rows:
        p, r = sft_pieces(row, tokenizer)
        seqs.append(p + r)
        labs.append([IGNORE] * len(p) + r)
    if pack:
        flat = [t for s in seqs for t in s]
        flat_labels = [t for s in labs for t in s]
        seqs = [flat[i:i + max_len] for i in range(0, len(flat) - max_len + 1, max_len)]
        labs = [flat_labels[i:i + max_len] for i in range(0, len(flat_labels) - max_len + 1, max_len)]
    keep = [i for i, lab in enumerate(labs) if any(t != IGNORE for t in lab[:max_len])]  # some response left
    pad = tokenizer.pad_token_id
    return {"input_ids": _pad([seqs[i] for i in keep], max_len, pad),
            "attention_mask": _mask([seqs[i] for i in keep], max_len),
            "labels": _pad([labs[i] for i in keep], max_len, IGNORE, np.int64)}


REWARD_ENCODING = "reward_encoding.json"  # beside a reward model's export: how its training encoded a pair


def reward_ids(tokenizer, prompt: str, response: str, max_len: int) -> list[int]:
    """One (prompt, response) as a reward model sees it, in training and when it scores RLHF
    completions: prompt + response + EOS (SEP for BERT-style encoders, with [CLS] first, where they
    pool), cut to max_len keeping the end: a long dialogue loses its oldest turns, never the answer
    being judged."""
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    ids = tokenizer(prompt + response, add_special_tokens=False)["input_ids"] + ([end] if end is not None else [])
    if tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None and end == tokenizer.sep_token_id:
        return [tokenizer.cls_token_id] + ids[-(max_len - 1):]
    return ids[-max_len:]


def reward_batch(tokenizer, pairs: list[tuple[str, str]], max_len: int) -> dict:
    """input_ids, attention_mask of (prompt, response) pairs, right-padded to the longest."""
    seqs = [reward_ids(tokenizer, p, r, max_len) for p, r in pairs]
    width = max(len(s) for s in seqs)
    return {"input_ids": _pad(seqs, width, tokenizer.pad_token_id), "attention_mask": _mask(seqs, width)}


def preference(rows: list[dict], tokenizer, max_len: int) -> dict:
    """{prompt, chosen, rejected} -> the chosen text (input_ids, attention_mask) and the rejected
    one (rejected_input_ids, rejected_attention_mask), each encoded by `reward_ids`."""
    out = {}
    for prefix, key in (("", "chosen"), ("rejected_", "rejected")):
        seqs = [reward_ids(tokenizer, row["prompt"], row[key], max_len) for row in rows]
        out[f"{prefix}input_ids"] = _pad(seqs, max_len, tokenizer.pad_token_id)
        out[f"{prefix}attention_mask"] = _mask(seqs, max_len)
    return out


def dpo(rows: list[dict], tokenizer, max_len: int) -> dict:
    """{prompt, chosen, rejected} -> for each response: prompt + response + EOS with labels on the
    response only (input_ids, attention_mask, labels and rejected_*).  A prompt too long for
    max_len loses its oldest tokens; the response keeps its beginning."""
    end = tokenizer.eos_token_id
    out = {}
    for prefix, key in (("", "chosen"), ("rejected_", "rejected")):
        seqs, labs = [], []
        for row in rows:
            prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            response = tokenizer(row[key], add_special_tokens=False)["input_ids"] + ([end] if end is not None else [])
            response = response[:max_len - 1]
            prompt = prompt[-(max_len - len(response)):]
            seqs.append(prompt + response)
            labs.append([IGNORE] * len(prompt) + response)
        out[f"{prefix}input_ids"] = _pad(seqs, max_len, tokenizer.pad_token_id)
        out[f"{prefix}attention_mask"] = _mask(seqs, max_len)
        out[f"{prefix}labels"] = _pad(labs, max_len, IGNORE, np.int64)
    return out
