"""An eval run's report: results.json, predictions, report.md / report.html, samples side by side,
and plots (accuracy vs k with 95 % intervals; perplexity per model, or vs training step when the
models are checkpoints of one run)."""
from __future__ import annotations

import html
import json

from cluster import storage
from lmjobs.evaluate.judge import report_md as judge_md
from lmjobs.plots import _save


def _headline(figures: dict) -> str:
    m = figures["metric"]
    ci = figures.get("ci95")
    text = f"{figures[m]:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{figures[m]:.3f}"
    return text + (f" (acc {figures['acc']:.3f}, acc_norm {figures['acc_norm']:.3f})" if "acc_norm" in figures else "")


def tables(record: dict) -> list[str]:
    """The markdown body: one table per kind of result, models as rows."""
    results, lines = record["results"], []
    models = list(results)
    step = {m["name"]: m["step"] for m in record["models"]}
    ppl_sets = sorted({s for r in results.values() for s in r["perplexity"]})
    if ppl_sets:
        lines += ["## Perplexity", "", "| model | step | " + " | ".join(f"{s} ppl (nll, tokens)" for s in ppl_sets) + " |",
                  "|---|---|" + "---|" * len(ppl_sets)]
        for m in (m for m in models if results[m]["perplexity"]):
            cells = []
            for s in ppl_sets:
                p = results[m]["perplexity"].get(s)
                cells.append(f"{p['ppl']:.3f} ({p['nll']:.4f}, {p['tokens']})" if p else "-")
            lines.append(f"| {m} | {step.get(m) if step.get(m) is not None else '-'} | " + " | ".join(cells) + " |")
        lines.append("")
    tasks = sorted({t for r in results.values() for t in r["icl"]})
    for t in tasks:
        shots = sorted({int(k) for r in results.values() if t in r["icl"] for k in r["icl"][t]["shots"]})
        any_fig = next(r["icl"][t] for r in results.values() if t in r["icl"])
        metric = next(iter(any_fig["shots"].values()))["metric"]
        lines += [f"## In-context: {t} ({any_fig['kind']}; {metric}, 95 % interval)", "",
                  "| model | " + " | ".join(f"k={k}" for k in shots) + " |", "|---|" + "---|" * len(shots)]
        for m in models:
            if t in results[m]["icl"]:
                per = results[m]["icl"][t]["shots"]
                lines.append(f"| {m} | " + " | ".join(_headline(per[str(k)]) if str(k) in per else "-" for k in shots)
                             + " |")
        n = next(iter(any_fig["shots"].values()))["n"]
        lines += ["", f"{n} examples per k." + (f" Rejected records: {len(record['rejects'][t])} (see results.json)."
                                                 if t in record.get("rejects", {}) else ""), ""]
    names = sorted({t for r in results.values() for t in r["task_metrics"]})
    for t in names:
        lines += [f"## Task metrics: {t}", "", "| model | metric | value | n |", "|---|---|---|---|"]
        for m in models:
            f = results[m]["task_metrics"].get(t)
            if f:
                extra = ", ".join(f"{k} {f[k]:.4f}" for k in ("macro_f1", "precision", "recall", "exact_match")
                                  if k in f)
                lines.append(f"| {m} | {f['metric']} | {_headline(f)}{' (' + extra + ')' if extra else ''} | {f['n']} |")
        lines.append("")
    return lines


def samples_md(record: dict) -> list[str]:
    results = record["results"]
    with_samples = [m for m, r in results.items() if r["samples"]]
    if not with_samples:
        return []
    lines = ["## Samples (fixed prompts and seeds)", "", "| prompt | seed | " + " | ".join(with_samples) + " |",
             "|---|---|" + "---|" * len(with_samples)]
    first = results[with_samples[0]]["samples"]
    for i, s in enumerate(first):
        cells = [results[m]["samples"][i]["text"].replace("|", "\\|").replace("\n", " / ") for m in with_samples]
        lines.append(f"| {s['prompt'].replace('|', chr(92) + '|')} | {s['seed']} | " + " | ".join(cells) + " |")
    return lines + [""]


def plot_icl(record: dict, uri: str, cfg) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = record["results"]
    tasks = sorted({t for r in results.values() for t in r["icl"]})
    if not tasks:
        return None
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), dpi=110, squeeze=False)
    for ax, t in zip(axes[0], tasks):
        metric = None
        for m, r in results.items():
            if t not in r["icl"]:
                continue
            per = r["icl"][t]["shots"]
            ks = sorted(int(k) for k in per)
            metric = per[str(ks[0])]["metric"]
            ys = [per[str(k)][metric] for k in ks]
            lo = [y - per[str(k)]["ci95"][0] for y, k in zip(ys, ks)]
            hi = [per[str(k)]["ci95"][1] - y for y, k in zip(ys, ks)]
            ax.errorbar(ks, ys, yerr=[lo, hi], marker="o", capsize=4, label=m)
        if any(r["icl"].get(t, {}).get("kind") in ("classification", "multiple_choice") for r in results.values()):
            chance = _chance(record, t)
            if chance:
                ax.axhline(chance, color="grey", linestyle=":", label=f"majority class {chance:.2f}")
        ax.set_xlabel("demonstrations in the prompt (k)")
        ax.set_ylabel(f"{metric} (95 % interval)")
        ax.set_title(t)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, uri, cfg)


def _chance(record: dict, task: str) -> float | None:
    """The majority-class rate among the scored examples (what always answering one label gets)."""
    preds = next((r["predictions"][task] for r in record["results"].values() if task in r["predictions"]), [])
    if not preds:
        return None
    k0 = preds[0]["k"]
    golds = [p["gold"] for p in preds if p["k"] == k0]
    return max(golds.count(g) for g in set(golds)) / len(golds)


def plot_perplexity(record: dict, uri: str, cfg) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = record["results"]
    sets = sorted({s for r in results.values() for s in r["perplexity"]})
    if not sets:
        return None
    step = {m["name"]: m["step"] for m in record["models"]}
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    stepped = [m for m in results if step.get(m) is not None and results[m]["perplexity"]]
    if len(stepped) >= 2:  # checkpoints of a run: perplexity against training step
        for s in sets:
            pts = sorted((step[m], results[m]["perplexity"][s]["ppl"]) for m in stepped if s in results[m]["perplexity"])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=s)
        ax.set_xlabel("training step")
        ax.set_title("perplexity across checkpoints")
    else:
        models = [m for m in results if results[m]["perplexity"]]
        width = 0.8 / len(sets)
        for i, s in enumerate(sets):
            ax.bar([j + i * width for j in range(len(models))],
                   [results[m]["perplexity"].get(s, {}).get("ppl", 0) for m in models], width, label=s)
        ax.set_xticks([j + width * (len(sets) - 1) / 2 for j in range(len(models))], models, fontsize=8)
        ax.set_title("perplexity per model")
    ax.set_ylabel("perplexity (token-weighted)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, uri, cfg)


def write_report(record: dict, out: str, cfg) -> dict:
    """Everything lands in `out`; returns the paths."""
    paths = {"results_json": storage.join(out, "results.json"), "report_md": storage.join(out, "report.md"),
             "report_html": storage.join(out, "report.html"), "plots": []}
    predictions = {}
    for model, r in record["results"].items():
        for task, rows in r.get("predictions", {}).items():
            uri = storage.join(out, "predictions", f"{model}.{task}.jsonl")
            storage.write_text(uri, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), cfg)
            predictions[f"{model}/{task}"] = uri
    slim = {**record, "results": {m: {k: v for k, v in r.items() if k != "predictions"}
                                  for m, r in record["results"].items()}, "predictions": predictions}
    storage.write_text(paths["results_json"], json.dumps(slim, indent=2, ensure_ascii=False), cfg)
    for name, fn in (("icl_accuracy_vs_k.png", plot_icl), ("perplexity.png", plot_perplexity)):
        made = fn(record, storage.join(out, name), cfg)
        if made:
            paths["plots"].append(made)
    body = [f"# Evaluation: {record['name']}", "",
            "Models: " + ", ".join(f"{m['name']} ({m['path']})" for m in record["models"]), "",
            *tables(record), *samples_md(record), *judge_md(record.get("judge"))]
    body += [f"![{p.rsplit('/', 1)[-1]}]({p.rsplit('/', 1)[-1]})" for p in paths["plots"]]
    md = "\n".join(body) + "\n"
    storage.write_text(paths["report_md"], md, cfg)
    storage.write_text(paths["report_html"], _html(md, record["name"]), cfg)
    return paths


def _html(md: str, title: str) -> str:
    """A plain page from the markdown above: headings, tables, images, paragraphs."""
    out, table = [], False
    for line in md.splitlines():
        if line.startswith("|") and set(line.replace("|", "").strip()) <= set("-"):
            continue
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split(" | ")]
            tag = "th" if not table else "td"
            out.append(("<table>" if not table else "") + "<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
            table = True
            continue
        if table:
            out.append("</table>")
            table = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("!["):
            src = line[line.index("(") + 1:-1]
            out.append(f'<p><img src="{html.escape(src)}" alt="{html.escape(src)}"></p>')
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    if table:
        out.append("</table>")
    style = "body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse}" \
            "td,th{border:1px solid #ccc;padding:.3em .6em}"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>" + "\n".join(out) + "</body></html>\n")
