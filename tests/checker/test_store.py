"""The SQLite task store on real files: migrations, constraints, state that survives re-opening."""

from __future__ import annotations

import json
import sqlite3
import sys
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from checker.nodes import previous_release_store

from checker_common import task_spec
from checker_common.contract import Health
from checker_common.task_spec import TaskSpec, TaskStatus, checked_digest, spec_json
from periodic_checker.store import (
    _UPSERT,
    MIGRATIONS,
    SCHEMA_VERSION,
    SQLiteTaskStore,
    StoreError,
    TaskExists,
    ViewBatch,
    ViewWrite,
    _view_row,
    decode_cursor,
)
from periodic_checker.task_service import NameTaken, TaskFilter, TooManyTasks
from periodic_checker.tasks import Task, after_attempt, compacted

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def make_task(name: str = "site", created: datetime = NOW, **spec: Any) -> Task:
    fields: dict[str, Any] = {"name": name, "url": f"http://{name}.test/", "interval": 60.0}
    fields.update(spec)
    return Task(id=uuid.uuid4(), spec=TaskSpec(**fields), created_at=created, updated_at=created)


def invalid_record_task(url: str, interval: float) -> Task:
    """A task from a record that did not validate: in error, its definition never validated."""
    return Task(
        id=uuid.uuid4(),
        spec=TaskSpec.model_construct(name="bad", url=url, interval=interval),
        status=TaskStatus.ERROR,
        status_reason="invalid task record: spec.url: scheme must be http or https",
        created_at=NOW,
        updated_at=NOW,
    )


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "tasks.sqlite3"


def test_migrations_apply_to_an_empty_file_and_reopening_keeps_them(path: Path) -> None:
    store = SQLiteTaskStore(path)
    assert store.schema_version == SCHEMA_VERSION
    store.insert(make_task())
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again = SQLiteTaskStore(path)
    assert [t.spec.name for t in again.load(NOW)] == ["site"]
    again.close()


def test_a_file_from_a_newer_checker_is_refused(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer than this checker"):
        SQLiteTaskStore(path)


def test_tasks_and_their_state_survive_reopening(path: Path) -> None:
    store = SQLiteTaskStore(path)
    task = make_task(pattern="Welcome", headers={"X-Probe": "1"}, retries=2)
    store.insert(task)
    later = NOW + timedelta(minutes=5)
    changed = task.model_copy(
        update={
            "status": TaskStatus.PAUSED,
            "health": Health.DOWN,
            "runs": 42,
            "manual_runs": 5,
            "failures_in_a_row": 3,
            "updated_at": later,
            "last_run_at": later,
        }
    )
    store.save_states([changed])
    store.close()
    reopened = SQLiteTaskStore(path)
    assert reopened.load(NOW) == [changed]
    assert reopened.get(task.id) == changed
    reopened.close()


def test_a_file_of_the_first_schema_gains_the_manual_run_counter(path: Path) -> None:
    task = make_task()
    with sqlite3.connect(path) as db:
        for statement in MIGRATIONS[0]:
            db.execute(statement)
        db.execute(
            "INSERT INTO tasks (id, name, url, spec, status, health, runs, failures_in_a_row,"
            " created_at, updated_at) VALUES (?, ?, ?, ?, 'active', 'down', 7, 2, ?, ?)",
            (str(task.id), "site", "http://site.test/", task.spec.model_dump_json(),
             NOW.isoformat(), NOW.isoformat()),
        )  # fmt: skip
        db.execute("PRAGMA user_version = 1")
    db.close()
    store = SQLiteTaskStore(path)
    assert store.schema_version == SCHEMA_VERSION
    (loaded,) = store.load(NOW)
    assert (loaded.runs, loaded.manual_runs, loaded.failures_in_a_row) == (7, 0, 2)
    store.save_states([loaded.model_copy(update={"manual_runs": 1})])
    assert store.get(task.id) == loaded.model_copy(update={"manual_runs": 1})
    store.close()


def test_names_are_unique(path: Path) -> None:
    store = SQLiteTaskStore(path)
    first = make_task("site")
    store.insert(first)
    with pytest.raises(NameTaken, match="'site'"):
        store.insert(make_task("site"))
    other = make_task("other")
    store.insert(other)
    renamed = other.model_copy(update={"spec": other.spec.model_copy(update={"name": "site"})})
    with pytest.raises(NameTaken):
        store.replace(renamed)
    with pytest.raises(TaskExists):
        store.insert(first.model_copy(update={"spec": make_task("third").spec}))
    store.close()


def test_max_tasks_is_enforced(path: Path) -> None:
    store = SQLiteTaskStore(path, max_tasks=2)
    store.insert(make_task("a"))
    store.insert(make_task("b"))
    with pytest.raises(TooManyTasks, match="2 tasks"):
        store.insert(make_task("c"))
    store.close()


def test_replace_and_delete(path: Path) -> None:
    store = SQLiteTaskStore(path)
    task = make_task()
    store.insert(task)
    spec = TaskSpec(name="site", url="https://elsewhere.test/", interval=30)
    store.replace(task.model_copy(update={"spec": spec}))
    stored = store.get(task.id)
    assert stored is not None
    assert stored.spec == spec
    assert store.delete(task.id) is True
    assert store.delete(task.id) is False
    assert store.get(task.id) is None
    store.close()


@pytest.mark.parametrize(
    ("raw_change", "reason"),
    [
        ({"timeout": 90.0}, "timeout: must be below the interval"),
        ({"pattern": "(unclosed"}, "pattern: not a valid RE2"),
        # Valid before patterns had a size limit (the one the limit was made for).
        (
            {"pattern": r"\w{1000}\w{1000}\w{1000}\w{1000}Z"},
            "pattern: compiles to 12005 RE2 instructions; at most 1000",
        ),
        (
            {"pattern": "x" * 100, "max_body_bytes": 64 * 1_048_576},
            "max_body_bytes: at most 41297762 bytes with this pattern (104 RE2 instructions)",
        ),
        ({"retired_field": True}, "retired_field: Extra inputs are not permitted"),
    ],
)
def test_a_stored_definition_that_no_longer_validates_becomes_error_with_reason(
    path: Path, raw_change: dict[str, Any], reason: str
) -> None:
    store = SQLiteTaskStore(path)
    task = make_task()
    store.insert(task)
    store.close()
    # What an upgrade that tightens a rule looks like: the stored JSON is as it was.
    with sqlite3.connect(path) as db:
        (raw,) = db.execute("SELECT spec FROM tasks").fetchone()
        db.execute("UPDATE tasks SET spec = ?", (json.dumps({**json.loads(raw), **raw_change}),))
    store = SQLiteTaskStore(path)
    (loaded,) = store.load(NOW)
    assert loaded.status is TaskStatus.ERROR
    assert loaded.status_reason is not None
    assert reason in loaded.status_reason
    assert loaded.spec.name == "site"
    assert loaded.spec.url == "http://site.test/"
    store.close()
    # The status and reason were stored, so anything reading the store shows them.
    with sqlite3.connect(path) as db:
        status, stored_reason = db.execute("SELECT status, status_reason FROM tasks").fetchone()
    assert status == "error"
    assert reason in stored_reason


def varied_tasks() -> list[Task]:
    return [
        make_task("plain", created=NOW),
        make_task(
            "full",
            created=NOW + timedelta(seconds=1),
            method="POST",
            headers={"Authorization": "Bearer s3cret", "X-Probe": "1"},
            secret_headers=["X-Probe"],
            body="{}",
            pattern="Welcome",
            pattern_fails_when="present",
            accepted_statuses="200,204",
            retries=2,
            end_after_runs=5,
            end_at=NOW + timedelta(days=3),
        ),
        make_task("once", created=NOW + timedelta(seconds=2), interval=None),
    ]


def test_a_definition_validated_by_this_checker_loads_the_same_without_validating(
    path: Path,
) -> None:
    store = SQLiteTaskStore(path)
    tasks = varied_tasks()
    for task in tasks:
        store.insert(task)
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT spec, spec_checked FROM tasks").fetchall()
    assert all(checked == checked_digest(spec) for spec, checked in rows)
    trusted = store.load(NOW)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE tasks SET spec_checked = NULL")  # as an older release leaves it
    validated = store.load(NOW)
    assert trusted == validated == tasks
    for a, b in zip(trusted, validated, strict=True):
        assert a.spec.model_dump_json() == b.spec.model_dump_json()
        assert a.model_dump() == b.model_dump()
    assert isinstance(trusted[1].spec.end_at, datetime)
    store.close()


def test_tasks_loaded_without_validating_hold_their_values_in_shared_key_dictionaries(
    path: Path,
) -> None:
    """The memory of 100,000 loaded tasks is mostly their dictionaries: each one loaded as
    validated keeps only its values (the field names are one table for all), and a text many
    definitions repeat (the pattern, the accepted statuses) is one string."""
    store = SQLiteTaskStore(path)
    for n in range(3):
        store.insert(make_task(f"site-{n}", pattern="up and running", interval=30.0))
    tasks = store.load(NOW)
    for task in tasks:
        for model in (task, task.spec):
            held = model.__dict__
            assert sys.getsizeof(held) < sys.getsizeof(dict(held))
            assert list(held) == list(type(model).model_fields)
    first, *others = tasks
    assert all(t.spec.pattern is first.spec.pattern for t in others)
    assert all(t.spec.accepted_statuses is first.spec.accepted_statuses for t in others)
    # What a definition caches at its first check goes into the same dictionary, still shared.
    spec = first.spec
    assert spec.compiled_pattern is not None
    assert spec.status_ranges == ((200, 399),)
    assert spec.fetch_url.host == f"{spec.name}.test"
    assert spec.secret_values == ()
    assert {"compiled_pattern", "status_ranges", "secret_values"} <= spec.__dict__.keys()
    # Its URL as read is not kept by each definition: `parse_url` keeps the recent ones.
    assert "fetch_url" not in spec.__dict__
    assert sys.getsizeof(spec.__dict__) < sys.getsizeof(dict(spec.__dict__))
    # A check's new state keeps the shared keys (a check replaces every task it runs).
    ran = after_attempt(first, ok=True, error_kind=None, error_message="", attempt=1, now=NOW).task
    assert ran.runs == 1
    assert sys.getsizeof(ran.__dict__) < sys.getsizeof(dict(ran.__dict__))
    store.close()


def test_tasks_validated_again_after_an_upgrade_are_held_as_compactly(path: Path) -> None:
    """The first start after an upgrade validates every definition again: the tasks it makes
    are held in shared-key dictionaries all the same (not 2.5 x the memory until the next
    restart: 598 against 228 MB at READY at 100,000 tasks, BENCHMARKS.md)."""
    store = SQLiteTaskStore(path)
    for n in range(3):
        store.insert(make_task(f"site-{n}", pattern="up and running"))
    with sqlite3.connect(path) as db:
        db.execute("UPDATE tasks SET spec_checked = NULL")  # as another validator leaves it
    tasks = store.load(NOW)
    for task in tasks:
        for model in (task, task.spec):
            assert sys.getsizeof(model.__dict__) < sys.getsizeof(dict(model.__dict__))
    assert all(t.spec.pattern is tasks[0].spec.pattern for t in tasks)
    assert tasks == store.load(NOW)  # and the same as the next start loads them
    store.close()


def test_definitions_loaded_from_an_older_release_are_validated_once_then_marked(
    path: Path,
) -> None:
    store = SQLiteTaskStore(path)
    store.insert(make_task())
    with sqlite3.connect(path) as db:
        db.execute("UPDATE tasks SET spec_checked = NULL")
    store.load(NOW)
    with sqlite3.connect(path) as db:
        spec, checked = db.execute("SELECT spec, spec_checked FROM tasks").fetchone()
    assert checked == checked_digest(spec)
    store.close()


def test_a_definition_an_older_validator_accepted_is_validated_again_and_may_fail(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The digest holds the validator's fingerprint: a definition marked by another validator
    (before an upgrade that tightened a rule) is validated again, and turns its task to error."""
    store = SQLiteTaskStore(path)
    store.insert(make_task())
    with sqlite3.connect(path) as db:
        (raw,) = db.execute("SELECT spec FROM tasks").fetchone()
        tightened = json.dumps({**json.loads(raw), "timeout": 90.0})  # above the interval
        with monkeypatch.context() as old:
            old.setattr(task_spec, "validator_fingerprint", lambda: b"the older validator")
            marked = checked_digest(tightened)
        db.execute("UPDATE tasks SET spec = ?, spec_checked = ?", (tightened, marked))
    (loaded,) = store.load(NOW)
    assert loaded.status is TaskStatus.ERROR
    assert "timeout: must be below the interval" in (loaded.status_reason or "")
    store.close()


def test_the_validator_fingerprint_changes_with_the_rules_source() -> None:
    fingerprint = task_spec.validator_fingerprint()
    assert isinstance(fingerprint, bytes)
    assert len(fingerprint) == 16
    assert checked_digest('{"a":1}') != checked_digest('{"a":2}')


def test_pages_filter_and_follow_the_cursor(path: Path) -> None:
    store = SQLiteTaskStore(path)
    tasks = [make_task(f"site-{i:02}", created=NOW + timedelta(seconds=i)) for i in range(25)]
    for task in tasks:
        store.insert(task)
    store.save_states([tasks[3].model_copy(update={"health": Health.DOWN})])
    store.save_states([tasks[4].model_copy(update={"status": TaskStatus.PAUSED})])

    seen: list[str] = []
    cursor: str | None = None
    while True:
        page = store.page(TaskFilter(limit=10, cursor=cursor))
        seen += [t.spec.name for t in page.tasks]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == [t.spec.name for t in tasks]

    assert [t.id for t in store.page(TaskFilter(health=Health.DOWN)).tasks] == [tasks[3].id]
    assert [t.id for t in store.page(TaskFilter(status=TaskStatus.PAUSED)).tasks] == [tasks[4].id]
    found = store.page(TaskFilter(text="SITE-1")).tasks
    assert [t.spec.name for t in found] == [f"site-{i}" for i in range(10, 20)]
    assert store.page(TaskFilter(text="%")).tasks == []
    by_status, by_health = store.counts()
    assert by_status == {"active": 24, "paused": 1}
    assert by_health == {"unknown": 24, "down": 1}
    store.close()


@pytest.mark.parametrize("cursor", ["", "not-base64!", "bm9uc2Vuc2U", "WzEsMl0"])
def test_a_cursor_the_store_did_not_make_is_refused(cursor: str) -> None:
    with pytest.raises(ValueError, match="not a valid cursor"):
        decode_cursor(cursor)


# --- the task topic (schema 3) -------------------------------------------------------------------


def test_a_file_of_the_previous_release_keeps_its_tasks_and_publishes_each_once(
    path: Path,
) -> None:
    tasks = [make_task(f"site-{i}", created=NOW + timedelta(seconds=i)) for i in range(3)]
    previous_release_store(path, tasks)

    store = SQLiteTaskStore(path)

    assert store.schema_version == SCHEMA_VERSION == 5
    loaded = store.load(NOW)
    assert [(t.id, t.runs, t.manual_runs, t.health) for t in loaded] == [
        (t.id, 4, 1, Health.UP) for t in tasks
    ]
    assert [t.id for t in store.unpublished()] == [t.id for t in tasks]
    store.mark_published([(t.id, t.updated_at) for t in loaded])
    assert store.unpublished() == []
    store.close()
    assert SQLiteTaskStore(path).unpublished() == []  # marks survive reopening


def test_a_change_after_its_record_was_published_is_unpublished_again(path: Path) -> None:
    store = SQLiteTaskStore(path)
    task = make_task()
    store.insert(task)
    store.mark_published([(task.id, task.updated_at)])
    paused = task.model_copy(
        update={"status": TaskStatus.PAUSED, "updated_at": NOW + timedelta(seconds=1)}
    )
    store.save_states([paused])
    # The mark of the older version comes late: the newer one stays to be published.
    store.mark_published([(task.id, task.updated_at)])
    assert store.unpublished() == [paused]
    store.close()


def test_finding_the_unpublished_tasks_reads_only_them_not_every_row(path: Path) -> None:
    # Every start asks; at 100,000 published tasks a scan of the table cost 0.17 s of READY.
    store = SQLiteTaskStore(path)
    tasks = [make_task(f"site-{i}", created=NOW + timedelta(seconds=i)) for i in range(3)]
    for task in tasks:
        store.insert(task)
    store.mark_published([(t.id, t.updated_at) for t in tasks[:2]])
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)

    assert [t.id for t in store.unpublished()] == [tasks[2].id]

    (query,) = [s for s in statements if s.lstrip().startswith("SELECT")]
    with sqlite3.connect(path) as db:
        plan = " ".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {query}"))
    assert plan == "SCAN tasks USING INDEX tasks_unpublished"
    store.close()


def test_names_stay_unique_for_the_api_but_a_view_may_hold_two_tasks_of_one_name(
    path: Path,
) -> None:
    store = SQLiteTaskStore(path)
    first, second = make_task("site"), make_task("site")
    store.insert(first)
    with pytest.raises(NameTaken):
        store.insert(second)
    # What the task topic holds (another program wrote both), the view holds.
    store.apply(ViewBatch(upserts=[ViewWrite(second, True, 1, 7)]))
    assert sorted(store.named("site")) == sorted([first.id, second.id])
    assert store.record_position(second.id) == (1, 7)
    store.close()


def test_a_batch_of_records_is_written_with_the_offsets_reached(path: Path) -> None:
    store = SQLiteTaskStore(path)
    kept, gone = make_task("kept"), make_task("gone")
    store.insert(kept)
    store.insert(gone)
    changed = kept.model_copy(update={"status": TaskStatus.PAUSED})
    new = make_task("new")

    store.apply(
        ViewBatch(
            upserts=[ViewWrite(changed, True, 0, 3), ViewWrite(new, False, 2, 5)],
            removals=[gone.id],
            offsets={("tasks", 0): 4, ("tasks", 2): 6},
        )
    )

    assert {t.id: t.status for t in store.load(NOW)} == {
        kept.id: TaskStatus.PAUSED,
        new.id: TaskStatus.ACTIVE,
    }
    assert store.topic_offsets("tasks") == {0: 4, 2: 6}
    assert store.topic_offsets("other") == {}
    assert store.unpublished() == [new]  # as the checker judged it, not as recorded
    assert store.positions() == {kept.id: (0, 3), new.id: (2, 5)}
    store.close()


def test_a_rebuilt_view_is_exactly_the_tasks_given_and_keeps_state_apart(path: Path) -> None:
    store = SQLiteTaskStore(path)
    old = make_task("old")
    store.insert(old)
    store.save_states([old.model_copy(update={"runs": 12, "health": Health.DOWN})])
    state = store.runtime_states()[old.id]
    assert (state.runs, state.health, state.position) == (12, Health.DOWN, None)

    fresh = make_task("fresh")
    store.replace_view([ViewWrite(fresh, True, 1, 0)], {("tasks", 1): 1})

    assert store.load(NOW) == [fresh]
    assert store.unpublished() == []
    assert store.topic_offsets("tasks") == {1: 1}
    store.close()


def _stored_rows(path: Path) -> dict[str, tuple[Any, ...]]:
    with sqlite3.connect(path) as db:
        rows = db.execute(
            "SELECT id, name, url, spec, status, status_reason, health, runs, created_at,"
            " updated_at, published_at, record_partition, record_offset FROM tasks"
        ).fetchall()
    return {row[0]: row[1:] for row in rows}


def test_a_view_rebuilt_in_chunks_writes_the_same_rows_as_one_written_at_once(
    tmp_path: Path,
) -> None:
    # Text JSON must carry unchanged: quotes, backslashes, non-ASCII, a pattern's escapes.
    tricky = make_task(
        'Café ☕ "quoted" \\ back',
        url="http://xn--caf-dma.test/a%20b?q=%C3%A9",
        pattern=r"\d+\.\d \"x\"",
        headers={"X-Note": 'naïve ∂ \\ "'},
        tags=["a/b"],
    )
    tasks = [tricky, *(make_task(f"site-{i}") for i in range(2_500))]
    writes = [ViewWrite(t, True, i % 3, i) for i, t in enumerate(tasks)]
    at_once = SQLiteTaskStore(tmp_path / "a.sqlite3")
    with at_once._lock:  # the rows as one executemany of bound values writes them
        at_once._db.executemany(_UPSERT, [_view_row(w, checked=False) for w in writes])
    chunked = SQLiteTaskStore(tmp_path / "b.sqlite3")
    chunked.insert(make_task("gone"))
    rebuild = chunked.rebuild_view()
    for start in range(0, len(writes), 1_000):
        rebuild.add(writes[start : start + 1_000])
    rebuild.finish({("tasks", 0): 7})

    assert _stored_rows(tmp_path / "b.sqlite3") == _stored_rows(tmp_path / "a.sqlite3")
    assert chunked.get(tricky.id) == tricky
    assert chunked.count() == 2_501
    assert chunked.topic_offsets("tasks") == {0: 7}
    assert chunked.unpublished() == []
    at_once.close()
    chunked.close()


def test_a_view_rebuilt_from_task_records_writes_each_row_as_the_row_itself_spells_it(
    tmp_path: Path,
) -> None:
    # Tasks as a cluster node makes them from records (compacted definitions), whose rows
    # orjson writes itself (`_view_row(..., for_json=True)`), beside every kind the slower way
    # still writes:
    # times with no microseconds or in another zone, an end time, an integer beyond 64 bits,
    # a task in error whose definition was never validated, state and a status reason.
    later = NOW.replace(microsecond=0) + timedelta(days=1)
    in_paris = datetime(2026, 12, 6, 11, 0, 0, 250_000, tzinfo=timezone(timedelta(hours=1)))
    plain = [make_task(f"site-{i}", created=NOW + timedelta(microseconds=i)) for i in range(5)]
    tasks = [
        *(compacted(t) for t in plain),
        compacted(
            make_task(
                'Café ☕ "q" \\ b',
                url="http://xn--caf-dma.test/?q=%C3%A9",
                headers={"X-Note": 'naïve \t "'},
                tags=["a/b"],
                pattern=r"\d+",
            )
        ),
        compacted(make_task("whole-second", created=NOW.replace(microsecond=0))),
        compacted(make_task("ends", end_at=later)),
        compacted(make_task("runs-on", end_after_runs=2**70)),
        compacted(make_task("integers", interval=60, timeout=5, retry_interval=2)),
        compacted(make_task("elsewhere")).model_copy(
            update={
                "created_at": in_paris,
                "last_run_at": later,
                "runs": 4,
                "health": Health.DOWN,
                "failures_in_a_row": 2,
            }
        ),
        invalid_record_task("ftp://x", 7),
        # Published, nothing run (a row sent with its varying columns alone), changed after
        # it was made: `published_at` is its `updated_at`, not its `created_at`.
        compacted(make_task("changed")).model_copy(update={"updated_at": later}),
    ]
    writes = [ViewWrite(t, i % 2 == 0, i % 3, i) for i, t in enumerate(tasks)]
    slow = SQLiteTaskStore(tmp_path / "slow.sqlite3")
    with slow._lock:
        slow._db.executemany(_UPSERT, [_view_row(w, checked=False) for w in writes])
    fast = SQLiteTaskStore(tmp_path / "fast.sqlite3")
    fast.replace_view(writes, {})

    def every_column(name: str) -> list[tuple[Any, ...]]:
        with sqlite3.connect(tmp_path / name) as db:
            return db.execute("SELECT * FROM tasks ORDER BY id").fetchall()

    assert every_column("fast.sqlite3") == every_column("slow.sqlite3")
    for task in tasks:
        assert spec_json(task.spec) == task.spec.model_dump_json()
    assert {t.spec.name for t in fast.load(NOW)} == {t.spec.name for t in tasks}
    slow.close()
    fast.close()


@pytest.mark.parametrize("ran_first", [True, False])
def test_a_task_given_twice_in_one_chunk_keeps_its_later_row_whichever_way_each_is_sent(
    path: Path, ran_first: bool
) -> None:
    # A row with nothing but its definition, status, times and place goes with those columns
    # alone, one with state or a reason whole (`_PLAIN_ROWS_FROM_JSON`): in order all the same.
    fresh = compacted(make_task("site"))
    ran = fresh.model_copy(update={"runs": 3, "health": Health.UP})
    given = [ran, fresh] if ran_first else [fresh, ran]
    store = SQLiteTaskStore(path)
    store.replace_view([ViewWrite(t, True, 0, n) for n, t in enumerate(given)], {})
    assert store.load(NOW) == [given[-1]]
    assert store.positions() == {fresh.id: (0, 1)}
    store.close()


def test_a_rebuilt_view_takes_the_last_of_a_task_given_twice_and_drops_one_removed(
    path: Path,
) -> None:
    store = SQLiteTaskStore(path)
    (cache_size,) = store._db.execute("PRAGMA cache_size").fetchone()
    first, other = make_task("first"), make_task("other")
    renamed = first.model_copy(update={"spec": first.spec.model_copy(update={"name": "renamed"})})
    rebuild = store.rebuild_view()
    rebuild.add([ViewWrite(first, True, 0, 1), ViewWrite(other, True, 0, 2)])
    rebuild.add([ViewWrite(renamed, True, 1, 5)])
    rebuild.remove([other.id])
    rebuild.finish({})

    assert store.load(NOW) == [renamed]
    assert store.positions() == {first.id: (1, 5)}
    # The larger page cache of the rebuild is given back, and the log's copying too.
    assert store._db.execute("PRAGMA cache_size").fetchone() == (cache_size,)
    assert store._db.execute("PRAGMA wal_autocheckpoint").fetchone() == (1000,)
    store.close()


def test_a_rebuilt_view_stays_in_the_log_until_checkpointed_and_is_read_from_it(
    path: Path,
) -> None:
    store = SQLiteTaskStore(path)
    # More than the 1,000 pages of log after which SQLite copies it at a commit by itself.
    tasks = [compacted(make_task(f"site-{i}")) for i in range(6_000)]
    store.replace_view([ViewWrite(t, True, 0, n) for n, t in enumerate(tasks)], {})
    log = Path(f"{path}-wal")
    assert log.stat().st_size > 4_096 * 1_000
    assert path.stat().st_size < 4_096 * 100  # the file: not yet
    with sqlite3.connect(path) as reader:  # another connection finds every row in the log
        assert reader.execute("SELECT count(*) FROM tasks").fetchone() == (6_000,)

    store.checkpoint()
    assert log.stat().st_size == 0
    assert path.stat().st_size > 4_096 * 1_000
    with sqlite3.connect(path) as reader:
        assert reader.execute("SELECT count(*) FROM tasks").fetchone() == (6_000,)
    assert len(store.load(NOW)) == 6_000
    store.close()


def test_an_abandoned_or_failed_rebuild_leaves_the_view_as_it_was(path: Path) -> None:
    store = SQLiteTaskStore(path)
    kept = make_task("kept")
    store.insert(kept)
    abandoned = store.rebuild_view()
    abandoned.add([ViewWrite(make_task("never"), True, 0, 0)])
    abandoned.abandon()
    assert store.load(NOW) == [kept]

    with store._lock:  # a row SQLite refuses, in the middle of the rebuild
        store._db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON tasks WHEN NEW.name = 'refused'"
            " BEGIN SELECT RAISE(ABORT, 'refused by a trigger'); END"
        )
    failed = store.rebuild_view()
    failed.add([ViewWrite(make_task("fine"), True, 0, 0)])
    failed.add([ViewWrite(make_task("refused"), True, 0, 1)])
    failed.add([ViewWrite(make_task("after"), True, 0, 2)])
    with pytest.raises(StoreError, match="refused by a trigger"):
        failed.finish({("tasks", 0): 3})

    assert store.load(NOW) == [kept]
    assert store.topic_offsets("tasks") == {}
    store.insert(make_task("still-writable"))
    store.close()


def test_a_removal_is_remembered_until_its_tombstone_is_published(path: Path) -> None:
    store = SQLiteTaskStore(path)
    task, other = make_task("a"), make_task("b")
    store.insert(task)
    store.insert(other)
    assert store.delete(task.id, remember=True)
    assert store.delete(other.id)  # not remembered: nothing publishes it
    store.close()
    store = SQLiteTaskStore(path)
    assert store.pending_removals() == [task.id]
    store.removals_published([task.id])
    assert store.pending_removals() == []
    store.close()


def test_a_task_from_a_record_that_did_not_validate_keeps_its_reason_at_load(path: Path) -> None:
    store = SQLiteTaskStore(path)
    bad = invalid_record_task("ftp://x/", 30.0)
    store.apply(ViewBatch(upserts=[ViewWrite(bad, True, 0, 0)]))
    store.close()
    store = SQLiteTaskStore(path)
    (loaded,) = store.load(NOW + timedelta(hours=1))
    assert loaded.status_reason == bad.status_reason
    assert loaded.updated_at == NOW  # not rewritten, so not published again
    store.close()
