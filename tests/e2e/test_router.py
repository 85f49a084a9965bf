"""The router: least outstanding work among serving instances; while none
serves, among those that will without a new worker; nothing for the rest."""
import os
import signal
from dataclasses import dataclass

import pytest

from kevlarflow import LLM, SamplingParams
from kevlarflow.deploy.router import NoInstanceServing, pick_instance
from helpers.models import tiny_model


@dataclass
class FakeLoad:  # the router reads only these four things
    index: int
    serving: bool
    tokens: int
    accepting: bool = False

    def outstanding_tokens(self) -> int:
        return self.tokens


def test_least_outstanding_work_wins_and_ties_go_to_the_lowest_index():
    assert pick_instance([FakeLoad(0, True, 50), FakeLoad(1, True, 20)]).index == 1
    assert pick_instance([FakeLoad(0, True, 20), FakeLoad(1, True, 20)]).index == 0
    assert pick_instance([FakeLoad(0, False, 0), FakeLoad(1, True, 900)]).index == 1
    with pytest.raises(NoInstanceServing):
        pick_instance([FakeLoad(0, False, 0), FakeLoad(1, False, 0)])


def test_while_none_serves_a_recovering_instance_takes_the_request():
    """An instance rebuilding its communicator (accepting, not serving) gets
    the request rather than a refusal; a serving one is still preferred."""
    assert pick_instance([FakeLoad(0, False, 0, accepting=True),
                          FakeLoad(1, False, 0)]).index == 0
    assert pick_instance([FakeLoad(0, False, 0, accepting=True),
                          FakeLoad(1, False, 9, accepting=True)]).index == 0
    assert pick_instance([FakeLoad(0, False, 0, accepting=True),
                          FakeLoad(1, True, 900, accepting=True)]).index == 1


def test_requests_spread_by_load_and_survive_a_lost_worker():
    greedy = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    with LLM(tiny_model(), num_instances=2, pp_size=1, block_size=4) as llm:
        engine = llm.engine
        first = engine.add_request([5] * 10, greedy)
        second = engine.add_request([6] * 10, greedy)
        assert engine.owner[first].index == 0 and engine.owner[second].index == 1
        # Equal loads: the tie goes to instance 0; then it has more left to do.
        short = engine.add_request([7] * 3, SamplingParams(max_tokens=5))
        assert engine.owner[short].index == 0
        assert engine.owner[engine.add_request([7] * 3, SamplingParams(max_tokens=5))].index == 1
        engine.step()
        # Instance 0 loses its worker; it borrows instance 1's and carries on.
        os.kill(engine.launcher.procs[(0, 0)].pid, signal.SIGKILL)
        finished = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out
        # Nothing was lost: instance 0's requests finished on the borrowed worker.
        assert finished["0"].finish_reason == "length" and len(finished["0"].token_ids) == 200
        assert finished["1"].finish_reason == "length" and len(finished["1"].token_ids) == 200
        assert finished["2"].finish_reason == "length" and finished["3"].finish_reason == "length"
