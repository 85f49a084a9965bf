"""A short chaos run: `kevlarflow bench chaos` on the tiny model, a kill or a
hang every 5 s for 40 s under streaming clients, and every invariant it
checks must hold (exact outputs and streams, failures only once a stage
had no live worker for the outage timeout: with its default of 30 s, none;
recovery within 5 s of the last fault, /health "ok" and
every slot home at the end, idle pools empty, no leaks, a clean stop)."""
import json

from kevlarflow.bench.chaos import main as chaos
from helpers.models import tiny_model


def test_a_short_chaos_run_keeps_every_invariant(tmp_path):
    try:
        result = chaos(["--model", tiny_model(), "--duration", "40", "--fault-every", "5",
                        "--clients", "3", "--seed", "3", "--out", str(tmp_path)])
    except SystemExit:
        result = json.loads((tmp_path / "chaos.json").read_text())
    assert result["ok"], result["summary"]
    injected = [f for f in result["faults"] if f["injected"]]
    assert len(injected) >= 6, result["summary"]
    kinds = {e["kind"] for e in result["events"]}
    assert {"rerouted", "resumed", "rejoined"} <= kinds, kinds
    assert result["requests"]["completed"] >= 50, result["summary"]
    assert (tmp_path / "chaos-timeline.png").stat().st_size > 0
