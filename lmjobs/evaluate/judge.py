"""The reward-model judge of an eval run (`judge:`): on held-out prompts, each candidate's sampled
completion against the baseline's, scored by a reward model exactly as it was trained.

Per candidate: the win rate over the baseline (a tie counts half) with its 95 % Wilson interval,
both mean rewards, the mean response length, and the KL per token to a reference model (default
the baseline) on the candidate's own samples: mean over completions of
(log p_candidate(y | x) - log p_reference(y | x)) / tokens (Schulman's k1, unbiased at the sampled
temperature), both log-probs of the sampled token ids themselves (one vocabulary).
"""
from __future__ import annotations

import math
from typing import Any, Callable

from lmjobs.evaluate.scoring import batched, run_pool


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (ties counted as half a success)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def outcomes(candidate: list[float], baseline: list[float], tie: float = 1e-6) -> list[float]:
    """1 where the candidate's completion scored higher, 0.5 within `tie`, else 0."""
    return [1.0 if c > b + tie else 0.5 if abs(c - b) <= tie else 0.0 for c, b in zip(candidate, baseline)]


def prompts_of(section, cfg) -> list[str]:
    from lmjobs.rlhf.driver import load_prompts

    found = load_prompts(section.prompts, cfg)[section.skip_prompts:section.skip_prompts + section.max_prompts]
    if not found:
        raise ValueError(f"judge.prompts: {section.prompts}: no prompts after skipping {section.skip_prompts}")
    return found


def _encoded(tok, prompts: list[str], section) -> list[list[int]]:
    from lmjobs.rlhf.sequences import encode_prompts

    return encode_prompts(tok, prompts, section.chat_template, section.max_prompt_tokens)


def generation_requests(tok, prompts: list[str], section, batch_size: int) -> list[dict]:
    """One sampled completion a prompt, seeded by the prompt's place: every model draws with the
    same seeds."""
    items = [{"ids": ids, "max_new_tokens": section.max_new_tokens, "stop": [], "seed": section.seed * 100_003 + i,
              "temperature": section.temperature, "top_k": 0, "with_ids": True}
             for i, ids in enumerate(_encoded(tok, prompts, section))]
    return batched(items, 1 if section.temperature > 0 else batch_size, "generate")


def loglik_requests(tok, prompts: list[str], sampled: list[list[int]], section, batch_size: int) -> list[dict]:
    """log p(completion | prompt) of each (prompt, sampled tokens)."""
    items = [{"ctx": ids, "conts": [cont or [tok.eos_token_id]], "key": j}
             for j, (ids, cont) in enumerate(zip(_encoded(tok, prompts, section), sampled))]
    return batched(items, batch_size, "loglik")


def _score(model: str, storage_data: dict | None, prompts: list[str], texts: list[str]) -> list[float]:
    from cluster.storage import StorageConfig
    from lmjobs.rlhf.rewards import Scorer
    from lmjobs.rlhf.spec import RlhfRewardSection

    scorer = Scorer(RlhfRewardSection(model=model, retries=0),
                    storage_cfg=StorageConfig.model_validate(storage_data) if storage_data else None)
    return scorer.score(prompts, texts)["parts"]["reward_model"]


def _rewards(reward_model: str, prompts: list[str], texts: dict[str, list[str]], cfg) -> dict[str, list[float]]:
    """Every model's completions scored by the reward model in one Ray task (the model loaded once,
    resolved on that task's node)."""
    import ray

    names = list(texts)
    flat = ray.get(ray.remote(num_cpus=1)(_score).remote(
        reward_model, cfg.model_dump(mode="json") if cfg else None, prompts * len(names),
        [t for name in names for t in texts[name]]))
    return {name: flat[i * len(prompts):(i + 1) * len(prompts)] for i, name in enumerate(names)}


def run(spec, models: dict[str, Any], threads: int, progress: Callable[[str], None]) -> dict:
    """The judge section of `spec` over `models` (name -> lmjobs.evaluate.driver.Model)."""
    from lmjobs.evaluate.driver import _tokenizer

    section, compute, cfg = spec.judge, spec.compute, spec.output.storage
    prompts = prompts_of(section, cfg)
    candidates = section.candidates or [n for n in models if n not in (section.baseline, section.kl_reference)]
    reference = section.kl_reference or section.baseline
    vocab = _tokenizer(models[reference].directory).get_vocab()
    for name in candidates:  # the KL compares log-probs of the same token ids
        if _tokenizer(models[name].directory).get_vocab() != vocab:
            raise ValueError(f"judge.kl_reference: {reference}'s tokenizer differs from {name}'s; the KL needs "
                             "one vocabulary (name another kl_reference)")
    texts: dict[str, list[str]] = {}
    sampled: dict[str, list[list[int]]] = {}
    for name in [section.baseline, *candidates]:
        m = models[name]
        progress(f"[eval] judge: {name} samples {len(prompts)} completions")
        out = run_pool(m.ref, m.head, generation_requests(_tokenizer(m.directory), prompts, section, compute.batch_size),
                       compute, cfg, threads)
        flat = [t for batch in out for t in batch]
        texts[name], sampled[name] = [t["text"] for t in flat], [t["ids"] for t in flat]
    logps: dict[tuple[str, str], list[dict]] = {}
    for name in candidates:  # each candidate's samples under itself and under the reference
        for scorer in (name, reference):
            m = models[scorer]
            requests = loglik_requests(_tokenizer(m.directory), prompts, sampled[name], section, compute.batch_size)
            out = run_pool(m.ref, m.head, requests, compute, cfg, threads)
            flat = {item["key"]: o[0] for request, outs in zip(requests, out)
                    for item, o in zip(request["items"], outs)}
            logps[(name, scorer)] = [flat[j] for j in range(len(prompts))]
    progress(f"[eval] judge: the reward model scores {len(prompts) * (1 + len(candidates))} completions")
    rewards = _rewards(section.reward_model, prompts, texts, cfg)
    figures = {}
    for name in candidates:
        won = outcomes(rewards[name], rewards[section.baseline])
        lo, hi = wilson(sum(won), len(won))
        own, ref = logps[(name, name)], logps[(name, reference)]
        kl = [(o["logprob"] - r["logprob"]) / o["tokens"] for o, r in zip(own, ref)]
        figures[name] = {"win_rate": sum(won) / len(won), "ci95": [lo, hi], "n": len(won),
                         "wins": won.count(1.0), "ties": won.count(0.5), "losses": won.count(0.0),
                         "reward_mean": sum(rewards[name]) / len(prompts),
                         "baseline_reward_mean": sum(rewards[section.baseline]) / len(prompts),
                         "kl_per_token": sum(kl) / len(kl), "kl_reference": reference,
                         "response_tokens": sum(o["tokens"] for o in own) / len(own)}
    side = [{"prompt": p, **{name: {"text": texts[name][i], "reward": rewards[name][i]} for name in texts}}
            for i, p in enumerate(prompts[:section.show])]
    return {"baseline": section.baseline, "reward_model": section.reward_model, "prompts": section.prompts,
            "temperature": section.temperature, "candidates": figures, "side_by_side": side}


def report_md(judged: dict | None) -> list[str]:
    if not judged:
        return []
    lines = ["## Reward-model judge", "",
             f"Each candidate's completion against `{judged['baseline']}`'s on the same held-out prompts, "
             f"scored by `{judged['reward_model']}` (a tie counts half); temperature {judged['temperature']}.", "",
             "| candidate | win rate | 95 % interval | n | reward | baseline reward | KL / token | to | tokens |",
             "|---|---:|---|---:|---:|---:|---:|---|---:|"]
    for name, f in judged["candidates"].items():
        lines.append(f"| {name} | {f['win_rate']:.3f} | [{f['ci95'][0]:.3f}, {f['ci95'][1]:.3f}] | {f['n']} | "
                     f"{f['reward_mean']:+.3f} | {f['baseline_reward_mean']:+.3f} | {f['kl_per_token']:.4f} | "
                     f"{f['kl_reference']} | {f['response_tokens']:.1f} |")
    names = [judged["baseline"], *judged["candidates"]]
    lines += ["", "| prompt | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row in judged["side_by_side"]:
        cells = [f"{row[n]['text']} ({row[n]['reward']:+.2f})".replace("|", "\\|").replace("\n", " / ") for n in names]
        lines.append(f"| {row['prompt'][-200:]}".replace("\n", " / ") + " | " + " | ".join(cells) + " |")
    return lines + [""]
