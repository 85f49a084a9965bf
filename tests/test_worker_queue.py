"""Which read-ahead message a worker handles next (deploy/worker.next_message):
in order, but for the first step of an instance after a failure at the
worker it borrowed, which goes ahead of other pipelines' steps only."""
from kevlarflow.deploy.worker import next_message


def step(group: str, priority: bool = False) -> dict:
    return dict(type="step", group=group, priority=priority)


def test_in_order_without_a_priority_step():
    assert next_message([step("pipe1"), step("pipe0"), step("pipe1")]) == 0


def test_a_priority_step_goes_ahead_of_the_lender_s_steps():
    assert next_message([step("pipe1"), step("pipe1"), step("pipe0", True), step("pipe1")]) == 2
    assert next_message([step("pipe0", True), step("pipe1")]) == 0


def test_a_priority_step_passes_no_step_of_its_own_pipeline_and_no_other_message():
    assert next_message([step("pipe0", True), step("pipe0", True)]) == 0
    assert next_message([step("pipe0"), step("pipe1"), step("pipe0", True)]) == 0
    for other in ("leave_group", "build_group", "shutdown"):
        assert next_message([step("pipe1"), dict(type=other), step("pipe0", True)]) == 0
