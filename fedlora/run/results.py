"""Per-round records (JSONL), the run summary table and the plot.

One JSON object per line in ``rounds.jsonl``; ``summary.md`` and ``rounds.png`` are
derived from it, so ``fedlora report DIR`` can rebuild them for any finished run.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROUNDS_FILE = "rounds.jsonl"
SUMMARY_FILE = "summary.md"
SAMPLES_FILE = "samples.md"
PLOT_FILE = "rounds.png"


def append_record(output_dir: Path, record: Mapping[str, Any]) -> None:
    """Append one round record; each line is flushed so a crash loses nothing written."""
    output_dir.mkdir(parents=True, exist_ok=True)
    with (output_dir / ROUNDS_FILE).open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(_jsonable(record), sort_keys=True) + "\n")
        fh.flush()


def read_records(output_dir: Path) -> list[dict[str, Any]]:
    """All round records of a run, in order."""
    path = output_dir / ROUNDS_FILE
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_records(output_dir: Path, records: list[Mapping[str, Any]]) -> None:
    """Replace the run's records atomically (a resumed run drops rounds after its checkpoint)."""
    path = output_dir / ROUNDS_FILE
    tmp = path.with_name(f".{ROUNDS_FILE}.tmp")
    tmp.write_text(
        "".join(json.dumps(_jsonable(r), sort_keys=True) + "\n" for r in records), encoding="utf-8"
    )
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return value


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def summary_table(records: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table, one row per round (round 0 is the initial evaluation)."""
    header = (
        "| round | accuracy | eval loss | train loss | agg. error | replies | "
        "up (KiB) | down (KiB) | seconds |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = [header]
    for r in records:
        replies = (
            "-" if r.get("round", 0) == 0 else f"{r.get('num_ok', 0)}/{r.get('num_sampled', 0)}"
        )
        if r.get("skipped"):
            replies += " (skipped)"
        rows.append(
            "| {round} | {acc} | {el} | {tl} | {err} | {rep} | {up} | {down} | {sec} |".format(
                round=r.get("round"),
                acc=_fmt(r.get("eval_accuracy"), ".4f"),
                el=_fmt(r.get("eval_loss"), ".4f"),
                tl=_fmt(r.get("train_loss"), ".4f"),
                err=_fmt(r.get("aggregation_error"), ".2e"),
                rep=replies,
                up=_fmt((r.get("bytes_up") or 0) / 1024, ".1f"),
                down=_fmt((r.get("bytes_down") or 0) / 1024, ".1f"),
                sec=_fmt(r.get("seconds"), ".1f"),
            )
        )
    return "\n".join(rows)


def traffic(records: Sequence[Mapping[str, Any]]) -> str:
    """Bytes up and down in all, each against the same tensors sent dense in float32."""
    parts = []
    for way in ("up", "down"):
        sent = sum(r.get(f"bytes_{way}") or 0 for r in records)
        dense = sum(r.get(f"dense_{way}") or 0 for r in records)
        ratio = f" (dense fp32 {dense:,}: {dense / sent:.1f}x)" if sent and dense else ""
        parts.append(f"{sent:,}{ratio}")
    return " / ".join(parts)


def privacy_ledger(records: Sequence[Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per node: the latest epsilon it reported, its rounds, and why it declined (if so)."""
    ledger: dict[int, dict[str, Any]] = {}
    for r in records:
        for n in r.get("nodes") or []:
            entry = ledger.setdefault(int(n["node_id"]), {"epsilon": None, "rounds": 0})
            if n.get("epsilon") is not None:
                entry["epsilon"] = n["epsilon"]
                entry["rounds"] += 1
            if n.get("status") == "declined":
                entry["declined"] = n.get("reason", "")
    return {k: v for k, v in ledger.items() if v["epsilon"] is not None or "declined" in v}


def _baseline_line(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The score of always giving the most common answer (recorded with round 0)."""
    share = records[0].get("most_common_answer") if records else None
    if share is None:
        return []
    return [
        f"- **always the most common answer** would score: {share:.4f} "
        "(on the same evaluation examples)"
    ]


def write_summary(
    output_dir: Path, records: Sequence[Mapping[str, Any]], header: Mapping[str, Any]
) -> Path:
    """Write ``summary.md``: the run's settings, final numbers and the per-round table."""
    final = next((r for r in reversed(records) if r.get("eval_accuracy") is not None), {})
    trained = [r for r in records if r.get("round", 0) > 0]
    lines = ["# fedlora run summary", ""]
    for key, value in header.items():
        lines.append(f"- **{key}**: {value}")
    lines += [
        f"- **final accuracy**: {_fmt(final.get('eval_accuracy'), '.4f')} "
        f"(round {final.get('round', '-')})",
        *_baseline_line(records),
        *_perplexity_line(records),
        f"- **rounds skipped**: {sum(bool(r.get('skipped')) for r in trained)}",
        f"- **bytes up / down**: {traffic(trained)}",
        "",
    ]
    ledger = privacy_ledger(trained)
    if ledger:
        worst = max((v["epsilon"] or 0.0 for v in ledger.values()), default=0.0)
        declined = {k: v["declined"] for k, v in ledger.items() if "declined" in v}
        lines += [
            f"- **privacy**: worst-case client epsilon {worst:.3f} over {len(ledger)} clients; "
            f"{len(declined)} declined (budget spent) and were no longer sampled",
            "",
            "| node | epsilon spent | rounds trained | declined |",
            "|---|---:|---:|---|",
        ]
        for node, v in sorted(ledger.items()):
            eps = "-" if v["epsilon"] is None else f"{v['epsilon']:.3f}"
            lines.append(f"| {node} | {eps} | {v['rounds']} | {v.get('declined', '')} |")
        lines.append("")
    lines += [summary_table(records), ""]
    lines += not_used(trained)
    path = output_dir / SUMMARY_FILE
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def not_used(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The replies a round did not use, and why: one row per round and node.

    ``replies 2/3`` in the table says that one was missing; this says which and why
    (the reasons are also in rounds.jsonl).
    """
    rows = []
    for r in records:
        for n in r.get("nodes") or []:
            if n.get("status") != "ok":
                reason = str(n.get("reason") or "").replace("|", "/").replace("\n", " ")
                rows.append(
                    f"| {r.get('round')} | {n.get('node_id')} | {n.get('status')} | {reason} |"
                )
    if not rows:
        return []
    return [
        "## Replies not used",
        "",
        "| round | node | status | reason |",
        "|---:|---:|---|---|",
        *rows,
        "",
    ]


def _perplexity_line(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The causal-LM line: held-out perplexity first and last, and what accuracy means."""
    ppl = [r for r in records if r.get("eval_perplexity") is not None]
    if not ppl:
        return []
    first, last = ppl[0], ppl[-1]
    return [
        f"- **held-out perplexity**: {_fmt(first['eval_perplexity'], '.3f')} (round "
        f"{first['round']}) -> {_fmt(last['eval_perplexity'], '.3f')} (round {last['round']}); "
        "accuracy is the exact match of the greedy answer"
    ]


def write_samples(
    output_dir: Path,
    questions: Sequence[str],
    references: Sequence[str],
    answers: Mapping[str, Sequence[str]],
) -> Path:
    """``samples.md``: held-out prompts, the reference answers and the model's, per stage."""
    lines = ["# Sample generations (greedy, held-out prompts)", ""]
    for i, (question, reference) in enumerate(zip(questions, references, strict=True)):
        lines += [f"## {i + 1}", "", "**prompt**: " + question.replace("\n", " "), ""]
        lines.append(f"- **reference**: {reference}")
        for stage, texts in answers.items():
            lines.append(f"- **{stage}**: {texts[i] if i < len(texts) else '-'}")
        lines.append("")
    path = output_dir / SAMPLES_FILE
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def plot_rounds(output_dir: Path, records: Iterable[Mapping[str, Any]], title: str = "") -> Path:
    """Accuracy, losses and aggregation error per round, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = list(records)
    rounds = [r["round"] for r in records]

    def series(key: str) -> tuple[list[int], list[float]]:
        pairs = [(r["round"], r[key]) for r in records if r.get(key) is not None]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    x, y = series("eval_accuracy")
    axes[0].plot(x, y, marker="o")
    axes[0].set(title="server-side accuracy", xlabel="round", ylabel="accuracy")
    for key, label in (("eval_loss", "eval loss"), ("train_loss", "train loss")):
        x, y = series(key)
        axes[1].plot(x, y, marker="o", label=label)
    axes[1].set(title="loss", xlabel="round")
    axes[1].legend()
    x, y = series("aggregation_error")
    if y:
        axes[2].plot(x, [max(v, 1e-12) for v in y], marker="o")
        axes[2].set_yscale("log")
    axes[2].set(title="relative aggregation error", xlabel="round")
    for ax in axes:
        ax.grid(alpha=0.3)
        if rounds:
            ax.set_xlim(min(rounds) - 0.5, max(rounds) + 0.5)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = output_dir / PLOT_FILE
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
