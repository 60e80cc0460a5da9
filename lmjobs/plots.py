"""Pictures for run directories (matplotlib, headless)."""
from __future__ import annotations

import io

from cluster import storage


def loss_curve(metrics: list[dict], uri: str, title: str, cfg: storage.StorageConfig | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], marker=".", label="train loss")
    val = [m for m in metrics if m.get("val_loss") is not None]
    if val:
        ax.plot([m["step"] for m in val], [m["val_loss"] for m in val], marker="o", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, uri, cfg)


def _save(fig, uri: str, cfg) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue(), cfg)
    return uri


def metric_curve(metrics: list[dict], key: str, uri: str, title: str, cfg: storage.StorageConfig | None = None) -> str:
    """A held-out metric (e.g. val_accuracy) over optimizer steps: the learning curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [m for m in metrics if m.get(key) is not None]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot([m["step"] for m in points], [m[key] for m in points], marker="o", color="tab:green")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, uri, cfg)


def confusion(matrix: list[list[int]], labels: list[str], uri: str, title: str,
              cfg: storage.StorageConfig | None = None) -> str:
    """Rows gold, columns predicted, counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(3.0, 0.6 * len(labels) + 1.5)
    fig, ax = plt.subplots(figsize=(size + 1, size), dpi=110)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    peak = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    return _save(fig, uri, cfg)
