"""The PNGs drawn from results.json: perplexity.png, passkey_<implementation>.png (heatmaps), cost.png.

Points that were not measured are shown as such: out of memory (OOM, or x on the cost panels) or skipped.
"""

from __future__ import annotations

from pathlib import Path

import torch

from script_common import pyplot


def _tick(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _length_axis(ax, lengths):
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths)
    ax.set_xticklabels([_tick(n) for n in lengths], rotation=45)
    ax.set_xlabel("context length (tokens)")


def _not_measured(entry: dict) -> str:
    return "OOM" if entry.get("out_of_memory") else "skipped"


def plot_perplexity(results: dict, path: Path, title: str):
    """Perplexity by length, one line per implementation; the lengths not measured named in its legend."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lengths = set()
    for name, points in results["perplexity"].items():
        measured = sorted((int(n), r["perplexity"]) for n, r in points.items() if "perplexity" in r)
        failed = sorted(f"{int(n)}: {_not_measured(r)}" for n, r in points.items() if "perplexity" not in r)
        lengths |= {int(n) for n in points}
        if measured:
            ax.plot(*zip(*measured), "o-", label=name + (f" ({', '.join(failed)})" if failed else ""))
    _length_axis(ax, sorted(lengths))
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (sliding window)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_passkey(grid: dict, path: Path, title: str):
    """Accuracy by depth (rows) and length (columns); cells not measured are gray and labelled."""
    plt = pyplot()
    lengths = sorted(int(n) for n in grid)
    depths = sorted({float(d) for row in grid.values() for d in row})
    accuracy = torch.full((len(depths), len(lengths)), float("nan"))
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.5 + 0.45 * len(depths)))
    for j, n in enumerate(lengths):
        for i, d in enumerate(depths):
            entry = grid[str(n)].get(f"{d:g}")
            if entry is None:
                continue
            if "accuracy" in entry:
                accuracy[i, j] = entry["accuracy"]
                ax.text(j, i, f"{entry['accuracy']:.2f}", ha="center", va="center", fontsize=8)
            else:
                ax.text(j, i, _not_measured(entry), ha="center", va="center", fontsize=7, color="dimgray")
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="lightgray")
    image = ax.imshow(accuracy.numpy(), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)))
    ax.set_xticklabels([_tick(n) for n in lengths])
    ax.set_yticks(range(len(depths)))
    ax.set_yticklabels([f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("depth of the key")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cost(results: dict, path: Path, title: str):
    """Prefill time, median decode latency and peak memory by length; OOM lengths marked x."""
    plt = pyplot()
    panels = [("prefill time (s)", lambda r: r["prefill_s"]),
              ("decode latency (ms / token, median)", lambda r: (r["decode_ms_per_token"] or {}).get("median")),
              ("peak memory above weights (GiB)", lambda r: r["peak_memory_bytes"] / 2**30
               if r.get("peak_memory_bytes") is not None else None)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    lengths = sorted({int(n) for points in results["cost"].values() for n in points})
    for ax, (label, value) in zip(axes, panels):
        for k, (name, points) in enumerate(results["cost"].items()):
            measured = sorted((int(n), value(r)) for n, r in points.items() if "prefill_s" in r and value(r) is not None)
            skipped = sorted(int(n) for n, r in points.items() if "skipped" in r)
            legend = name + (f" (skipped from {_tick(skipped[0])})" if skipped else "")
            line = ax.plot(*zip(*measured), "o-", label=legend)[0] if measured else None
            oom = [int(n) for n, r in points.items() if r.get("out_of_memory")]
            if oom:
                color = line.get_color() if line else f"C{k}"
                ax.plot(oom, [measured[-1][1] if measured else 1.0] * len(oom), "x", ms=10, mew=2, color=color,
                        label=f"{name}: out of memory")
        if label.startswith("decode"):  # the repeated call (cost.measure_cost), dashed in the same colour
            for k, (name, points) in enumerate(results["cost"].items()):
                repeat = sorted((int(n), r["decode_ms_per_token_repeat"]["median"]) for n, r in points.items()
                                if (r.get("decode_ms_per_token_repeat") or {}).get("median") is not None)
                if repeat:
                    ax.plot(*zip(*repeat), "s--", color=f"C{k}", mfc="none", label=f"{name}, same call repeated")
        if lengths:
            _length_axis(ax, lengths)
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(results: dict, out: Path, title: str):
    """Every plot there are results for, in ``out``."""
    if any(results["perplexity"].values()):
        plot_perplexity(results, out / "perplexity.png", title)
    for name, grid in results["passkey"].items():
        if grid:
            plot_passkey(grid, out / f"passkey_{name}.png", f"passkey retrieval, {name}\n{title}")
    if any(results["cost"].values()):
        plot_cost(results, out / "cost.png", title)
