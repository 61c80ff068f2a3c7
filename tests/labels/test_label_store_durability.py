"""The label store loses nothing, provably: a reviewer's process killed with SIGKILL at
random moments loses no change it reported saved, and two processes writing at once (the
review panel and a ``labels import``) both succeed with every change kept."""

from __future__ import annotations

import itertools
import json
import os
import queue
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from napari_slide_attention.labels import LabelStore, RegionNotFoundError

WRITER = Path(__file__).with_name("label_writer.py")
CHANGES = 1000
MIN_KILLS = 10
RUN_TIMEOUT_S = 300  # one writer run: a hang fails the test instead of stalling it


def _start_writer(
    store: Path, seed: int, author: str = "writer"
) -> tuple[subprocess.Popen, queue.Queue]:
    proc = subprocess.Popen(
        [sys.executable, str(WRITER), str(store), str(seed), author],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)  # end of output: the process is gone

    threading.Thread(target=read, daemon=True).start()
    return proc, lines


def _integrity(path: Path) -> list[str]:
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return [row[0] for row in conn.execute("PRAGMA integrity_check")]
    finally:
        conn.close()


def _check_states(store: LabelStore) -> None:
    """Each target's current state is the new state of its latest change."""
    latest = {}
    for change in store.history():
        latest[(change.slide, change.target)] = change.new
    for (slide, target), new in latest.items():
        if target == "slide_label":
            label = store.slide_label(slide)
            got = (
                None
                if label is None
                else {k: getattr(label, k) for k in ("label", "status", "author", "time", "note")}
            )
        elif target == "note":
            text = store.note(slide)
            got = text or None
            new = None if new is None else new["text"]
        else:
            try:
                region = store.region(int(target.split(":")[1]))
            except RegionNotFoundError:
                got = None
            else:
                got = {
                    "label": region.label,
                    "geometry": [list(v) for v in region.geometry],
                    "kind": region.kind,
                    "author": region.author,
                    "time": region.time,
                    "note": region.note,
                }
        assert got == new, (slide, target)


@pytest.mark.slow
def test_no_reported_change_is_lost_when_the_writer_is_killed_at_random(tmp_path):
    store_path = tmp_path / "cohort.labels.sqlite"
    rng = random.Random(20261208)
    reported: dict[int, dict] = {}
    kills = runs = 0
    while len(reported) < CHANGES or kills < MIN_KILLS:  # a fast writer: more changes
        proc, lines = _start_writer(store_path, seed=15)
        runs += 1
        # a kill after a random number of reported changes, or (one run in four) at a
        # random moment from the start, which may fall while the store is opened or
        # created
        after_lines = rng.randint(1, 100) if rng.random() < 0.75 else None
        deadline = time.monotonic() + (rng.uniform(0.0, 1.5) if after_lines is None else 1e9)
        hard_stop = time.monotonic() + RUN_TIMEOUT_S
        seen, ended = 0, False
        while time.monotonic() < deadline and (after_lines is None or seen < after_lines):
            try:
                line = lines.get(timeout=max(0.0, min(0.05, deadline - time.monotonic())))
            except queue.Empty:
                assert time.monotonic() < hard_stop, "the writer hangs"
                continue
            if line is None:
                ended = True
                break
            change = json.loads(line)
            assert change["n"] not in reported or reported[change["n"]] == change
            reported[change["n"]] = change
            seen += 1
        assert not ended, proc.stderr.read()  # it dies only when killed
        time.sleep(rng.uniform(0.0, 0.02))  # between two changes, or inside one
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stderr.close()
        kills += 1
        # what it printed before the kill was reported too
        while (line := lines.get(timeout=60)) is not None:
            change = json.loads(line)
            reported[change["n"]] = change
    print(f"\n{runs} writer runs, {kills} SIGKILLs, {len(reported)} changes reported")

    assert kills >= MIN_KILLS
    assert _integrity(store_path) == ["ok"]
    with LabelStore(store_path, read_only=True) as store:
        history = store.history()
        # every change the store holds is change n of the sequence (id n + 1): a restart
        # neither lost nor repeated one, so each reported change is where it was reported
        assert [c.id for c in history] == list(range(1, len(history) + 1))
        by_id = {c.id: c for c in history}
        for n, change in reported.items():
            stored = by_id[change["id"]]
            assert change["id"] == n + 1
            assert (stored.slide, stored.target, stored.action) == (
                change["slide"],
                change["target"],
                change["action"],
            )
            assert stored.new == change["new"]
        unreported = len(history) - len(reported)
        print(f"{len(history)} changes stored, {unreported} committed but not yet reported")
        assert 0 <= unreported <= kills  # at most the one change in flight per kill
        undos = [c for c in history if c.action == "undo"]
        assert undos and all(by_id[c.undoes].undone_by == c.id for c in undos)
        assert {c.target.split(":")[0] for c in history} == {"slide_label", "note", "region"}
        _check_states(store)


def _geojson(path: Path, round_: int) -> None:
    features = []
    for k in range(2):
        x = 1000 * round_ + 300 * k
        ring = [[x, 0], [x + 200, 0], [x + 200, 100], [x, 100], [x, 0]]
        features.append(
            {
                "type": "Feature",
                "id": f"00000000-0000-4000-8000-{round_:06d}{k:06d}",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"classification": {"name": "carcinoma"}},
            }
        )
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))


_CLI_IMPORTER = """
import sys, time
from pathlib import Path
from napari_slide_attention.cli import main
store, folder, slide, rounds, started, done = sys.argv[1:]
while not Path(started).exists():  # the panel has saved its first change
    time.sleep(0.001)
for r in range(int(rounds)):
    args = ["labels", "import", "--store", store, "--geojson", f"{folder}/{r}.geojson"]
    status = main([*args, "--slide", slide, "--author", "cli"])
    if status != 0:
        sys.exit(f"import {r} ended with {status}")
    print("imported", r, flush=True)
Path(done).touch()
"""

# the review panel's writes: a region or a slide label every few milliseconds, from before
# the first import until after the last
_PANEL_WRITER = """
import sys, time
from pathlib import Path
from napari_slide_attention.labels import LabelStore
store_path, slide, started, done = sys.argv[1:]
with LabelStore(store_path, author="panel") as store:
    i, last = 0, False
    while not last:
        last = Path(done).exists()
        if i % 2:
            store.set_slide_label(slide, ["benign", "carcinoma"][i % 4 // 2], note=f"{i}")
        else:
            store.add_region(slide, [(i, 0), (i + 9, 0), (i, 9)], "benign", note=f"{i}")
        print(i, flush=True)
        Path(started).touch()
        i += 1
        time.sleep(0.005)
"""


@pytest.mark.slow
def test_the_panel_and_a_cli_import_write_at_once_and_both_succeed(tmp_path):
    store_path = tmp_path / "cohort.labels.sqlite"
    rounds = 25
    for r in range(rounds):
        _geojson(tmp_path / f"{r}.geojson", r)
    started, done = tmp_path / "started", tmp_path / "done"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _PANEL_WRITER,
                str(store_path),
                "/slides/a.tif",
                str(started),
                str(done),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        ),
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _CLI_IMPORTER,
                str(store_path),
                str(tmp_path),
                "/slides/b.tif",
                str(rounds),
                str(started),
                str(done),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        ),
    ]
    try:
        outputs = [proc.communicate(timeout=600) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    panel_changes = len(outputs[0][0].split())
    assert outputs[1][0].count("imported ") == rounds

    assert _integrity(store_path) == ["ok"]
    with LabelStore(store_path, read_only=True) as store:
        history = store.history()
        authors = [c.author for c in history]
        assert authors.count("panel") == panel_changes
        assert authors.count("cli") == 2 * rounds
        # both wrote at once: the panel before, between and after the imports
        switches = sum(a != b for a, b in itertools.pairwise(authors))
        print(f"\n{panel_changes} panel changes, {rounds} imports, {switches} switches")
        assert authors[0] == authors[-1] == "panel" and switches >= 2
        imported = store.regions("/slides/b.tif")
        assert len(imported) == 2 * rounds and {r.author for r in imported} == {"cli"}
        assert len(store.regions("/slides/a.tif")) == (panel_changes + 1) // 2
        assert store.slide_label("/slides/a.tif").note == str(panel_changes - 1 - panel_changes % 2)


_CREATOR = """
import sys, time
from pathlib import Path
from napari_slide_attention.labels import LabelStore
folder, who, go = sys.argv[1:]
for i in range(20):
    while not Path(f"{go}{i}").exists():
        time.sleep(0.001)
    with LabelStore(Path(folder) / f"{i}.labels.sqlite", author=who) as store:
        store.set_slide_label("/slides/a.tif", who)
        print(i, store.created, flush=True)
"""


@pytest.mark.slow
def test_two_processes_creating_one_store_at_once_both_write_to_it(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CREATOR, str(tmp_path), who, str(tmp_path / "go")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for who in ("ann", "bob")
    ]
    time.sleep(1.0)  # both are past their imports
    try:
        for i in range(20):
            (tmp_path / f"go{i}").touch()  # both open the missing store at once
            time.sleep(0.05)
        outputs = [proc.communicate(timeout=300) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    created = [line.split()[1] for out, _ in outputs for line in out.splitlines()]
    assert len(created) == 40 and created.count("True") == 20  # one creator per store
    for i in range(20):
        path = tmp_path / f"{i}.labels.sqlite"
        assert _integrity(path) == ["ok"]
        with LabelStore(path, read_only=True) as store:
            assert sorted(c.author for c in store.history()) == ["ann", "bob"]
    # no temporary store left behind by the creator that lost a race
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".new")]
