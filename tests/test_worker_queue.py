"""Which read-ahead message a worker handles next (deploy/read_ahead.next_index):
in order, but for the first step of an instance after a failure at the
worker it borrowed, which goes ahead of other pipelines' steps only."""
from kevlarflow.deploy.read_ahead import next_index


def step(group: str, priority: bool = False) -> dict:
    return dict(type="step", group=group, priority=priority)


def test_in_order_without_a_priority_step():
    assert next_index([step("pipe1"), step("pipe0"), step("pipe1")]) == 0


def test_a_priority_step_goes_ahead_of_the_lender_s_steps():
    assert next_index([step("pipe1"), step("pipe1"), step("pipe0", True), step("pipe1")]) == 2
    assert next_index([step("pipe0", True), step("pipe1")]) == 0


def test_a_priority_step_follows_the_leaves_it_was_sent_after():
    """The takeover of replica blocks (a leave of the link) comes before the
    step that uses them; a lender's step is passed by both."""
    leave = dict(type="leave_group", group="repl.w0.1")
    queue = [step("pipe1"), leave, step("pipe1"), step("pipe0", True)]
    assert next_index(queue) == 1
    del queue[1]
    assert next_index(queue) == 2


def test_a_priority_step_passes_no_step_of_its_own_pipeline_and_no_other_message():
    assert next_index([step("pipe0", True), step("pipe0", True)]) == 0
    assert next_index([step("pipe0"), step("pipe1"), step("pipe0", True)]) == 0
    for other in (dict(type="build_group", group="pipe0"), dict(type="shutdown"),
                  dict(type="leave_group", group="pipe1")):  # the lender's own pipeline
        assert next_index([step("pipe1"), other, step("pipe0", True)]) == 0
