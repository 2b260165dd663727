"""The reproduction's outputs, from its records: results.json, results.md (the lecture's table next to
ours), val_loss.png (the lecture's versions' val-loss curves, as logged to TensorBoard),
after_lecture.png (the same for the path from v7_cpu to v8_cpu) and samples.md (what each version
writes)."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from nanogpt_pl.run.files import write_atomic, write_text_atomic

# The figures' versions: the lecture's (v1 .. v7, and v7_cpu), and the path after it, one change
# per step (v7_cpu, v7_cpu_1_rope, ..., v8_cpu; v8 on a GPU). The one-change ablations
# (v7_cpu_rope, ...) are rows of the table only.
LECTURE = re.compile(r"v[1-7](_ffn)?|v7_cpu")
AFTER_LECTURE = re.compile(r"v7_cpu(_\d+_.*)?|v8(_cpu)?")


def write_report(records: dict[str, dict], out: Path, headers: dict[str, dict]) -> None:
    """Write the five files from the same records, so they always agree with each other.

    ``headers`` are every config's target and device lines: the table lists versions not run too.
    """
    out.mkdir(parents=True, exist_ok=True)
    records = dict(sorted(records.items()))
    write_text_atomic(out / "results.json", json.dumps(records, indent=1) + "\n")
    write_text_atomic(out / "results.md", results_table(records, headers))
    for pattern, name, title in ((LECTURE, "val_loss.png", "the lecture's versions"),
                                 (AFTER_LECTURE, "after_lecture.png", "after the lecture, one change per step")):
        plot_val_loss({v: r for v, r in records.items() if pattern.fullmatch(v)}, out / name, title)
    write_text_atomic(out / "samples.md", samples_gallery(records))


def samples_gallery(records: dict[str, dict]) -> str:
    """Markdown: each sampled version's text, in the table's order, with where it came from."""
    lines = [
        "# What each version writes",
        "",
        "Each text is sampled from the final checkpoint (last.ckpt) of the version's first seed, from a",
        "newline, with the same sampling seed for every version. Regenerate with",
        "`python -m nanogpt_pl reproduce --samples_only true --out <this folder>`.",
    ]
    for version, record in sorted(records.items()):
        gallery = record.get("sample")
        if gallery is None:
            continue
        lines += [
            "",
            f"## `{version}`: val {record['val']['mean']:.4f}",
            "",
            f"{gallery['max_new_tokens']} characters from `{gallery['checkpoint']}`, sampling seed {gallery['seed']}:",
            "",
            "```text",
            gallery["text"].replace("```", "` ` `"),
            "```",
        ]
    return "\n".join(lines) + "\n"


def results_table(records: dict[str, dict], headers: dict[str, dict]) -> str:
    """Markdown: each config's target next to our mean over seeds, its spread and the difference."""
    lines = [
        "| config | target (val) | mean val | min – max | mean − target | seeds | steps | mean train | wall per seed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for version in sorted(headers.keys() | records.keys()):
        record = records.get(version)
        target = ((record or headers[version])["target"] or {}).get("val")
        shown = target if target is not None else "–"  # v4 (the lecture reported none) and the ablations
        if record is None:
            why = "not yet run on a GPU" if headers[version]["device"] == "gpu" else "not run"
            lines.append(f"| `{version}` | {shown} | {why} | | | | | | |")
            continue
        val = record["val"]
        delta = f"{val['mean'] - target:+.4f}" if target is not None else "–"
        lines.append(
            f"| `{version}` | {shown} | {val['mean']:.4f} "
            f"| {val['min']:.4f} – {val['max']:.4f} | {delta} | {len(record['seeds'])} | {record['steps']} "
            f"| {record['train']['mean']:.4f} | {record['wall_s']:.0f} s |"
        )
    environments: dict[str, list[str]] = {}
    for version, record in records.items():
        key = f"{record['device']}, torch {record['torch']}, lightning {record['lightning']}: `{record['command']}`"
        environments.setdefault(key, []).append(f"`{version}`")
    lines.append("")
    lines += [f"- {', '.join(versions)}: {key}" for key, versions in environments.items()]
    return "\n".join(lines) + "\n"


def plot_val_loss(records: dict[str, dict], path: Path, title: str) -> None:
    """Each version's val/loss against steps: mean over seeds, shaded between the lowest and highest seed."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    for version, record in records.items():
        by_step: dict[int, list[float]] = {}
        for run in record["seeds"]:
            for step, value in run["val_curve"]:
                by_step.setdefault(int(step), []).append(value)
        steps = sorted(by_step)
        mean = [statistics.fmean(by_step[s]) for s in steps]
        (line,) = ax.plot(steps, mean, marker="." if len(steps) < 40 else None, label=version)
        ax.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps],
                        color=line.get_color(), alpha=0.2, linewidth=0)
        target = (record["target"] or {}).get("val")
        if target is not None:
            ax.plot([steps[-1]], [target], marker="*", markersize=11, color=line.get_color(),
                    markeredgecolor="black", linestyle="none")
    ax.set_xlabel("step")
    ax.set_ylabel("val loss (estimate)")
    ax.set_title(f"val/loss, {title}: mean over seeds, band = min–max, ★ = target")
    ax.grid(alpha=0.3)
    if records:
        ax.legend(ncol=2, fontsize="small")
    fig.tight_layout()
    try:
        write_atomic(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)
