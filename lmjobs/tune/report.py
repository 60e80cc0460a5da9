"""The report of a hyperparameter campaign, built only from the files the campaign leaves.

Reads CAMPAIGN_DIR (a local path or an s3:// URI): `campaign.yaml` and, per trial,
`trials/<id>/{trial.json, results.jsonl, attempts.jsonl, status.json}`.  Writes a leaderboard
(markdown and CSV), learning curves, parallel coordinates, parameter importance and
`report.json`.  No Ray and no torch: it runs anywhere that can read the directory, also while
the campaign is still running.
"""
from __future__ import annotations

import csv
import io
import json
import math

import yaml

from cluster import storage

_TRIAL_FILES = ("trial.json", "results.jsonl", "attempts.jsonl", "status.json")
_LEGEND_TRIALS = 10  # curves.png names this many trials (the best); more make the legend unreadable
_TERCILES = (1 / 3, 2 / 3)


def collect(campaign_dir: str, cfg: storage.StorageConfig | None = None) -> dict:
    """Everything the report shows, as plain data (see the module docstring for the files read).

    A trial's history keeps the last line per step, and drops what an abandoned timeline
    reported past the step a later attempt restarted from (a resume after a crash, a PBT
    exploit): the curve is the lineage of the trial's current weights.  Compute counts every
    attempt's work, redone or not.
    """
    spec_uri = storage.join(campaign_dir, "campaign.yaml")
    if not storage.exists(spec_uri, cfg):
        raise ValueError(f"{campaign_dir}: no campaign.yaml there; give the campaign directory that "
                         f"`lmjobs tune` writes (campaign.yaml beside trials/)")
    spec = yaml.safe_load(storage.read_text(spec_uri, cfg)) or {}
    metric, mode = spec.get("metric"), spec.get("mode", "max")
    if not metric or mode not in ("max", "min"):
        raise ValueError(f"{spec_uri}: needs `metric` (a reported key such as val_accuracy) and "
                         f"`mode` max or min; found metric={metric!r}, mode={mode!r}")

    trials_dir = storage.join(campaign_dir, "trials")
    files_by_trial: dict[str, set[str]] = {}
    for rel in storage.list_files(trials_dir, cfg):
        trial_id, _, name = rel.partition("/")
        name = name.split(storage.SEGMENTS + "/")[0]  # an S3 log's appended parts count as the log
        if name in _TRIAL_FILES:
            files_by_trial.setdefault(trial_id, set()).add(name)
    trials = [_trial(trial_id, storage.join(trials_dir, trial_id), files, metric, mode, cfg)
              for trial_id, files in sorted(files_by_trial.items())]

    starts = [t["first_start"] for t in trials if t["first_start"] is not None]
    ends = [t["last_result_time"] for t in trials if t["last_result_time"] is not None]
    budget = {
        "trials_started": sum(t["started"] for t in trials),
        "trials_planned": _trials_planned(spec),
        "trial_epochs": sum(t["epochs_trained"] for t in trials),
        "cpu_seconds": sum(t["cpu_seconds"] for t in trials),
        "gpu_seconds": sum(t["gpu_seconds"] for t in trials),
        "wall_seconds": max(0.0, max(ends) - min(starts)) if starts and ends else 0.0,
        **{status: sum(t["status"] == status for t in trials) for status in ("finished", "stopped_early", "errored")},
        "running": sum(t["status"] == "running" and t["started"] for t in trials),
    }
    ranked = _ranked(trials, mode)
    return {
        "dir": campaign_dir,
        "name": spec.get("name"),
        "metric": metric,
        "mode": mode,
        "space": spec.get("space") or {},
        "scheduler": spec.get("scheduler") or {},
        "trials": trials,
        "budget": budget,
        "best_trial": ranked[0]["trial_id"] if ranked else None,
    }


def _trials_planned(spec: dict) -> int | None:
    """budget.num_trials; a grid search may leave it null, meaning every combination once."""
    planned = (spec.get("budget") or {}).get("num_trials")
    if planned is None and (spec.get("searcher") or {}).get("kind") == "grid":
        planned = math.prod(len(_domain(name, domain)[1]) for name, domain in (spec.get("space") or {}).items())
    return planned


def _trial(trial_id: str, trial_dir: str, files: set[str], metric: str, mode: str, cfg) -> dict:
    def read_json(name):
        return json.loads(storage.read_text(storage.join(trial_dir, name), cfg)) if name in files else None

    def read_lines(name):
        return storage.read_jsonl(storage.join(trial_dir, name), cfg) if name in files else []

    info = read_json("trial.json") or {}
    status = read_json("status.json")
    results = read_lines("results.jsonl")
    attempts = {int(a["attempt"]): a for a in read_lines("attempts.jsonl")}
    steps_per_epoch = info.get("steps_per_epoch") or next(
        (line["step"] / line["epoch"] for line in results if line.get("epoch") and line.get("step")), None)

    results_by_attempt: dict[int, list[dict]] = {}
    for line in results:
        results_by_attempt.setdefault(int(line.get("attempt", 0)), []).append(line)
    attempt_ids = sorted(set(results_by_attempt) | set(attempts))
    restart_step: dict[int, int | None] = {}
    start_times, result_times = [], [line["time"] for line in results if line.get("time") is not None]
    epochs_trained = seconds = 0.0
    for attempt in attempt_ids:
        lines = results_by_attempt.get(attempt, [])
        donor = (attempts.get(attempt) or {}).get("from") or {}
        starts = [line["start_step"] for line in lines if line.get("start_step") is not None]
        restart_step[attempt] = min(starts) if starts else donor.get("step", 0 if attempt == 0 else None)
        times = [line["time"] for line in lines if line.get("time") is not None]
        # without an attempts.jsonl record the first result is the earliest time known
        start_time = (attempts.get(attempt) or {}).get("start") or min(times, default=None)
        if start_time is not None:
            start_times.append(start_time)
        if times:
            seconds += max(0.0, max(times) - start_time)
        epochs = [line["epoch"] for line in lines if line.get("epoch") is not None]
        if epochs:
            start_epoch = (restart_step[attempt] or 0) / steps_per_epoch if steps_per_epoch else 0.0
            epochs_trained += max(0.0, max(epochs) - start_epoch)

    # lines of an attempt past the step a later attempt restarted from belong to a dropped timeline
    history_by_step: dict[int, dict] = {}
    for line in sorted(results, key=lambda line: int(line.get("attempt", 0))):  # stable: file order within one
        attempt = int(line.get("attempt", 0))
        later = [restart_step[b] for b in attempt_ids if b > attempt and restart_step[b] is not None]
        if later and line["step"] > min(later):
            continue
        history_by_step[line["step"]] = line
    history = [history_by_step[step] for step in sorted(history_by_step)]

    best = _best_line(history, metric, mode)
    scored = [line for line in history if _finite(line.get(metric))]
    cpus, gpus = float(info.get("cpus") or 0.0), float(info.get("gpus") or 0.0)
    return {
        "trial_id": trial_id,
        "params": info.get("params") or {},
        "status": status["status"] if status else "running",
        "error": (status or {}).get("error"),
        "started": bool(attempts or results or status),
        "steps_per_epoch": steps_per_epoch,
        "epochs_planned": info.get("epochs"),
        "history": history,
        "best": {"value": best[metric], "step": best["step"], "epoch": best.get("epoch")} if best else None,
        "final": scored[-1][metric] if scored else None,
        "epochs_trained": epochs_trained,
        "seconds": seconds,
        "cpu_seconds": seconds * cpus,
        "gpu_seconds": seconds * gpus,
        "exploited_from": [{"attempt": a, **attempts[a]["from"]} for a in sorted(attempts) if attempts[a].get("from")],
        "first_start": min(start_times, default=None),
        "last_result_time": max(result_times, default=None),
    }


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _best_line(history: list[dict], metric: str, mode: str) -> dict | None:
    """The history line with the best finite metric; ties go to the earliest step."""
    best = None
    for line in history:
        value = line.get(metric)
        if _finite(value) and (best is None or (value > best[metric] if mode == "max" else value < best[metric])):
            best = line
    return best


def _ranked(trials: list[dict], mode: str) -> list[dict]:
    """Trials that have a metric, best first; ties go to the earliest trial id."""
    scored = sorted((t for t in trials if t["best"] is not None), key=lambda t: t["trial_id"])
    return sorted(scored, key=lambda t: -t["best"]["value"] if mode == "max" else t["best"]["value"])


def _domain(name: str, spec) -> tuple[str, list]:
    """(kind, arguments) of one search-space entry such as `{loguniform: [1e-5, 1e-3]}`."""
    if isinstance(spec, dict):
        given = {kind: args for kind, args in spec.items() if args is not None}
        if len(given) != 1:
            raise ValueError(f"space.{name}: a domain has exactly one kind (choice, grid, uniform, "
                             f"loguniform, int), found {sorted(given) or 'none'}")
        (kind, args), = given.items()
        # a spec dumped by field name says `integer` where the YAML said `int`
        return "int" if kind == "integer" else kind, list(args) if isinstance(args, (list, tuple)) else [args]
    return "choice", list(spec) if isinstance(spec, (list, tuple)) else [spec]


def _is_categorical(kind: str, values: list) -> bool:
    return kind in ("choice", "grid") or not all(_finite(v) for v in values)


def _key(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _quantile(sorted_values: list[float], q: float) -> float:
    position = (len(sorted_values) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def _group_labels(kind: str, values: list) -> list:
    """One group label per value: the value itself when there are few, else its tercile."""
    if _is_categorical(kind, values) or len(set(values)) <= 3:
        return [_key(v) for v in values]
    # rank terciles: a log scale (loguniform) would move the cut points but not the groups
    cuts = [_quantile(sorted(values), q) for q in _TERCILES]
    return [sum(v > cut for cut in cuts) for v in values]


def eta_squared(trials: list[dict], space: dict, metric: str, mode: str) -> dict[str, dict]:
    """Per searched parameter: eta^2 (variance of each trial's best `metric` explained by that
    parameter's groups), the number of groups and of trials it was computed on."""
    best = {}
    for t in trials:
        line = _best_line(t["history"], metric, mode)
        if line is not None:
            best[t["trial_id"]] = line[metric]
    out = {}
    for name, domain in space.items():
        kind, _ = _domain(name, domain)
        pairs = [(t["params"][name], best[t["trial_id"]]) for t in trials
                 if t["trial_id"] in best and name in t["params"]]
        labels = _group_labels(kind, [value for value, _ in pairs])
        ys = [y for _, y in pairs]
        groups: dict = {}
        for label, y in zip(labels, ys):
            groups.setdefault(label, []).append(y)
        mean = sum(ys) / len(ys) if ys else 0.0
        total = sum((y - mean) ** 2 for y in ys)
        # relative floor: float noise in identical metrics is not variance
        if len(ys) < 3 or total <= 1e-12 * len(ys) * max(1.0, mean * mean):
            out[name] = {"eta_squared": 0.0, "num_groups": len(groups), "num_trials": len(ys)}
            continue
        between = sum(len(g) * (sum(g) / len(g) - mean) ** 2 for g in groups.values())
        out[name] = {"eta_squared": min(1.0, between / total), "num_groups": len(groups), "num_trials": len(ys)}
    return out


def param_importance(trials: list[dict], space: dict, metric: str, mode: str) -> dict[str, float]:
    """Each parameter's share of the explained variance of the trials' best `metric`.

    Per parameter, eta^2 (the correlation ratio): trials are grouped by the parameter's value
    (choice, grid, and numeric parameters with at most 3 distinct values) or by rank terciles
    of it (continuous ones), and eta^2 is the share of the variance of the best metric that
    lies between the group means.  The eta^2 values are then normalised to sum to 1.

    This is a marginal, one-parameter-at-a-time estimate: interactions between parameters are
    not captured, and a parameter correlated with another in the sampled trials shares its
    credit.  With few trials noise alone gives eta^2 near (groups - 1) / (trials - 1).  Under
    PBT the params are each trial's starting values.  All zeros when fewer than 3 trials have
    the metric or the metric does not vary.
    """
    raw = {name: v["eta_squared"] for name, v in eta_squared(trials, space, metric, mode).items()}
    total = sum(raw.values())
    return {name: (value / total if total > 0 else 0.0) for name, value in raw.items()}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, uri: str, cfg) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")  # "tight": legends outside the axes stay in
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue(), cfg)
    return uri


def _short_ids(trial_ids: list[str]) -> dict[str, str]:
    """Trial ids without their common prefix (up to a separator): `train_3f2a_00007` -> `00007`."""
    prefix = trial_ids[0] if len(trial_ids) > 1 else ""
    for trial_id in trial_ids[1:]:
        while not trial_id.startswith(prefix):
            prefix = prefix[:-1]
    cut = max(prefix.rfind(sep) for sep in "_-./") + 1
    return {t: (t[cut:] or t)[-12:] for t in trial_ids}


def plot_curves(data: dict, uri: str, cfg: storage.StorageConfig | None = None) -> str:
    """The metric over epochs for every trial; best trial emphasised, stops and exploits marked."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    metric, mode = data["metric"], data["mode"]
    by_id = {t["trial_id"]: t for t in data["trials"]}
    ranked = _ranked(data["trials"], mode)
    short = _short_ids([t["trial_id"] for t in data["trials"]]) if data["trials"] else {}
    colours = plt.get_cmap("tab10")

    def points(trial):
        return [(line.get("epoch", line["step"] / (trial["steps_per_epoch"] or 1)), line[metric], line["step"])
                for line in trial["history"] if _finite(line.get(metric))]

    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110)
    handles = {}
    num_exploits = 0
    for rank in reversed(range(len(ranked))):  # worst first, so the best lie on top
        trial = ranked[rank]
        is_best = trial["trial_id"] == data["best_trial"]
        named = rank < _LEGEND_TRIALS
        colour = "black" if is_best else colours(rank % 10) if named else "0.7"
        pts = points(trial)
        # an exploit replaces the weights: the curve breaks there and resumes from the donor's point
        cuts = {exploit["step"] for exploit in trial["exploited_from"]}
        xs, ys = [], []
        for i, (x, y, step) in enumerate(pts):
            if i and any(pts[i - 1][2] <= cut < step for cut in cuts):
                xs.append(math.nan)
                ys.append(math.nan)
            xs.append(x)
            ys.append(y)
        label = f"{short[trial['trial_id']]}  {trial['best']['value']:.4g}" + (" (best)" if is_best else "")
        (line,) = ax.plot(xs, ys, color=colour, lw=2.8 if is_best else 1.3 if named else 0.9,
                          alpha=1.0 if named else 0.7, marker="." if len(pts) < 40 else None, ms=4,
                          zorder=4 if is_best else 3 if named else 2)
        if named:
            handles[rank] = (line, label)
        if trial["status"] == "stopped_early":
            ax.plot(xs[-1:], ys[-1:], marker="x", ms=9, mew=2.2, color=colour, ls="none", zorder=5)
        elif trial["status"] == "errored":
            ax.plot(xs[-1:], ys[-1:], marker="D", ms=6, mfc="white", mec="tab:red", mew=1.8, ls="none", zorder=5)
        for exploit in trial["exploited_from"]:
            # the exploit jumps from the donor's curve at the checkpoint's step to this trial's next point
            donor = by_id.get(exploit.get("trial_id"))
            at = [p for p in points(donor) if p[2] <= exploit["step"]] if donor else []
            at = at or [p for p in pts if p[2] <= exploit["step"]]
            after = [p for p in pts if p[2] > exploit["step"]]
            if not at:
                continue
            num_exploits += 1
            ax.plot([at[-1][0]] + [p[0] for p in after[:1]], [at[-1][1]] + [p[1] for p in after[:1]],
                    ls=":", color=colour, lw=1.2, zorder=5)
            ax.plot([at[-1][0]], [at[-1][1]], marker="*", ms=13, color=colour, mec="black", mew=0.6, ls="none", zorder=6)

    counts = data["budget"]
    legend = [handles[r] for r in sorted(handles)]
    if len(ranked) > _LEGEND_TRIALS:
        legend.append((Line2D([], [], color="0.7", lw=0.9), f"{len(ranked) - _LEGEND_TRIALS} more trials"))
    if counts["stopped_early"]:
        legend.append((Line2D([], [], marker="x", ms=8, mew=2, color="0.3", ls="none"),
                       f"stopped early ({counts['stopped_early']})"))
    if counts["errored"]:
        legend.append((Line2D([], [], marker="D", ms=6, mfc="white", mec="tab:red", mew=1.8, ls="none"),
                       f"errored ({counts['errored']})"))
    if num_exploits:
        legend.append((Line2D([], [], marker="*", ms=12, color="0.5", mec="black", mew=0.6, ls=":"),
                       f"PBT exploit: donor's point ({num_exploits})"))
    if legend:
        ax.legend([h for h, _ in legend], [text for _, text in legend], loc="upper left",
                  bbox_to_anchor=(1.01, 1.0), fontsize=8, title=f"trial  best {metric}", title_fontsize=8)
    else:
        ax.text(0.5, 0.5, f"no trial has reported {metric} yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{metric} ({'higher' if mode == 'max' else 'lower'} is better)")
    ax.set_title(f"{data['name']}: {len(ranked)} trials with {metric}, "
                 f"{counts['stopped_early']} stopped early, {counts['errored']} errored", fontsize=10)
    ax.grid(alpha=0.3)
    return _save_png(fig, uri, cfg)


def _axis(kind: str, args: list, values: list) -> tuple:
    """(value -> position in [0, 1], [(position, tick label)], suffix for the axis name)."""
    if _is_categorical(kind, values):
        categories = list(args) if kind in ("choice", "grid") else []
        for v in values:
            if _key(v) not in {_key(c) for c in categories}:
                categories.append(v)
        spots = {_key(c): (i / (len(categories) - 1) if len(categories) > 1 else 0.5) for i, c in enumerate(categories)}
        return (lambda v: spots.get(_key(v), math.nan)), [(spots[_key(c)], str(c)[:12]) for c in categories], ""
    numbers = [float(v) for v in values]
    bounds = [float(a) for a in args[:2]] if len(args) >= 2 and all(_finite(a) for a in args[:2]) else []
    low, high = min(numbers + bounds, default=0.0), max(numbers + bounds, default=1.0)
    log = kind == "loguniform" and low > 0
    scale = math.log10 if log else float
    span = scale(high) - scale(low)

    def position(v):
        return (scale(float(v)) - scale(low)) / span if span > 0 else 0.5

    if log:
        decades = [10.0 ** k for k in range(math.ceil(math.log10(low)), math.floor(math.log10(high)) + 1)]
        ticks = decades if len(decades) >= 2 else [low, math.sqrt(low * high), high]
    elif span > 0:
        from matplotlib.ticker import MaxNLocator

        ticks = [t for t in MaxNLocator(5, integer=kind == "int").tick_values(low, high) if low <= t <= high]
    else:
        ticks = [low]
    labels = [f"{int(round(t))}" if kind == "int" else f"{t:.3g}" for t in ticks]
    return position, list(zip(map(position, ticks), labels)), " (log)" if log else ""


def plot_parallel_coordinates(data: dict, uri: str, cfg: storage.StorageConfig | None = None) -> str:
    """One axis per searched parameter and one for the metric; one line per trial, coloured by it."""
    plt = _pyplot()
    import matplotlib.patheffects as path_effects
    from matplotlib.colors import Normalize

    metric, mode = data["metric"], data["mode"]
    trials = _ranked(data["trials"], mode)
    names = list(data["space"])
    axes = []
    for name in names:
        kind, args = _domain(name, data["space"][name])
        axes.append((name, *_axis(kind, args, [t["params"][name] for t in trials if name in t["params"]])))
    scores = [t["best"]["value"] for t in trials]
    metric_axis = _axis("uniform", [], scores) if scores else ((lambda v: 0.5), [], "")
    axes.append((f"best {metric}", *metric_axis))

    fig, ax = plt.subplots(figsize=(max(6.0, 1.7 * len(axes) + 2.0), 4.8), dpi=110)
    cmap = plt.get_cmap("viridis" if mode == "max" else "viridis_r")  # bright is good either way
    norm = Normalize(min(scores, default=0.0), max(scores, default=1.0))
    for x, (_, _, ticks, _) in enumerate(axes):
        ax.axvline(x, color="0.35", lw=1, zorder=1)
        for y, label in ticks:
            ax.text(x - 0.04, y, label, ha="right", va="center", fontsize=7, zorder=7,
                    bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8})
    for trial in reversed(trials):  # worst first, so the best lie on top
        ys = [position(trial["params"][name]) if name in trial["params"] else math.nan
              for name, position, _, _ in axes[:-1]]
        ys.append(axes[-1][1](trial["best"]["value"]))
        colour = cmap(norm(trial["best"]["value"]))
        if trial["trial_id"] == data["best_trial"]:
            ax.plot(range(len(axes)), ys, color=colour, lw=3.5, zorder=6,
                    path_effects=[path_effects.Stroke(linewidth=5.5, foreground="black"), path_effects.Normal()])
        else:
            ax.plot(range(len(axes)), ys, color=colour, lw=1.4, alpha=0.85, zorder=3)
    if not trials:
        ax.text(0.5, 0.5, f"no trial has reported {metric} yet", ha="center", va="center", transform=ax.transAxes,
                zorder=8, bbox={"fc": "white", "ec": "0.6"})
    else:
        colourbar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.02)
        colourbar.set_label(f"best {metric}")
    ax.set_xticks(range(len(axes)), [name + suffix for name, _, _, suffix in axes], fontsize=8,
                  rotation=20 if len(axes) > 5 else 0)
    ax.set_xlim(-0.6, len(axes) - 0.6)
    ax.set_ylim(-0.05, 1.05)
    ax.set_yticks([])
    for side in ("left", "right", "top", "bottom"):
        ax.spines[side].set_visible(False)
    ax.xaxis.set_ticks_position("top")
    best = f"; best {trials[0]['trial_id']} ({trials[0]['best']['value']:.4g}) outlined" if trials else ""
    ax.set_title(f"{data['name']}: {len(trials)} trials with {metric}{best}", fontsize=10, pad=24)
    return _save_png(fig, uri, cfg)


def plot_importance(importance: dict[str, float], metric: str, num_trials: int, uri: str,
                    cfg: storage.StorageConfig | None = None) -> str:
    """Horizontal bars of param_importance, largest on top."""
    plt = _pyplot()
    ordered = sorted(importance.items(), key=lambda item: item[1])
    fig, ax = plt.subplots(figsize=(6.5, max(2.4, 0.45 * len(ordered) + 1.4)), dpi=110)
    ax.barh([name for name, _ in ordered], [share for _, share in ordered], color="tab:blue")
    for y, (_, share) in enumerate(ordered):
        ax.text(share + 0.01, y, f"{share:.2f}", va="center", fontsize=8)
    if not any(importance.values()):
        ax.text(0.5, 0.5, f"no estimate: fewer than 3 trials with {metric}, or no variance",
                ha="center", va="center", transform=ax.transAxes, fontsize=9)
    ax.set_xlim(0, 1.1)
    ax.set_xlabel(f"share of the explained variance of best {metric} (eta², one parameter at a time)", fontsize=8)
    ax.set_title(f"parameter importance over {num_trials} trials", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return _save_png(fig, uri, cfg)


def leaderboard(data: dict) -> tuple[list[str], list[list]]:
    """(columns, rows) best first; trials without a metric last, unranked."""
    metric, names = data["metric"], list(data["space"])
    ranked = _ranked(data["trials"], data["mode"])
    ranked_ids = {t["trial_id"] for t in ranked}
    unranked = [t for t in data["trials"] if t["trial_id"] not in ranked_ids]
    columns = ["rank", "trial", "status", *names, f"best {metric}", "at epoch", f"final {metric}", "epochs trained"]
    rows = []
    for rank, trial in enumerate(ranked + unranked, 1):
        best = trial["best"] or {}
        status = trial["status"] if trial["started"] else "pending"  # no status.json either way
        rows.append([rank if trial["best"] else None, trial["trial_id"], status,
                     *[trial["params"].get(name) for name in names],
                     best.get("value"), best.get("epoch"), trial["final"], trial["epochs_trained"]])
    return columns, rows


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        value = json.dumps(value)
    return str(value).replace("|", "\\|")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h {rest // 60:02d}m {rest % 60:02d}s" if hours else f"{rest // 60}m {rest % 60:02d}s"


def _markdown(data: dict, columns: list[str], rows: list[list], importance: dict[str, float],
              raw: dict[str, dict], plots: list[str]) -> str:
    metric, budget = data["metric"], data["budget"]
    best = next((t for t in data["trials"] if t["trial_id"] == data["best_trial"]), None)
    scheduler = data["scheduler"].get("kind", "fifo")
    out = [f"# Campaign {data['name']}", "",
           f"Metric `{metric}` ({data['mode']}), scheduler {scheduler}. "
           + (f"Best trial **{best['trial_id']}**: {metric} {best['best']['value']:.4g} at epoch "
              f"{_cell(best['best']['epoch'])} ({best['status']})." if best else f"No trial has reported {metric} yet."),
           "", "## Leaderboard", "",
           "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    if scheduler == "pbt":
        exploited = sum(bool(t["exploited_from"]) for t in data["trials"])
        out += ["", f"PBT: parameters are each trial's starting values; {exploited} trials took over a "
                    f"donor's checkpoint (stars in curves.png)."]
    planned = budget["trials_planned"]
    out += ["", "## Budget", "", "| | |", "|---|---|",
            f"| trials started | {budget['trials_started']}" + (f" of {planned} planned |" if planned else " |"),
            f"| finished / stopped early / errored / running | {budget['finished']} / {budget['stopped_early']} / "
            f"{budget['errored']} / {budget['running']} |",
            f"| trial-epochs trained (redone work included) | {budget['trial_epochs']:.4g} |",
            f"| CPU-seconds held | {budget['cpu_seconds']:.0f} ({budget['cpu_seconds'] / 3600:.2f} CPU-hours) |",
            f"| GPU-seconds held | {budget['gpu_seconds']:.0f} ({budget['gpu_seconds'] / 3600:.2f} GPU-hours) |",
            f"| wall time | {_duration(budget['wall_seconds'])} |",
            "", "## Parameter importance", "",
            f"Share of the variance of each trial's best {metric} explained by one parameter at a time "
            f"(eta², normalised over parameters). Interactions are not captured; with n trials in k "
            f"groups noise alone gives eta² near (k-1)/(n-1).", "",
            "| parameter | share | eta² | groups | trials |", "|---|---|---|---|---|"]
    out += [f"| {name} | {share:.2f} | {raw[name]['eta_squared']:.2f} | {raw[name]['num_groups']} | "
            f"{raw[name]['num_trials']} |" for name, share in sorted(importance.items(), key=lambda i: -i[1])]
    out += ["", "## Plots", ""] + [f"![{name[:-4]}]({name})" for name in plots]
    return "\n".join(out) + "\n"


def _json_safe(value):
    """NaN and infinities (a diverged trial's loss) as null: strict JSON readers refuse them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_report(campaign_dir: str, cfg: storage.StorageConfig | None = None, out_dir: str | None = None) -> dict:
    """Collect the campaign and write leaderboard.{md,csv}, curves.png, parallel_coordinates.png,
    importance.png and report.json into `out_dir` (default CAMPAIGN_DIR/report)."""
    data = collect(campaign_dir, cfg)
    out_dir = out_dir or storage.join(campaign_dir, "report")
    metric, mode = data["metric"], data["mode"]
    raw = eta_squared(data["trials"], data["space"], metric, mode)
    importance = param_importance(data["trials"], data["space"], metric, mode)
    num_scored = sum(t["best"] is not None for t in data["trials"])

    plots = [plot_curves(data, storage.join(out_dir, "curves.png"), cfg),
             plot_parallel_coordinates(data, storage.join(out_dir, "parallel_coordinates.png"), cfg),
             plot_importance(importance, metric, num_scored, storage.join(out_dir, "importance.png"), cfg)]
    plot_names = [uri.rsplit("/", 1)[-1] for uri in plots]

    columns, rows = leaderboard(data)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    writer.writerows([["" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else v for v in row]
                      for row in rows])
    leaderboard_csv = storage.join(out_dir, "leaderboard.csv")
    storage.write_text(leaderboard_csv, buf.getvalue(), cfg)
    leaderboard_md = storage.join(out_dir, "leaderboard.md")
    storage.write_text(leaderboard_md, _markdown(data, columns, rows, importance, raw, plot_names), cfg)

    report_json = storage.join(out_dir, "report.json")
    files = ["leaderboard.md", "leaderboard.csv", *plot_names, "report.json"]
    storage.write_text(report_json, json.dumps(_json_safe({**data, "importance": importance, "eta_squared": raw,
                                                           "files": files}), indent=1), cfg)
    return {"dir": out_dir, "leaderboard_md": leaderboard_md, "leaderboard_csv": leaderboard_csv, "plots": plots,
            "report_json": report_json, "best_trial": data["best_trial"], "budget": data["budget"]}
