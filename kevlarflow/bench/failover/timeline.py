"""Timeline plots of failover runs: rolling average and p99 TTFT (over the
requests that arrived in the last WINDOW_S seconds) and output tokens per
second, against time in the trace, with the failure and each recovery event
marked."""
from __future__ import annotations

from pathlib import Path

from kevlarflow.bench.failover.metrics import mean, percentile, ttft

WINDOW_S = 5.0
EVENT_STYLE = {  # kind -> (colour, line style, label)
    "failed": ("red", "-", "failure"),
    "detected": ("darkorange", "--", "detected"),
    "resumed": ("tab:blue", ":", "communicator up"),
    "first_step_after_failure": ("green", "-.", "first step (MTTR)"),
    "replacement_loaded": ("purple", "--", "replacement loaded"),
    "rejoined": ("gray", ":", "rejoined"),
}
MODE_COLOURS = {"kevlarflow": "tab:green", "kevlarflow-no-replication": "tab:blue",
                "restart": "tab:red"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def rolling_ttft(run: dict, step_s: float = 0.5) -> tuple[list[float], list, list]:
    """(times, rolling average TTFT, rolling p99 TTFT) over arrivals."""
    served = sorted((r["arrival_s"], ttft(r)) for r in run["requests"] if r["token_times_s"])
    end = max((r["token_times_s"][-1] for r in run["requests"] if r["token_times_s"]), default=0)
    times, avg, p99 = [], [], []
    t = 0.0
    while t <= end:
        window = [v for a, v in served if t - WINDOW_S < a <= t]
        times.append(t)
        avg.append(mean(window))
        p99.append(percentile(window, 0.99))
        t += step_s
    return times, avg, p99


def tokens_per_second(run: dict, bin_s: float = 1.0) -> tuple[list[float], list[float]]:
    stamps = [t for r in run["requests"] for t in r["token_times_s"]]
    if not stamps:
        return [], []
    bins = [0] * (int(max(stamps) / bin_s) + 1)
    for t in stamps:
        bins[int(t / bin_s)] += 1
    return [(i + 0.5) * bin_s for i in range(len(bins))], [n / bin_s for n in bins]


def _mark_events(axes, events: list[dict]) -> None:
    seen = set()
    for e in events:
        style = EVENT_STYLE.get(e["kind"])
        if style is None:
            continue
        colour, dash, label = style
        for ax in axes:
            ax.axvline(e["t_s"], color=colour, linestyle=dash, linewidth=1,
                       label=None if label in seen or ax is not axes[0] else label)
        seen.add(label)


def plot_run(run: dict, title: str, path: Path) -> None:
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 5.5))
    times, avg, p99 = rolling_ttft(run)
    top.plot(times, avg, label=f"avg TTFT ({WINDOW_S:g} s window)", color="black")
    top.plot(times, p99, label="p99 TTFT", color="black", linestyle="--")
    top.set_ylabel("TTFT (s)")
    bottom.plot(*tokens_per_second(run), color="tab:blue")
    bottom.set_ylabel("output tokens/s")
    bottom.set_xlabel("time in the trace (s)")
    _mark_events([top, bottom], run["events"])
    top.legend(fontsize=7, loc="upper left")
    top.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_modes(runs: dict[str, dict], title: str, path: Path) -> None:
    """The failure run of every mode on shared axes, events of the first
    failure marked once."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 5.5))
    for mode, run in runs.items():
        colour = MODE_COLOURS.get(mode)
        times, _, p99 = rolling_ttft(run)
        top.plot(times, p99, label=mode, color=colour)
        bottom.plot(*tokens_per_second(run), label=mode, color=colour)
        for e in run["events"]:
            if e["kind"] == "first_step_after_failure":
                for ax in (top, bottom):
                    ax.axvline(e["t_s"], color=colour, linestyle="-.", linewidth=1)
    failures = [e["t_s"] for run in runs.values() for e in run["events"] if e["kind"] == "failed"]
    for t in sorted(set(round(t, 1) for t in failures)):
        for ax in (top, bottom):
            ax.axvline(t, color="black", linewidth=1.2)
    top.set_ylabel(f"p99 TTFT, {WINDOW_S:g} s window (s)")
    bottom.set_ylabel("output tokens/s")
    bottom.set_xlabel("time in the trace (s); black: failure, dash-dot: first step after it")
    top.legend(fontsize=8, loc="upper left")
    top.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
