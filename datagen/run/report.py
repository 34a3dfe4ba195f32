"""What a build reports: its summary (counts, rejects by reason, scores, compute) and the
Prefect artifacts the UI shows (summary, table per step, preview of written pairs)."""

from __future__ import annotations

import base64
from collections import Counter

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from datagen.build.settings import BuildConfig


def runner_stats(runner) -> dict:
    stats = runner.stats()
    return {
        "loads": sum(s.loads for s in stats),
        "load_s": sum(s.load_seconds for s in stats),
        "compute_s": sum(s.compute_seconds for s in stats),
        "samples": sum(s.samples for s in stats),
        # the pool at the end and what changed it (a Ray pool; in process: one, never resized)
        "pool": {
            "actors": getattr(runner, "size", 1),
            "added": getattr(runner, "added", 0),
            "retired": getattr(runner, "retired", 0),
            "replaced": getattr(runner, "replacements", 0),
        },
    }


def summarize_build(
    config: BuildConfig,
    plan: dict,
    stage_reports: list[dict],
    write_reports: list[dict],
    stats: dict,
    wall: float,
) -> dict:
    per_stage: dict[str, Counter] = {}
    overhead_s, driver_cpu_s, driver_bytes, handled = 0.0, 0.0, 0, 0
    for report in stage_reports:
        counts = per_stage.setdefault(report["stage"], Counter())
        counts["done"] += report["done"]
        counts["rejected"] += report["rejected"]
        overhead_s += report.get("overhead_s", 0.0)
        driver_cpu_s += report.get("driver_cpu_s", 0.0)
        driver_bytes += report.get("driver_bytes", 0)
        handled += report["done"] + report["rejected"]
    reasons: Counter[str] = Counter()
    for report in write_reports:
        reasons.update(report["reasons"])
    scores = [s for report in write_reports for s in report["scores"]]
    return {
        "split": config.split,
        "out": str(config.dataset_dir),
        "profile": config.profile,
        "planned": plan["planned"],
        "already_committed": plan["skipped_committed"],
        "already_rejected": plan["skipped_rejected"],
        "source_rejects": plan["plan_rejects"],
        "written": sum(r["written"] for r in write_reports),
        "rejected": sum(r["rejected"] for r in write_reports),
        "filtered": sum(r["filtered"] for r in write_reports),
        "stages": {name: dict(counts) for name, counts in per_stage.items()},
        "rejects_by_reason": dict(reasons.most_common()),
        "csd_scores": scores,
        "model_loads": {k: v["loads"] for k, v in stats.items()},
        "pools": {k: v["pool"] for k, v in stats.items()},
        "stage_compute_s": {k: round(v["compute_s"], 3) for k, v in stats.items()},
        "wall_s": round(wall, 2),
        # time the steps spent outside stage calls (reading inputs, saving outputs, dispatch)
        "overhead_ms_per_sample_step": round(1000 * overhead_s / max(handled, 1), 2),
        # what the flow process itself spent per planned sample over all steps: its CPU, and
        # the bytes it exchanged with the runners (references and outcomes; media stay in the
        # work store, read and written where the stages run)
        "driver_cpu_ms_per_sample": round(1000 * driver_cpu_s / max(plan["planned"], 1), 3),
        "driver_bytes_per_sample": round(driver_bytes / max(plan["planned"], 1)),
    }


def histogram(values: list[float], low: float = -1.0, high: float = 1.0, bins: int = 10) -> list:
    """(bin label, count) over [low, high]."""
    width = (high - low) / bins
    counts = [0] * bins
    for value in values:
        counts[min(bins - 1, max(0, int((value - low) / width)))] += 1
    return [
        (f"{low + i * width:+.1f}..{low + (i + 1) * width:+.1f}", c) for i, c in enumerate(counts)
    ]


def summary_markdown(summary: dict) -> str:
    lines = [
        f"# {summary['split'].upper()} build: {summary['written']} pairs written",
        "",
        f"Output: `{summary['out']}` (profile `{summary['profile']}`), "
        f"wall time {summary['wall_s']} s.",
        "",
        "| planned | already committed | already rejected | sources rejected | written "
        "| rejected | filtered out |",
        "|---|---|---|---|---|---|---|",
        f"| {summary['planned']} | {summary['already_committed']} | "
        f"{summary['already_rejected']} | {summary['source_rejects']} | "
        f"{summary['written']} | {summary['rejected']} | {summary['filtered']} |",
        "",
        "## Stages",
        "",
        "| stage | done | rejected | pass rate | model loads | compute s |",
        "|---|---|---|---|---|---|",
    ]
    for stage, counts in summary["stages"].items():
        done, rejected = counts.get("done", 0), counts.get("rejected", 0)
        rate = f"{100 * done / (done + rejected):.0f}%" if done + rejected else "-"
        lines.append(
            f"| {stage} | {done} | {rejected} | {rate} | "
            f"{summary['model_loads'].get(stage, '-')} | "
            f"{summary['stage_compute_s'].get(stage, '-')} |"
        )
    lines += ["", "## Rejects by reason", ""]
    if summary["rejects_by_reason"]:
        lines += ["| stage/reason | count |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in summary["rejects_by_reason"].items()]
    else:
        lines.append("None.")
    lines += ["", "## CSD score histogram", "", "```"]
    for label, count in histogram(summary["csd_scores"]):
        lines.append(f"{label}  {'#' * count} {count}")
    lines += ["```"]
    return "\n".join(lines)


def preview_markdown(config: BuildConfig, limit: int = 4) -> str:
    """Raw and stylized first frames side by side for a few written samples."""
    from datagen.data.dataset import Dataset, DatasetError

    try:
        dataset = Dataset(config.dataset_dir)
    except DatasetError:
        return "No rows written yet."
    lines = [
        "| sample | style | raw first frame | stylized first frame | csd |",
        "|---|---|---|---|---|",
    ]
    columns = ["sample_id", "style_id", "raw_first_frame", "stylized_first_frame", "csd_score"]
    shown = 0
    for _, _, table in dataset.iter_row_groups(columns=columns):
        for row in table.to_pylist():
            raw = base64.b64encode(row["raw_first_frame"]).decode()
            sty = base64.b64encode(row["stylized_first_frame"]).decode()
            score = "-" if row["csd_score"] is None else f"{row['csd_score']:.3f}"
            lines.append(
                f"| `{row['sample_id'][:12]}` | {row['style_id']} | "
                f"![raw](data:image/png;base64,{raw}) | "
                f"![stylized](data:image/png;base64,{sty}) | {score} |"
            )
            shown += 1
            if shown >= limit:
                return "\n".join(lines)
    return "\n".join(lines)


def publish_artifacts(config: BuildConfig, summary: dict, write_reports: list[dict]) -> None:
    key = f"{config.split}-build"
    create_markdown_artifact(
        summary_markdown(summary),
        key=f"{key}-summary",
        description="counts per stage, pass rates, rejects, scores",
    )
    create_table_artifact(
        [{"stage": s, **c} for s, c in summary["stages"].items()],
        key=f"{key}-stages",
        description="samples done and rejected per stage",
    )
    create_markdown_artifact(
        preview_markdown(config),
        key=f"{key}-preview",
        description="raw and stylized first frames side by side",
    )
