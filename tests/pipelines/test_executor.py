"""The local executor: results in the items' order, a failed unit raises, workers see the
caller's environment as it is when the units run (a forkserver keeps the one it started with)."""

import os

import pytest

from pipelines.executor import LocalExecutor


def square(x: int) -> int:
    return x * x


def fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError(f"unit {x} is bad")
    return x


def environment_value(name: str) -> tuple[str | None, int]:
    return os.environ.get(name), os.getpid()


def test_results_come_in_the_items_order_with_the_node():
    executor = LocalExecutor(workers=2)
    ran = list(executor.map(square, range(20)))
    assert [result for result, _ in ran] == [x * x for x in range(20)]
    assert executor.stats() == {"executor": "local", "nodes": 1}


def test_a_failed_unit_raises_its_own_error():
    with pytest.raises(ValueError, match="unit 3 is bad"):
        list(LocalExecutor(workers=2).map(fail_on_three, range(8)))


def test_workers_see_the_environment_set_after_the_first_pool(monkeypatch):
    list(LocalExecutor(workers=2).map(square, range(4)))  # the forkserver starts here
    monkeypatch.setenv("KILN_TEST_SETTING", "set later")
    seen = [result for result, _ in LocalExecutor(workers=2).map(environment_value, ["KILN_TEST_SETTING"] * 4)]
    assert {value for value, _ in seen} == {"set later"}
    assert all(pid != os.getpid() for _, pid in seen), "the units ran in worker processes"


def worker_pid(_: int) -> int:
    import time

    time.sleep(0.05)  # long enough for both workers to take a unit
    return os.getpid()


def test_one_pool_serves_every_phase_of_a_stage():
    with LocalExecutor(workers=2) as executor:
        phases = []
        for _ in range(3):  # read as the stages read it: zip stops before the generator ends
            phases.append({pid for _, (pid, _node) in zip(range(6), executor.map(worker_pid, range(6)))})
    assert phases[0] == phases[1] == phases[2] and len(phases[0]) == 2, phases
    assert executor._pool is None, "closed at the end of the stage"
