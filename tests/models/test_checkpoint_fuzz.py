"""Damaged checkpoint headers: every one loads or is refused with a CheckpointError that
names the file, in bounded time and memory; never another exception, never a hang.

Real small checkpoints of each kind have their header JSON mutated (types swapped, lists
for objects, huge, zero and negative numbers, missing and extra keys, another kind) or
their tensors changed (dropped, added, reshaped, of another dtype), are written with
safetensors and loaded in a worker process that has a memory limit, under a hard time
limit per load.
"""

from __future__ import annotations

import collections
import json
import math
import os
import select
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from napari_slide_attention.models.checkpoint import CheckpointError, read_checkpoint
from tiny_models import TINY_HARD

pytestmark = pytest.mark.slow

# Generous: a load of the largest of these models takes about a second on a loaded
# 2-core machine; a header that makes the loader hang or allocate without bound is
# what this catches.
LOAD_TIMEOUT_S = 90
WORKER_MEMORY = 4 << 30

WORKER = textwrap.dedent(
    """
    import json, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory}))
    import torch
    torch.set_num_threads(1)
    from napari_slide_attention.models.checkpoint import CheckpointError, load_model
    print("ready", flush=True)
    for line in sys.stdin:
        path = line.strip()
        try:
            model, checkpoint = load_model(path)
            reply = {{"outcome": "ok", "kind": checkpoint.kind}}
        except CheckpointError as exc:
            reply = {{"outcome": "CheckpointError", "message": str(exc), "path": exc.path}}
        except BaseException as exc:
            reply = {{"outcome": "other", "message": f"{{type(exc).__name__}}: {{exc}}"}}
        del line
        print(json.dumps(reply), flush=True)
    """
).format(memory=WORKER_MEMORY)


class Worker:
    """A process that loads checkpoints one at a time; ``load`` waits a bounded time."""

    def __init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-c", WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self._line(300) == "ready"

    def _line(self, timeout: float) -> str:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            self.process.kill()
            pytest.fail(f"a checkpoint load took more than {timeout} s (hang?)")
        line = self.process.stdout.readline()
        if not line:
            pytest.fail(f"the loading process died (exit {self.process.wait()})")
        return line.strip()

    def load(self, path: Path) -> dict:
        self.process.stdin.write(f"{path}\n")
        self.process.stdin.flush()
        return json.loads(self._line(LOAD_TIMEOUT_S))

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def _models() -> dict[str, torch.nn.Module]:
    from napari_slide_attention.models.dual_attention import DualAttention, DualAttentionConfig
    from napari_slide_attention.models.grid_attention import GridAttention, GridAttentionConfig
    from napari_slide_attention.models.hard_attention import HardAttention, HardAttentionConfig

    torch.manual_seed(0)
    classes = ("normal", "tumour", "other")
    return {
        "grid-attention": GridAttention(
            GridAttentionConfig(classes=classes, n_maps=2, input_px=32, hidden=(8,))
        ),
        "dual-attention": DualAttention(
            DualAttentionConfig(
                classes=classes,
                n_tiles=2,
                tile_um=64.0,
                feature_px=32,
                feature_width=8,
                soft={"pool": 4, "layers": 2},
                hard=TINY_HARD,
            )
        ),
        "hard-attention": HardAttention(HardAttentionConfig(classes=classes, **TINY_HARD)),
    }


@pytest.fixture(scope="module")
def originals():
    """kind -> (metadata, tensors) of a real small checkpoint."""
    out = {}
    for kind, model in _models().items():
        metadata = {
            "format": "napari-slide-attention",
            "version": "1",
            "kind": kind,
            "config": json.dumps(model.config.to_dict()),
            "extra": json.dumps({"epoch": 3, "metrics": {"val_loss": 0.5}}),
        }
        out[kind] = (metadata, {k: v.clone() for k, v in model.state_dict().items()})
    return out


@pytest.fixture(scope="module")
def worker():
    process = Worker()
    yield process
    process.close()


@pytest.fixture(scope="module")
def outcomes():
    counts: collections.Counter = collections.Counter()
    yield counts
    print(f"\ncheckpoint fuzz outcomes: {dict(counts)}")


# -- mutations ----------------------------------------------------------------------------
JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, -1, 1, 2, 3, 7, 10**6, 10**12, 2**63, -(10**30), 10**400]),
    st.sampled_from([0.0, -1.5, 0.001, 1e-300, 1e300, math.inf, -math.inf, math.nan, 2.5]),
    st.text(max_size=8),
    st.builds(list),  # a new one each time: mutations add to objects in place
    st.builds(dict),
    st.lists(st.integers(-3, 5000), max_size=4),
    st.lists(st.text(max_size=3), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(-2, 9), max_size=3),
)


def _paths(value, prefix=()):
    """Every key path into a JSON value (objects and lists)."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def _set(root, path, value):
    if not path:
        return value
    node = root
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return root


def _delete(root, path):
    node = root
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return root


@st.composite
def mutated(draw, originals):
    """A kind and a damaged (metadata, tensors) pair of its checkpoint, with a note."""
    kind = draw(st.sampled_from(sorted(originals)))
    metadata, tensors = originals[kind]
    metadata, tensors = dict(metadata), dict(tensors)
    config = json.loads(metadata["config"])
    notes = []
    for _ in range(draw(st.integers(1, 3))):
        what = draw(
            st.sampled_from(
                ["set", "set", "set", "delete", "add", "scale", "metadata", "tensor", "extra"]
            )
        )
        paths = list(_paths(config))
        path = draw(st.sampled_from(paths))
        if what == "set":
            value = draw(JSON_VALUES)
            config = _set(config, path, value)
            notes.append(f"config{list(path)}={value!r}")
        elif what == "delete" and path:
            config = _delete(config, path)
            notes.append(f"del config{list(path)}")
        elif what == "add":
            dicts = [p for p in paths if isinstance(_get(config, p), dict)]
            if not dicts:
                continue
            where = draw(st.sampled_from(dicts))
            key = draw(st.sampled_from(["colour", "n_maps", "soft", "hard", "kind", "x" * 3]))
            value = draw(JSON_VALUES)
            _get(config, where)[key] = value
            notes.append(f"config{list(where)}[{key!r}]={value!r}")
        elif what == "scale":
            numbers = [
                p
                for p in paths
                if isinstance(_get(config, p), int | float)
                and not isinstance(_get(config, p), bool)
            ]
            if numbers:
                where = draw(st.sampled_from(numbers))
                factor = draw(st.sampled_from([0, -1, 2, 1000, 0.001, 10**9]))
                config = _set(config, where, _get(config, where) * factor)
                notes.append(f"config{list(where)}*={factor}")
        elif what == "metadata":
            key = draw(st.sampled_from(["kind", "version", "config", "extra", "format"]))
            choice = draw(
                st.sampled_from(["delete", "grid-attention", "dual-attention", "[1, 2]", "{"])
            )
            if choice == "delete":
                metadata.pop(key, None)
            else:
                metadata[key] = choice
            notes.append(f"metadata[{key!r}]={choice!r}")
        elif what == "extra":  # harmless: the extras are facts beside the model
            key = draw(st.sampled_from(["epoch", "metrics", "cohort", "settings"]))
            value = draw(JSON_VALUES)
            extra = json.loads(originals[kind][0]["extra"])
            metadata["extra"] = json.dumps({**extra, key: value})
            notes.append(f"extra[{key!r}]={value!r}")
        elif what == "tensor":
            name = draw(st.sampled_from(sorted(tensors)))
            change = draw(st.sampled_from(["drop", "add", "flatten", "double", "widen", "int"]))
            t = tensors[name]
            if change == "drop":
                del tensors[name]
            elif change == "add":
                tensors["extra.weight"] = torch.zeros(3)
            elif change == "flatten":
                tensors[name] = t.flatten().clone()
            elif change == "double":
                tensors[name] = t.double()
            elif change == "widen":
                tensors[name] = torch.cat([t, t]) if t.ndim else t.reshape(1)
            else:
                tensors[name] = t.to(torch.int32)
            notes.append(f"tensor {name}: {change}")
    if "config" in metadata and metadata["config"] == originals[kind][0]["config"]:
        metadata["config"] = json.dumps(config)
    return kind, metadata, tensors, "; ".join(notes)


def _get(root, path):
    for key in path:
        root = root[key]
    return root


def _write(path: Path, metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


def _check_outcome(path: Path, reply: dict, note: str) -> None:
    assert reply["outcome"] in ("ok", "CheckpointError"), f"{note}: {reply['message']}"
    if reply["outcome"] == "CheckpointError":
        message = reply["message"]
        assert message.startswith(f"{path}: ") and reply["path"] == str(path), (note, message)
        assert "\n" not in message, (note, message)


def test_damaged_headers_load_or_are_refused_naming_the_file(
    originals, worker, outcomes, tmp_path_factory
):
    folder = tmp_path_factory.mktemp("fuzz")

    @settings(
        max_examples=120,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=st.data())
    def check(data):
        _, metadata, tensors, note = data.draw(mutated(originals))
        path = _write(folder / "fuzzed.safetensors", metadata, tensors)
        # the header read (what a file picker does) never raises anything else either
        try:
            read_checkpoint(path, tensors=False)
        except CheckpointError as exc:
            assert str(exc).startswith(f"{path}: "), note
        reply = worker.load(path)
        outcomes[reply["outcome"]] += 1
        _check_outcome(path, reply, note)

    check()
    assert outcomes["CheckpointError"] > 0 and sum(outcomes.values()) >= 100


# -- the cases the issue names ------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "change", "named"),
    [
        ("grid-attention", {"tile_um": 0.001}, "tile_um"),
        ("grid-attention", {"input_px": 100000}, "input_px"),
        ("grid-attention", {"n_maps": 7}, "n_maps=7"),  # disagrees with its tensors
        ("grid-attention", {"n_maps": 10**9}, "n_maps"),
        ("grid-attention", {"classes": ["a", "b"]}, "classes"),  # 2 names, 3 outputs
        ("grid-attention", {"classes": "abc"}, "classes"),
        ("grid-attention", {"hidden": {"width": 8}}, "hidden"),
        ("dual-attention", {"hard": [1, 2]}, "hard"),
        ("dual-attention", {"soft": {"layers": 3}}, "soft"),
        ("dual-attention", {"hard": {**TINY_HARD, "glimpses": "6"}}, "hard: glimpses"),
        ("hard-attention", {"tile_px": 2**40}, "tile_px"),
        ("hard-attention", {"glimpse_channels": [2**20]}, "glimpse_channels"),
    ],
)
def test_the_issues_headers_are_refused_naming_the_setting(
    originals, worker, tmp_path, kind, change, named
):
    metadata, tensors = originals[kind]
    config = {**json.loads(metadata["config"]), **change}
    path = _write(tmp_path / "bad.safetensors", {**metadata, "config": json.dumps(config)}, tensors)
    reply = worker.load(path)
    assert reply["outcome"] == "CheckpointError", reply
    assert reply["message"].startswith(f"{path}: ") and named in reply["message"], reply


@pytest.mark.parametrize("config", ["[1, 2]", '"grid"', "3", "null"])
def test_a_config_that_is_not_an_object_is_refused(originals, worker, tmp_path, config):
    metadata, tensors = originals["grid-attention"]
    path = _write(tmp_path / "list.safetensors", {**metadata, "config": config}, tensors)
    reply = worker.load(path)
    assert reply["outcome"] == "CheckpointError" and "config" in reply["message"], reply


def test_unchanged_checkpoints_load(originals, worker, tmp_path):
    for kind, (metadata, tensors) in originals.items():
        reply = worker.load(_write(tmp_path / f"{kind}.safetensors", metadata, tensors))
        assert reply == {"outcome": "ok", "kind": kind}
