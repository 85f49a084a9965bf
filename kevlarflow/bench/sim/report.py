"""Run every mode with and without the failure, and print the figures the
real failover benchmark prints, with the ratios restart / mode."""
from __future__ import annotations

from kevlarflow.bench.sim.costs import Costs
from kevlarflow.bench.failover.metrics import ratio
from kevlarflow.bench.sim.metrics import METRICS, RATIO_METRICS, summarize
from kevlarflow.bench.sim.model import Failure, TraceRequest, simulate

CONDITIONS = ("failure", "fault_free")

# KevlarFlow paper (Llama-3.1-8B, 4-stage pipelines, 1 Gbit/s links): reported
# MTTR and restart / KevlarFlow improvements under failure.
PAPER_FIGURES = {"mttr_s": (30.0, 600.0),  # KevlarFlow, restart: "about 30 s", "about 10 min"
                 "ratios": {"avg_latency_s": 3.1, "p99_latency_s": 2.8, "avg_ttft_s": 378.9,
                            "p99_ttft_s": 574.6}}


def run_modes(costs: Costs, trace: list[TraceRequest], failures: list[Failure],
              modes: list[str]) -> dict:
    """{mode: {"failure": metrics + events, "fault_free": metrics}}."""
    results = {}
    for mode in modes:
        results[mode] = {}
        for condition in CONDITIONS:
            sim = simulate(costs, trace, mode, failures if condition == "failure" else [])
            figures = summarize(sim.requests(), sim.mttr_s[0] if sim.mttr_s else None,
                                sim.tokens_recomputed)
            if condition == "failure":
                figures["events"] = sim.log
            results[mode][condition] = figures
    return results


def ratios(results: dict) -> dict:
    """restart / mode under failure, for each mode other than restart."""
    if "restart" not in results:
        return {}
    base = results["restart"]["failure"]
    return {mode: {k: ratio(base[k], r["failure"][k]) for k in RATIO_METRICS}
            for mode, r in results.items() if mode != "restart"}


def _fmt(value, unit: str = "s") -> str:
    if value is None:
        return "-"
    if unit == "s":
        if value >= 100:
            return f"{value:.0f} s"
        if value >= 1:
            return f"{value:.2f} s"
        return f"{value * 1e3:.1f} ms"
    return f"{value:.0f}"


def print_results(results: dict) -> None:
    head = ["mode", "condition", "MTTR", "avg lat", "p99 lat", "avg TTFT", "p99 TTFT",
            "TPOT", "recomputed", "unfinished"]
    rows = []
    for mode, by_condition in results.items():
        for condition in CONDITIONS:
            r = by_condition[condition]
            rows.append([mode, condition.replace("_", "-")]
                        + [_fmt(r[k]) for k in METRICS]
                        + [_fmt(r["tokens_recomputed"], "n"), _fmt(r["requests_failed"], "n")])
    _table(head, rows, left=2)


def print_ratios(table: dict, paper: bool = False) -> None:
    if not table:
        return
    print("\nrestart / mode, under failure" + (" (paper's reported figure in brackets)" if paper else ""))
    head = ["mode", "MTTR", "avg lat", "p99 lat", "avg TTFT", "p99 TTFT"]
    rows = []
    for mode, r in table.items():
        cells = []
        for k in RATIO_METRICS:
            cell = "-" if r[k] is None else f"{r[k]:.1f}x"
            if paper and mode == "kevlarflow":
                reported = PAPER_FIGURES["ratios"].get(k)
                if k == "mttr_s":
                    reported = PAPER_FIGURES["mttr_s"][1] / PAPER_FIGURES["mttr_s"][0]
                cell += f" [{reported:.1f}x]"
            cells.append(cell)
        rows.append([mode] + cells)
    _table(head, rows)


def print_paper_mttr(results: dict) -> None:
    ours, theirs = PAPER_FIGURES["mttr_s"]
    kf = results.get("kevlarflow", {}).get("failure", {}).get("mttr_s")
    rs = results.get("restart", {}).get("failure", {}).get("mttr_s")
    print(f"\nMTTR, projected vs the paper's: kevlarflow {_fmt(kf)} vs about {ours:.0f} s; "
          f"restart {_fmt(rs)} vs about {theirs / 60:.0f} min")


def print_timeline(results: dict) -> None:
    print("\nwhat happened after the failure (seconds after it)")
    for mode, r in results.items():
        events = r["failure"]["events"]
        if not events:
            continue
        t0 = events[0]["t_s"]
        print(f"  {mode}: " + ", ".join(f"{e['kind']} {e['t_s'] - t0:.1f}" for e in events[1:]))


def _table(head: list[str], rows: list[list[str]], left: int = 1) -> None:
    """The first `left` columns are names (left-aligned), the rest figures."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for row in [head] + rows:
        print("  ".join(str(x).ljust(w) if i < left else str(x).rjust(w)
                        for i, (x, w) in enumerate(zip(row, widths))))
