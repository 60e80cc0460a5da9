"""What scores a completion: Python functions, a reward model, a remote HTTP scorer.  No Ray.

`Scorer` is what the reward actor holds; it returns the weighted total and each source's score
so the metrics show what moved."""
from __future__ import annotations

import concurrent.futures
import importlib
import importlib.util
import json
import math
import os
import pathlib
import time
import types
import urllib.error
import urllib.request
from typing import Callable

from lmjobs.rlhf.spec import RlhfRewardSection


def load_function(path: str, source: str | None = None) -> Callable:
    """`module:function` or `path/to/file.py:function`; with `source` (the file's text, shipped
    with the job by the driver) the file is built from that text, on whichever node this runs."""
    where, _, name = path.rpartition(":")
    if where.endswith(".py"):
        file = pathlib.Path(where).expanduser()
        if source is None:
            if not file.is_file():
                raise FileNotFoundError(f"reward.functions: {file} does not exist")
            source = file.read_text(encoding="utf-8")
        module = types.ModuleType(f"lmjobs_reward_{file.stem}")
        module.__file__ = str(file)
        exec(compile(source, str(file), "exec"), module.__dict__)  # the user's own reward code, as an import would
    else:
        module = importlib.import_module(where)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise AttributeError(f"reward.functions: {path}: {name} is not a function of {where}")
    return fn


def shipped(section: RlhfRewardSection) -> tuple[RlhfRewardSection, dict[str, str]]:
    """(section, sources): every `file.py:fn` read on the driver, its text travelling to the reward
    actors with the section (a driver path may not exist on their node); modules load by import
    there (the job's runtime env or the image carries them)."""
    sources: dict[str, str] = {}
    for f in section.functions:
        where = f.path.rpartition(":")[0]
        if where.endswith(".py"):
            file = pathlib.Path(where).expanduser()
            if not file.is_file():
                raise FileNotFoundError(f"reward.functions: {file} does not exist")
            sources[f.path] = file.read_text(encoding="utf-8")
    for f in section.functions:  # fail on a wrong name before any cluster work
        load_function(f.path, sources.get(f.path))
    return section, sources


def auth_header(section: RlhfRewardSection) -> str | None:
    """The Authorization header for reward.url: the value of the environment variable that
    reward.url_auth_env names, read where the driver runs (an unset one fails before any cluster work)."""
    if not section.url_auth_env:
        return None
    value = os.environ.get(section.url_auth_env)
    if not value:
        raise ValueError(f"reward.url_auth_env: the environment variable {section.url_auth_env} is not set")
    return value


class RewardSourceFailed(RuntimeError):
    """A reward source still failing after its retries: names the source, the step and the cause."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise urllib.error.HTTPError(req.full_url, code, f"redirect refused ({code})", headers, fp)


class Scorer:
    def __init__(self, section: RlhfRewardSection, sources: dict[str, str] | None = None, storage_cfg=None,
                 auth: str | None = None, sleep: Callable[[float], None] = time.sleep):
        self.section, self.auth, self.sleep = section, auth, sleep
        self._opener = urllib.request.build_opener(_NoRedirect)
        self.functions = [(f, load_function(f.path, (sources or {}).get(f.path))) for f in section.functions]
        self.model = self.tokenizer = None
        if section.model:
            from transformers import AutoModelForSequenceClassification

            from lmjobs.finetune.base import resolve, tokenizer

            from lmjobs.finetune.features import REWARD_ENCODING

            directory = resolve(section.model, storage_cfg)  # on this actor's node
            self.tokenizer = tokenizer(directory)
            self.model = AutoModelForSequenceClassification.from_pretrained(directory).eval()
            # an lmjobs reward model records its training length; another classifier gets 512 tokens
            saved = pathlib.Path(directory, REWARD_ENCODING)
            self.max_len = json.loads(saved.read_text())["max_seq_len"] if saved.exists() else 512
            if self.model.config.pad_token_id is None:  # the score is read at the last real token
                self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def score(self, prompts: list[str], completions: list[str], step: int | None = None) -> dict:
        """{"total": [float], "parts": {source: [float]}} for the completions (one prompt each)."""
        parts: dict[str, list[float]] = {}
        total = [0.0] * len(completions)
        for f, fn in self.functions:
            values = self._tried(f"reward function {f.path}", step, self.section.timeout_s,
                                 lambda f=f, fn=fn: self._function(f, fn, prompts, completions))
            parts[f.path.rpartition(":")[2]] = values
            total = [t + f.weight * v for t, v in zip(total, values)]
        if self.model is not None:
            values = self._tried(f"reward model {self.section.model}", step, None,
                                 lambda: self._model_scores(prompts, completions))
            parts["reward_model"] = values
            total = [t + self.section.model_weight * v for t, v in zip(total, values)]
        if self.section.url:
            values = self._tried("reward.url", step, self.section.url_timeout_s, lambda: self._remote(prompts, completions))
            parts["remote"] = values
            total = [t + self.section.url_weight * v for t, v in zip(total, values)]
        bad = [i for i, v in enumerate(total) if not math.isfinite(v)]
        if bad:
            raise ValueError(f"reward: completion {bad[0]} scored {total[bad[0]]} (not a finite number)")
        return {"total": total, "parts": parts}

    def _tried(self, source: str, step: int | None, timeout_s: float | None, fn: Callable[[], list[float]]) -> list[float]:
        """fn's result; an exception or a call past `timeout_s` is tried again `reward.retries`
        times, after reward.retry_backoff_s, then twice that, ..."""
        tries = 1 + self.section.retries
        where = f" at step {step}" if step is not None else ""
        for attempt in range(tries):
            try:
                if timeout_s is None:
                    return fn()
                pool = concurrent.futures.ThreadPoolExecutor(1)
                try:  # a call past its deadline is left to end in its thread; its result is dropped
                    return pool.submit(fn).result(timeout=timeout_s)
                except concurrent.futures.TimeoutError:
                    raise TimeoutError(f"no answer within {timeout_s:g} s") from None
                finally:
                    pool.shutdown(wait=False)
            except Exception as exc:  # noqa: BLE001 - the user's code may raise anything
                if attempt + 1 == tries:
                    raise RewardSourceFailed(f"{source} failed{where}, {tries} time(s) in a row; the last: "
                                             f"{type(exc).__name__}: {exc}") from exc
                wait = self.section.retry_backoff_s * 2 ** attempt
                print(f"[rlhf] {source} failed{where} ({type(exc).__name__}: {exc}); trying again in {wait:g} s",
                      flush=True)
                self.sleep(wait)
        raise AssertionError("unreachable")

    @staticmethod
    def _function(f, fn, prompts: list[str], completions: list[str]) -> list[float]:
        if f.call == "text":
            values = [float(fn(c)) for c in completions]
        else:
            values = [float(v) for v in fn(prompts=prompts, completions=completions)]
        if len(values) != len(completions):
            raise ValueError(f"reward function {f.path} returned {len(values)} scores for {len(completions)} "
                             "completions")
        return values

    def _model_scores(self, prompts: list[str], completions: list[str]) -> list[float]:
        import torch

        from lmjobs.finetune.features import reward_batch

        # encoded as the reward model's training encoded a pair (lmjobs.finetune.features.reward_ids)
        enc = reward_batch(self.tokenizer, list(zip(prompts, completions)), self.max_len)
        with torch.no_grad():
            out = self.model(input_ids=torch.as_tensor(enc["input_ids"], dtype=torch.long),
                             attention_mask=torch.as_tensor(enc["attention_mask"], dtype=torch.long))
        return out.logits[:, 0].float().tolist()

    def _remote(self, prompts: list[str], completions: list[str]) -> list[float]:
        """One POST, redirects refused, the answer read up to reward.url_max_bytes (the whole call's
        deadline, url_timeout_s, is kept by `_tried`)."""
        section = self.section
        body = json.dumps({"prompts": prompts, "completions": completions}).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": self.auth} if self.auth else {})}
        request = urllib.request.Request(section.url, data=body, headers=headers)
        with self._opener.open(request, timeout=section.url_timeout_s) as response:
            answer = response.read(section.url_max_bytes + 1)
        if len(answer) > section.url_max_bytes:
            raise ValueError(f"reward.url: the answer is longer than url_max_bytes = {section.url_max_bytes}")
        values = json.loads(answer)["rewards"]
        if len(values) != len(completions):
            raise ValueError(f"reward.url returned {len(values)} rewards for {len(completions)} completions")
        return [float(v) for v in values]


class RunningMoments:
    """Mean and variance of every score seen (Chan et al.'s parallel update), for normalising."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: list[float]) -> None:
        n = len(values)
        if not n:
            return
        mean = sum(values) / n
        m2 = sum((v - mean) ** 2 for v in values)
        delta, total = mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.m2 += m2 + delta ** 2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 1 else 1.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]
