"""Checkpoints: safetensors + JSON header, atomic writes, model rebuild, training state."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from napari_slide_attention.models import checkpoint as ckpt
from napari_slide_attention.models.checkpoint import (
    CHECKPOINT_VERSION,
    CheckpointError,
    load_model,
    read_checkpoint,
    save_checkpoint,
)
from napari_slide_attention.models.grid_attention import (
    MODEL_KIND,
    GridAttention,
    GridAttentionConfig,
)
from napari_slide_attention.models.training_state import (
    load_training_state,
    save_training_state,
)

CONFIG = {"classes": ["a", "b"], "n_maps": 2, "mean": [0.1, 0.2, 0.3], "nested": {"x": None}}
EXTRA = {"epoch": 4, "metrics": {"auc": 0.875}, "cohort": "train-1"}


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(3, 4, generator=g),
        "b": torch.randn(4, generator=g).to(torch.float16),
        "count": torch.arange(5),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
    }


def _small_file(tmp_path, name: str = "small"):
    return save_checkpoint(tmp_path / name, "toy", CONFIG, _tensors(), EXTRA)


# -- writing and reading ------------------------------------------------------------------
def test_round_trip_keeps_kind_config_extra_and_tensors(tmp_path):
    path = _small_file(tmp_path)
    assert path == tmp_path / "small.safetensors"
    loaded = read_checkpoint(path)
    assert loaded.path == path
    assert loaded.kind == "toy"
    assert loaded.config == CONFIG and loaded.extra == EXTRA
    assert loaded.version == CHECKPOINT_VERSION
    expected = _tensors()
    assert loaded.tensors.keys() == expected.keys()
    for name, tensor in expected.items():
        assert loaded.tensors[name].dtype == tensor.dtype
        assert torch.equal(loaded.tensors[name], tensor), name
    header = read_checkpoint(path, tensors=False)  # what a file picker reads
    assert (header.kind, header.config, header.extra) == ("toy", CONFIG, EXTRA)
    assert header.tensors == {}


def test_file_is_plain_safetensors_with_json_metadata(tmp_path):
    # Other tools must be able to read it: the header is ordinary safetensors metadata.
    path = _small_file(tmp_path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        assert sorted(handle.keys()) == sorted(_tensors())
        assert torch.equal(handle.get_tensor("w"), _tensors()["w"])
    assert metadata["format"] == "napari-slide-attention"
    assert metadata["version"] == str(CHECKPOINT_VERSION)
    assert metadata["kind"] == "toy"
    assert json.loads(metadata["config"]) == CONFIG
    assert json.loads(metadata["extra"]) == EXTRA


@pytest.mark.parametrize(
    ("name", "written"),
    [
        ("model", "model.safetensors"),
        ("model.v2", "model.v2.safetensors"),  # a dot in the name is not a suffix to replace
        ("model.pt", "model.pt.safetensors"),
        ("model.safetensors", "model.safetensors"),
    ],
)
def test_safetensors_suffix_is_appended_when_missing(tmp_path, name, written):
    path = save_checkpoint(tmp_path / "sub" / name, "toy", CONFIG, _tensors())
    assert path == tmp_path / "sub" / written  # parent folders are created
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == [written]
    assert read_checkpoint(path).extra == {}


def test_tensors_sharing_memory_and_views_are_saved(tmp_path):
    # Tied weights and non-contiguous views would make safetensors refuse the dict.
    base = torch.randn(4, 6)
    path = save_checkpoint(
        tmp_path / "tied", "toy", {}, {"a": base, "a_tied": base, "t": base.t(), "row": base[1]}
    )
    tensors = read_checkpoint(path).tensors
    assert torch.equal(tensors["a_tied"], base) and torch.equal(tensors["t"], base.t())
    assert torch.equal(tensors["row"], base[1])


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_write_keeps_the_previous_checkpoint_and_leaves_no_temp_file(
    tmp_path, monkeypatch, error
):
    path = _small_file(tmp_path)
    before = path.read_bytes()

    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:  # some bytes reach the disk, then it fails
            handle.write(b"\x00" * 100)
        raise error

    monkeypatch.setattr(ckpt, "save_file", half_write)
    with pytest.raises(type(error)):
        save_checkpoint(path, "toy", {"new": True}, {"w": torch.zeros(2)})

    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    monkeypatch.undo()
    assert read_checkpoint(path).config == CONFIG


# -- load_model ---------------------------------------------------------------------------
def _grid_model() -> GridAttention:
    torch.manual_seed(3)
    model = GridAttention(GridAttentionConfig(classes=("a", "b", "c"), n_maps=4, input_px=32))
    model.set_normalisation((0.6, 0.5, 0.4), (0.2, 0.3, 0.25))
    with torch.no_grad():  # running statistics away from 0/1, so buffers must load too
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        model.attention.bias.normal_()
    return model.eval()


def _grid_input():
    g = torch.Generator().manual_seed(1)
    tiles = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8, generator=g)
    return tiles, torch.tensor([0, 1, 3, 4, 8]), (3, 3)


@pytest.fixture(scope="module")
def grid_checkpoint(tmp_path_factory):
    model = _grid_model()
    path = save_checkpoint(
        tmp_path_factory.mktemp("grid") / "grid",
        MODEL_KIND,
        model.config.to_dict(),
        model.state_dict(),
        {"epoch": 2},
    )
    return model, path


@torch.no_grad()
def test_load_model_rebuilds_an_equal_grid_attention_in_eval_mode(grid_checkpoint):
    original, path = grid_checkpoint
    model, checkpoint = load_model(path)
    assert isinstance(model, GridAttention)
    assert not model.training and not any(m.training for m in model.modules())
    assert model.config == original.config
    assert model.config.classes == ("a", "b", "c") and model.config.mean == (0.6, 0.5, 0.4)
    assert checkpoint.kind == MODEL_KIND and checkpoint.extra == {"epoch": 2}
    ours, theirs = model.state_dict(), original.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    a, b = model(*_grid_input()), original(*_grid_input())
    assert torch.equal(a.logits, b.logits) and torch.equal(a.maps, b.maps)
    # trainable parts still train after loading (freezing is rebuilt from the config)
    assert not any(p.requires_grad for p in model.trunk.layer3.parameters())
    assert all(p.requires_grad for p in model.trunk.layer4.parameters())


def test_weights_that_do_not_fit_the_config_raise(tmp_path, grid_checkpoint):
    _, path = grid_checkpoint
    good = read_checkpoint(path)
    bad = save_checkpoint(tmp_path / "maps", MODEL_KIND, {**good.config, "n_maps": 5}, good.tensors)
    with pytest.raises(CheckpointError, match="does not fit a grid-attention model") as info:
        load_model(bad)
    assert str(bad) in str(info.value)

    # strict: one tensor too few is as bad as a wrong shape
    tensors = {k: v for k, v in good.tensors.items() if k != "attention.bias"}
    short = save_checkpoint(tmp_path / "short", MODEL_KIND, good.config, tensors)
    with pytest.raises(CheckpointError, match=r"attention\.bias"):
        load_model(short)

    odd = {**good.config, "colour": "red"}
    setting = save_checkpoint(tmp_path / "setting", MODEL_KIND, odd, {"w": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="unknown grid-attention settings: colour"):
        load_model(setting)


def test_unknown_kind_raises(tmp_path):
    path = save_checkpoint(tmp_path / "odd", "mystery-net", {}, {"w": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="unknown model kind 'mystery-net'") as info:
        load_model(path)
    assert MODEL_KIND in str(info.value)  # lists the kinds it knows


# -- unreadable files ---------------------------------------------------------------------
def test_missing_file_raises(tmp_path):
    for path, problem in [(tmp_path / "absent.safetensors", "no such file"), (tmp_path, "a file")]:
        with pytest.raises(CheckpointError) as info:
            read_checkpoint(path)
        assert str(path) in str(info.value) and problem in str(info.value)
        assert info.value.path == str(path)


def test_plain_safetensors_without_our_header_raises(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="header") as info:
        read_checkpoint(path)
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError, match="header"):
        load_model(path)


@pytest.mark.parametrize("version", ["99", "2", "0", "x"])
def test_other_format_versions_raise(tmp_path, version):
    path = tmp_path / f"v{version}.safetensors"
    header = {"format": "napari-slide-attention", "version": version, "kind": MODEL_KIND}
    save_file({"w": torch.zeros(2)}, str(path), metadata={**header, "config": "{}"})
    with pytest.raises(CheckpointError, match="reads versions 1 to 1") as info:
        read_checkpoint(path)
    assert repr(version) in str(info.value) and str(path) in str(info.value)
    if version in ("99", "2"):  # written by a newer release
        assert "upgrade" in str(info.value)


def test_damaged_header_raises(tmp_path):
    path = tmp_path / "damaged.safetensors"
    header = {"format": "napari-slide-attention", "version": "1", "kind": "toy"}
    save_file({"w": torch.zeros(2)}, str(path), metadata={**header, "config": "{not json"})
    with pytest.raises(CheckpointError, match="damaged header"):
        read_checkpoint(path)
    save_file({"w": torch.zeros(2)}, str(path), metadata=header)  # no config at all
    with pytest.raises(CheckpointError, match="damaged header"):
        read_checkpoint(path)


def test_a_config_that_is_not_an_object_is_a_damaged_header(tmp_path):
    path = tmp_path / "list.safetensors"
    header = {"format": "napari-slide-attention", "version": "1", "kind": "grid-attention"}
    save_file({"w": torch.zeros(2)}, str(path), metadata={**header, "config": "[1, 2]"})
    for tensors in (True, False):
        with pytest.raises(CheckpointError, match="damaged header"):
            read_checkpoint(path, tensors=tensors)


def test_header_read_alone_gives_kind_and_config_without_weights(grid_checkpoint):
    _, path = grid_checkpoint
    header = read_checkpoint(path, tensors=False)
    full = read_checkpoint(path)
    assert header.kind == full.kind == "grid-attention"
    assert header.config == full.config and header.extra == full.extra
    assert header.tensors == {} and full.tensors


def test_a_header_length_past_the_end_of_the_file_is_refused(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="does not fit the file") as info:
        read_checkpoint(path, tensors=False)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("keep", [-1, -17, 12, 0])
def test_truncated_or_empty_file_raises_naming_it(tmp_path, keep):
    path = _small_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match="not a readable safetensors") as info:
        read_checkpoint(path)
    assert str(path) in str(info.value)


def test_garbage_file_raises(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    assert str(path) in str(info.value)


# -- training state -----------------------------------------------------------------------
class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(4, 8)
        self.out = nn.Linear(8, 2)
        self.unused = nn.Linear(2, 2)  # never gets a gradient, so Adam keeps no state for it

    def forward(self, x):
        return self.out(torch.relu(self.hidden(x)))


def _adam(model: nn.Module, **kw) -> tuple[nn.Module, torch.optim.Adam]:
    groups = [
        {"params": model.hidden.parameters(), "lr": 0.01},
        {"params": [*model.out.parameters(), *model.unused.parameters()]},
    ]
    return model, torch.optim.Adam(groups, **kw)


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(6, 4, generator=g), torch.randn(6, 2, generator=g)
    optimizer.zero_grad()
    F.mse_loss(model(x), y).backward()
    optimizer.step()


def test_training_state_round_trip_resumes_adam_exactly(tmp_path):
    torch.manual_seed(0)
    model, optimizer = _adam(_Toy(), lr=0.003, betas=(0.8, 0.95), weight_decay=0.1, amsgrad=True)
    for seed in range(3):
        _step(model, optimizer, seed)
    loop = {"epoch": 3, "step": 30, "best_auc": 0.75, "history": [0.5, 0.625], "note": None}
    path = save_training_state(tmp_path / "resume.safetensors", optimizer, loop)

    fresh = copy.deepcopy(model)
    _, resumed = _adam(fresh)  # default hyperparameters: they must come from the file
    assert load_training_state(path, resumed) == loop

    want, got = optimizer.state_dict(), resumed.state_dict()
    assert got["param_groups"] == want["param_groups"]
    assert [group["lr"] for group in got["param_groups"]] == [0.01, 0.003]
    for group in got["param_groups"]:
        assert group["betas"] == (0.8, 0.95) and isinstance(group["betas"], tuple)
        assert group["amsgrad"] is True and group["weight_decay"] == 0.1
    assert sorted(got["state"]) == sorted(want["state"]) == [0, 1, 2, 3]
    for index, values in want["state"].items():
        assert got["state"][index].keys() == values.keys()
        for key, value in values.items():
            assert got["state"][index][key].dtype == value.dtype
            assert torch.equal(got["state"][index][key], value), (index, key)

    # one more step on both: bit-identical parameters
    _step(model, optimizer, 10)
    _step(fresh, resumed, 10)
    for (name, a), b in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_training_state_of_an_unstepped_optimiser(tmp_path):
    _, optimizer = _adam(_Toy())
    path = save_training_state(tmp_path / "start.safetensors", optimizer, {"epoch": 0})
    _, resumed = _adam(_Toy(), lr=0.5)
    assert load_training_state(path, resumed) == {"epoch": 0}
    assert resumed.state_dict() == optimizer.state_dict()


def test_training_state_errors(tmp_path, grid_checkpoint):
    _, grid_path = grid_checkpoint
    _, optimizer = _adam(_Toy())
    with pytest.raises(CheckpointError, match="not a training state"):
        load_training_state(grid_path, optimizer)

    model, optimizer = _adam(_Toy())
    _step(model, optimizer, 0)
    path = save_training_state(tmp_path / "opt.safetensors", optimizer, {})
    other = torch.optim.Adam(nn.Linear(3, 3).parameters())  # one group, two parameters
    with pytest.raises(CheckpointError, match="does not fit this optimiser") as info:
        load_training_state(path, other)
    assert str(path) in str(info.value)


class _CountingSGD(torch.optim.SGD):
    """SGD that also keeps plain-number state per parameter (like older optimisers' step)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    state = self.state[p]
                    state["visits"] = state.get("visits", 0) + 1
                    state["scale"] = 0.5 * state["visits"]
        return loss


def test_training_state_keeps_plain_number_state(tmp_path):
    model = _Toy()
    optimizer = _CountingSGD(model.parameters(), lr=0.1, momentum=0.9)
    for seed in range(2):
        _step(model, optimizer, seed)
    path = save_training_state(tmp_path / "sgd.safetensors", optimizer, {"epoch": 1})
    resumed = _CountingSGD(copy.deepcopy(model).parameters(), lr=0.1, momentum=0.9)
    load_training_state(path, resumed)
    got = resumed.state_dict()["state"]
    assert {k: (v["visits"], v["scale"]) for k, v in got.items()} == {i: (2, 1.0) for i in range(4)}
    for index, values in optimizer.state_dict()["state"].items():
        assert torch.equal(got[index]["momentum_buffer"], values["momentum_buffer"])


# -- files --------------------------------------------------------------------------------
def test_checkpoints_and_their_copies_get_the_mode_of_an_ordinary_file(tmp_path):
    from napari_slide_attention.files import atomic_copy, atomic_write_text

    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    path = _small_file(tmp_path)
    copy = atomic_copy(path, tmp_path / "copy.safetensors")
    text = atomic_write_text(tmp_path / "log.json", "[]")
    _, optimizer = _adam(_Toy())
    state = save_training_state(tmp_path / "state.safetensors", optimizer, {"epoch": 0})
    modes = {p.stat().st_mode & 0o777 for p in (path, copy, text, state)}
    assert modes == {plain.stat().st_mode & 0o777}
    assert copy.read_bytes() == path.read_bytes() and text.read_text() == "[]"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "copy.safetensors",
        "log.json",
        "plain",
        "small.safetensors",
        "state.safetensors",
    ]
