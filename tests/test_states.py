import itertools

import pytest

from batch.states import TRANSITIONS, IllegalTransition, JobState, check_transition


def test_every_state_has_a_row_and_final_states_only_leave_by_retry() -> None:
    assert set(TRANSITIONS) == set(JobState)
    # Only retry moves them: back to be sent, or a failed download's paid result fetched.
    assert TRANSITIONS[JobState.REJECTED] == {JobState.PENDING}
    assert TRANSITIONS[JobState.FAILED] == {JobState.PENDING, JobState.READY}


@pytest.mark.parametrize(("current", "target"), [
    (JobState.PENDING, JobState.QUEUED),        # never skip the committed 'submitting'
    (JobState.QUEUED, JobState.SUBMITTING),     # a paid task is never uploaded again silently
    (JobState.DONE, JobState.SUBMITTING),
    (JobState.REJECTED, JobState.SUBMITTING),
    (JobState.READY, JobState.DONE),            # done only through downloading
])
def test_illegal_transitions_are_refused(current: JobState, target: JobState) -> None:
    with pytest.raises(IllegalTransition):
        check_transition(1, current, target)


def test_the_happy_path_is_legal() -> None:
    path = [JobState.PENDING, JobState.SUBMITTING, JobState.QUEUED, JobState.PROCESSING,
            JobState.READY, JobState.DOWNLOADING, JobState.DONE]
    for current, target in itertools.pairwise(path):
        check_transition(1, current, target)
