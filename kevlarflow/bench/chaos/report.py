"""What a chaos run shows: a one-screen summary and a PNG timeline of faults,
recoveries and served requests."""
from __future__ import annotations

from pathlib import Path

PHASE_COLOURS = {"serving": "tab:green", "catching_up": "yellowgreen", "draining": "gold",
                 "building": "tab:orange", "paused": "tab:purple", "down": "tab:red",
                 "restarting": "tab:red", "loading": "lightgray"}
EVENT_MARKS = {"rerouted": ("tab:blue", "v"), "rejoined": ("tab:green", "^"),
               "requests_held": ("tab:orange", "o"), "requests_failed": ("tab:red", "x")}


def summary(result: dict) -> str:
    c = result["config"]
    lines = [f"chaos: {c['model_name']}, {c['instances']} x {c['pp']}, {c['clients']} streaming "
             f"clients, a fault every {c['fault_every_s']:g} s for {c['duration_s']:g} s "
             f"(seed {c['seed']})"]
    faults = result["faults"]
    injected = [f for f in faults if f["injected"]]
    by = {}
    for f in injected:
        by[f["scenario"]] = by.get(f["scenario"], 0) + 1
    kinds = {k: sum(f["kind"] == k for f in injected) for k in ("kill", "hang")}
    lines.append(f"faults: {len(injected)} injected ({kinds['kill']} kills, {kinds['hang']} "
                 f"hangs); by scenario: " + ", ".join(f"{s} {n}" for s, n in sorted(by.items())))
    rejoins = [e for e in result["events"] if e["kind"] == "rejoined"
               and "restarted" not in e["detail"]]
    recomputing = [e for e in rejoins if not e["detail"].split(":")[0].endswith("recompute 0")]
    lines.append(f"moves back to a replacement: {len(rejoins)}, {len(recomputing)} of them "
                 "recomputing" + "".join(f"; {e['detail']}" for e in recomputing[:3]))
    r = result["requests"]
    refused = sum(1 for x in result["records"] if x["status"] == 503)
    lines.append(f"requests: {r['sent']} sent, {r['completed']} completed, {r['failed']} failed "
                 f"({refused} refused with 503, {r['failed'] - refused} ended with an error); "
                 f"{r['tokens']} tokens streamed")
    for name, check in result["checks"].items():
        mark = "ok  " if check["ok"] else "FAIL"
        detail = f" ({check['detail']})" if check["detail"] else ""
        lines.append(f"  {mark} {name:<11} {check['value']}{detail}")
    if result.get("leftovers"):  # threads by name and TCP peers, idle, at the start and end
        for when in ("start", "end"):
            for slot, d in sorted(result["leftovers"][when].items()):
                lines.append(f"  {when} {slot}: threads {d['threads']}; peers {d['peers']}")
    lines.append("all invariants held" if result["ok"] else "SOME INVARIANTS BROKE")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples, faults = result["samples"], result["faults"]
    n = result["config"]["instances"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 5.5), sharex=True,
                                      gridspec_kw=dict(height_ratios=[1.2, 1]))
    for i in range(n):  # one band per instance, coloured by its phase
        for a, b in zip(samples, samples[1:]):
            top.barh(i, b["t_s"] - a["t_s"], left=a["t_s"], height=0.6,
                     color=PHASE_COLOURS.get(a["phases"][i], "black"), linewidth=0)
    for f in faults:
        if f["injected"]:
            colour = "red" if f["kind"] == "kill" else "purple"
            for ax in (top, bottom):
                ax.axvline(f["t_s"], color=colour, lw=0.8, alpha=0.7)
            top.text(f["t_s"], n - 0.35, f["worker"], rotation=90, fontsize=6, va="bottom",
                     color=colour)
    seen = set()
    for e in result["events"]:
        if e["kind"] in EVENT_MARKS and e["instance"] is not None:
            colour, marker = EVENT_MARKS[e["kind"]]
            top.scatter(e["t_s"], e["instance"] + 0.38, color=colour, marker=marker, s=18,
                        label=None if e["kind"] in seen else e["kind"], zorder=3)
            seen.add(e["kind"])
    top.set_yticks(range(n), [f"instance {i}" for i in range(n)])
    top.set_ylim(-0.5, n + 0.2)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in PHASE_COLOURS.values()]
    first = top.legend(handles, PHASE_COLOURS, fontsize=6, ncol=8, loc="upper left",
                       bbox_to_anchor=(0, 1.22))
    top.add_artist(first)
    if seen:
        top.legend(fontsize=6, loc="upper right", bbox_to_anchor=(1, 1.22), ncol=3)
    # Served requests: tokens streamed per second, and each request's end.
    stamps = [t for r in result["records"] for t in r["token_times_s"]]
    end = max([s["t_s"] for s in samples] + stamps + [1.0])
    bins = [0] * (int(end) + 1)
    for t in stamps:
        bins[int(t)] += 1
    bottom.plot([k + 0.5 for k in range(len(bins))], bins, color="tab:gray", lw=1,
                label="tokens/s")
    done = [r["end_s"] for r in result["records"] if not r["error"]]
    failed = [r["end_s"] for r in result["records"] if r["error"]]
    top_y = max(bins + [1])
    bottom.scatter(done, [top_y * 1.05] * len(done), color="tab:green", marker="|", s=30,
                   label="request completed")
    if failed:
        bottom.scatter(failed, [top_y * 1.12] * len(failed), color="tab:red", marker="x", s=20,
                       label="request failed")
    bottom.set_xlabel("seconds")
    bottom.set_ylabel("tokens / s")
    bottom.legend(fontsize=7, loc="lower right")
    fig.suptitle(result["summary"].splitlines()[0], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
