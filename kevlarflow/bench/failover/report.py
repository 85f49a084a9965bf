"""The failover benchmark's printed table and its JSON file."""
from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

from kevlarflow.bench.failover.metrics import REPLICATION_WORK
from kevlarflow.bench.timing import cpu_model

SCHEMA = "kevlarflow.failover/1"
CONDITIONS = {"failure": "failure", "fault_free": "fault-free"}
COLUMNS = (  # (metric key, header, scale, digits)
    ("mttr_s", "MTTR s", 1, 2),
    ("recovery_overhead_s", "overhead ms", 1000, 0),
    ("avg_latency_s", "avg lat s", 1, 2),
    ("p99_latency_s", "p99 lat s", 1, 2),
    ("avg_ttft_s", "avg TTFT s", 1, 2),
    ("p99_ttft_s", "p99 TTFT s", 1, 2),
    ("mean_tpot_s", "TPOT ms", 1000, 0),
    ("requests_failed", "failed", 1, 0),
    ("goodput_rps", "goodput r/s", 1, 2),
    ("tokens_recomputed", "recomputed", 1, 0),
)
RATIO_NAMES = {"mttr_s": "MTTR", "avg_latency_s": "avg latency", "p99_latency_s": "p99 latency",
               "avg_ttft_s": "avg TTFT", "p99_ttft_s": "p99 TTFT"}


def cell(summary: dict | None, scale: float, digits: int, spread: bool) -> str:
    if not summary:
        return "-"
    text = f"{summary['median'] * scale:.{digits}f}"
    if spread and summary["min"] != summary["max"]:
        text += f" ({summary['min'] * scale:.{digits}f}-{summary['max'] * scale:.{digits}f})"
    return text


def table(metrics: dict, repeats: int) -> str:
    spread = repeats > 1
    rows = [["mode", "run"] + [header for _, header, _, _ in COLUMNS]]
    for mode, by_condition in metrics.items():
        for condition, summary in by_condition.items():
            rows.append([mode, CONDITIONS[condition]] + [
                cell(summary.get(key), scale, digits, spread) for key, _, scale, digits in COLUMNS])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def ratios_text(ratios: dict, overhead: bool = True) -> str:
    lines = []
    for mode, r in ratios.items():
        parts = [f"{RATIO_NAMES[k]} {v:.1f}x" for k, v in r["under_failure"].items()
                 if v is not None]
        if parts:
            lines.append(f"restart / {mode} under failure: " + ", ".join(parts))
        over = r["fault_free_overhead"]
        if overhead and over.get("avg_latency_s") is not None:
            lines.append(f"{mode} fault-free vs restart's: avg latency "
                         f"{over['avg_latency_s']:+.1%}, p99 latency {over['p99_latency_s']:+.1%}, "
                         f"TPOT {over['mean_tpot_s']:+.1%}")
    return "\n".join(lines)


def targets_text(targets: dict) -> str:
    lines = []
    for name, t in targets.items():
        verdict = "n/a" if t["met"] is None else ("met" if t["met"] else "NOT met")
        value = "-" if t["value"] is None else f"{t['value']:.3g}"
        lines.append(f"  {t['what']}: {value} (target {'>=' if t['higher_is_better'] else '<='}"
                     f" {t['bound']:g}): {verdict}")
    return "\n".join(lines)


def machine() -> dict:
    import torch

    from kevlarflow import __version__

    return dict(cpu=cpu_model(), cores=os.cpu_count(), platform=platform.platform(),
                python=sys.version.split()[0], torch=torch.__version__, kevlarflow=__version__)


def paired_text(paired: dict, rounds: int) -> str:
    names = {"avg_latency_s": "avg latency", "p99_latency_s": "p99 latency",
             "mean_tpot_s": "TPOT", "worker_cpu_s": "workers' CPU time",
             "controller_cpu_s": "controller's CPU time"}
    lines = []
    for mode, by_metric in paired.items():
        parts = [f"{names[k]} {v['mean']:+.1%} (95% CI {v['ci95'][0]:+.1%} to "
                 f"{v['ci95'][1]:+.1%}; pairs {min(v['ratios']):+.1%} to {max(v['ratios']):+.1%})"
                 for k, v in by_metric.items() if v]
        if parts:
            lines.append(f"{mode} fault-free vs restart's, mean of {rounds} interleaved pairs:\n  "
                         + "\n  ".join(parts))
    return "\n".join(lines)


def replication_text(metrics: dict) -> str:
    """What replication did in the fault-free rounds, per mode that replicates:
    where its share of the workers' CPU time goes."""
    lines = []
    for mode, by_condition in metrics.items():
        ff = by_condition.get("fault_free") or {}
        work = {k: ff.get(f"replication_{k}") for k in REPLICATION_WORK}
        if not work["bytes_sent"] or not work["bytes_sent"]["median"]:
            continue
        med = {k: v["median"] if v else 0 for k, v in work.items()}
        lines.append(f"{mode} replication per fault-free round (median): "
                     f"{med['bytes_sent'] / 1e6:.1f} MB sent; {med['pack_s'] * 1000:.0f} ms packing, "
                     f"{med['send_s'] * 1000:.0f} ms packing and sending (wall, waits included), "
                     f"{med['unpack_s'] * 1000:.0f} ms unpacking")
    return "\n".join(lines)


def write_json(path: Path, config: dict, trace: list[dict], runs: dict, metrics: dict,
               ratios: dict, targets: dict, slo: dict, timelines: list[str],
               fault_free_pairs: dict) -> None:
    doc = dict(schema=SCHEMA, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
               machine=machine(), config=config, slo=slo, trace=trace, metrics=metrics,
               ratios=ratios, fault_free_pairs=fault_free_pairs, targets=targets,
               timelines=timelines, runs=runs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
