"""The one job driver: events, results, stop from another thread, wind-down hooks."""

from __future__ import annotations

import threading

import pytest

from napari_slide_attention.jobs import Job, Progress, Stopped, current_job, run_to_end


def counting(n: int, log: list[str]):
    """A job of ``n`` steps that records what happened to it."""
    try:
        for i in range(n):
            log.append(f"step {i}")
            yield Progress("step", i + 1, n)
        return "done"
    finally:
        log.append("cleaned up")


def test_run_returns_the_result_and_passes_every_event():
    log: list[str] = []
    events: list[Progress] = []
    assert run_to_end(counting(3, log), events.append) == "done"
    assert [e.done for e in events] == [1, 2, 3] and log[-1] == "cleaned up"


def test_stop_closes_the_work_at_its_next_event_and_raises_stopped():
    log: list[str] = []
    job = Job(counting(10, log))
    seen = []

    def on_event(event: Progress) -> None:
        seen.append(event.done)
        if event.done == 2:
            job.stop("cancelled")

    with pytest.raises(Stopped) as stopped:
        job.run(on_event)
    assert stopped.value.reason == "cancelled" and job.stopping
    # step 3 never ran: the generator was closed where it stood, its finally ran
    assert seen == [1, 2] and log == ["step 0", "step 1", "cleaned up"]


def test_stop_from_another_thread_ends_a_job_driven_as_events():
    started, release = threading.Event(), threading.Event()
    log: list[str] = []

    def slow():
        try:
            while True:
                started.set()
                release.wait(5)
                yield Progress("tick")
        finally:
            log.append("closed")

    job = Job(slow())
    events = job.events()
    next(events)
    threading.Thread(target=lambda: (job.stop(), release.set())).start()
    with pytest.raises(Stopped):
        for _ in events:
            pass
    assert log == ["closed"]


def test_work_with_a_stop_hook_winds_down_and_returns_its_result():
    calls: list[str] = []

    def process_like():
        job = current_job()
        state = {"stopping": False}
        job.on_stop(lambda: (calls.append("hook"), state.update(stopping=True)))
        for i in range(100):
            if state["stopping"]:
                return f"stopped after {i}"  # e.g. the subprocess saved and exited
            yield Progress("step", i)
        return "finished"

    job = Job(process_like())

    def on_event(event: Progress) -> None:
        if event.done == 3:
            job.stop()

    assert job.run(on_event) == "stopped after 4" and calls == ["hook"]


def test_a_hook_registered_after_the_stop_runs_at_once():
    job = Job(iter(()))  # type: ignore[arg-type]
    job.stop()
    called = []
    job.on_stop(lambda: called.append(True))
    assert called == [True]


def test_a_failure_caused_by_the_stop_is_reported_as_the_stop():
    job = Job(None)  # type: ignore[arg-type]

    def broken_by_stop():
        yield Progress("one")
        job.stop()
        raise BrokenPipeError("the pipe closed under the reader")

    job.work = broken_by_stop()
    with pytest.raises(Stopped):
        job.run()


def test_an_error_without_a_stop_propagates_unchanged():
    def failing():
        yield Progress("one")
        raise ValueError("slide.tif: damaged")

    with pytest.raises(ValueError, match="damaged"):
        run_to_end(failing())


def test_current_job_is_the_driver_inside_the_work_only():
    seen = []

    def work():
        seen.append(current_job())
        yield Progress("one")
        seen.append(current_job())

    job = Job(work())
    job.run()
    assert seen == [job, job] and current_job() is None


def test_the_event_finished_while_a_stop_arrives_is_delivered_before_the_stop():
    """An epoch saved while Ctrl-C arrived is reported: the driver hands the event on and
    closes the work at the next call, before any more work is done."""
    log: list[str] = []
    job = Job(None)  # type: ignore[arg-type]

    def epochs():
        try:
            for epoch in (1, 2, 3):
                if epoch == 2:
                    job.stop("SIGINT")  # arrives while epoch 2 is being computed
                log.append(f"epoch {epoch} saved")
                yield Progress("epoch", epoch, 3)
        finally:
            log.append("closed")

    job.work = epochs()
    seen = []
    with pytest.raises(Stopped, match="SIGINT"):
        job.run(lambda e: seen.append(e.done))
    assert seen == [1, 2] and log == ["epoch 1 saved", "epoch 2 saved", "closed"]
