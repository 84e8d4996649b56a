"""The nightly run ledger on SQLite and PostgreSQL: resume an unfinished night, never repeat a finished one."""

from sqlalchemy import Engine

from storage import runs as ledger


def test_an_unfinished_night_is_continued_with_its_finished_stages(engine: Engine) -> None:
    run_id, finished = ledger.open_run(engine, "support", "2026-11-21")
    assert finished is None
    ledger.start_stage(engine, run_id, "harvest")
    ledger.finish_stage(engine, run_id, "harvest", {"rows": 12})
    ledger.start_stage(engine, run_id, "judge")  # the process dies here
    again, finished = ledger.open_run(engine, "support", "2026-11-21")
    assert again == run_id and finished is None
    assert ledger.finished_stage(engine, run_id, "harvest") == {"rows": 12}
    assert ledger.finished_stage(engine, run_id, "judge") is None
    ledger.start_stage(engine, run_id, "judge")  # restarting a stage reuses its row
    ledger.finish_stage(engine, run_id, "judge", {"scored": 3})
    assert [row[:2] for row in ledger.stage_rows(engine, run_id)] == [("harvest", "done"), ("judge", "done")]


def test_a_finished_night_is_reported_not_repeated_unless_forced(engine: Engine) -> None:
    run_id, _ = ledger.open_run(engine, "math", "2026-11-21")
    ledger.finish_run(engine, run_id, "rejected", {"status": "rejected"})
    same, finished = ledger.open_run(engine, "math", "2026-11-21")
    assert same == run_id and finished is not None and finished.summary == {"status": "rejected"}
    forced, finished = ledger.open_run(engine, "math", "2026-11-21", force=True)
    assert forced != run_id and finished is None
    assert ledger.get_run(engine, forced).attempt == 2
    assert ledger.last_runs(engine)["math"].id == forced


def test_a_failed_night_is_retried_in_the_same_attempt(engine: Engine) -> None:
    run_id, _ = ledger.open_run(engine, "support", "2026-11-22")
    ledger.finish_run(engine, run_id, "failed", {"error": "judge unreachable"})
    again, finished = ledger.open_run(engine, "support", "2026-11-22")
    assert again == run_id and finished is None
    assert ledger.get_run(engine, run_id).status == "running"


def test_earlier_nights_stage_details_are_the_latest_finished_attempt_per_night(engine: Engine) -> None:
    def night(track: str, day: str, detail: dict[str, int] | None, *, force: bool = False) -> None:
        run_id, _ = ledger.open_run(engine, track, day, force=force)
        ledger.start_stage(engine, run_id, "select")
        if detail is not None:
            ledger.finish_stage(engine, run_id, "select", detail)
        ledger.finish_run(engine, run_id, "skipped", {})

    night("support", "2026-11-20", {"n": 20})
    night("support", "2026-11-21", {"n": 21})
    night("support", "2026-11-21", {"n": 210}, force=True)  # a forced re-run: the later attempt counts
    night("support", "2026-11-22", None)  # its select never finished
    night("math", "2026-11-22", {"n": -1})  # another track
    night("support", "2026-11-23", {"n": 23})  # tonight

    def earlier(nights: int) -> list[dict[str, int]]:
        return ledger.earlier_stage_details(
            engine, "support", "select", before_night="2026-11-23", nights=nights
        )

    assert earlier(5) == [{"n": 210}, {"n": 20}]
    assert earlier(1) == [{"n": 210}]
    assert earlier(0) == []
