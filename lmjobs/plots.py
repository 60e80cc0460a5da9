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
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue(), cfg)
    return uri
