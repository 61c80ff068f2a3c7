"""Pre-activation ResNet-18 trunk: architecture, and loading local weights files by name."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from napari_slide_attention.models.preact_resnet import (
    BLOCK_NAMES,
    PreActBlock,
    WeightsError,
    load_weights,
    preact_resnet18,
    read_state_dict,
)

# Set by _Payload's unpickling; must stay empty: loading weights never runs pickled code.
_RAN: list[str] = []


def _mark(text: str) -> str:
    _RAN.append(text)
    return text


class _Payload:
    """An object whose unpickling would call ``_mark`` (stands in for malicious code)."""

    def __reduce__(self):
        return (_mark, ("unpickled",))


def _net(seed: int) -> nn.Module:
    """A ResNet-18 with random BN statistics and affine terms, so BN is never an identity."""
    torch.manual_seed(seed)
    net = preact_resnet18()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(seed + 1)
    return net.eval()


@pytest.fixture(scope="module")
def source() -> nn.Module:
    """The network whose weights go into files (read-only: built once per module)."""
    return _net(1)


@pytest.fixture(scope="module")
def _pristine_target() -> nn.Module:
    return _net(2)


@pytest.fixture
def target(_pristine_target) -> nn.Module:
    """A differently initialised network to load into (a fresh copy per test)."""
    return copy.deepcopy(_pristine_target)


def _images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(5))


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- architecture -------------------------------------------------------------------------
@torch.no_grad()
def test_maps_images_to_512_features_at_224_and_64_px():
    net = preact_resnet18().eval()
    assert net.n_features == 512
    assert net(torch.randn(2, 3, 224, 224)).shape == (2, 512)
    assert net(torch.randn(3, 3, 64, 64)).shape == (3, 512)


def test_parameter_count_is_a_preact_resnet18_trunk():
    # Counted from the architecture, not from the code: 7x7 stem (no stem BN in the
    # pre-activation design), per basic block BN(in)-conv3x3-BN(out)-conv3x3 plus a 1x1
    # projection where width or stride change, and the final BN before pooling.
    def bn(c):
        return 2 * c  # weight and bias (running statistics are buffers)

    expected = 7 * 7 * 3 * 64
    channels = 64
    for stage, width in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            expected += bn(channels) + 9 * channels * width + bn(width) + 9 * width * width
            if stride != 1 or channels != width:
                expected += channels * width
            channels = width
    expected += bn(512)
    net = preact_resnet18()
    assert sum(p.numel() for p in net.parameters()) == expected
    assert 11.1e6 < expected < 11.2e6  # ~11.17 M, ResNet-18 less its 513k classifier
    # no classifier: the trunk ends at pooled features
    assert not any(isinstance(m, nn.Linear) for m in net.modules())


@torch.no_grad()
def test_stages_run_in_order_with_resnet_strides_and_widths():
    net = preact_resnet18().eval()
    assert BLOCK_NAMES == ("stem", "layer1", "layer2", "layer3", "layer4")
    assert net.block_names == BLOCK_NAMES
    assert [name for name, _ in net.stages()] == list(BLOCK_NAMES)
    seen: list[tuple[str, tuple[int, ...]]] = []
    for name, stage in net.stages():
        stage.register_forward_hook(
            lambda _m, _i, out, name=name: seen.append((name, tuple(out.shape)))
        )
    x = _images(1, 64)
    features = net(x)
    # stem: 7x7/2 conv + 3x3/2 max-pool (/4); layer2..4 halve again
    assert seen == [
        ("stem", (1, 64, 16, 16)),
        ("layer1", (1, 64, 16, 16)),
        ("layer2", (1, 128, 8, 8)),
        ("layer3", (1, 256, 4, 4)),
        ("layer4", (1, 512, 2, 2)),
    ]
    # forward = stages in order, then the final BN-ReLU and global average pooling
    h = x
    for _, stage in net.stages():
        h = stage(h)
    torch.testing.assert_close(features, torch.relu(net.final_bn(h)).mean(dim=(2, 3)))


def _bn(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


@torch.no_grad()
def test_blocks_are_preactivation_residuals(source):
    """Out = conv(relu(bn(conv(relu(bn(x)))))) + shortcut, with no ReLU after the sum."""
    net = source
    x = torch.randn(2, 64, 8, 8, generator=torch.Generator().manual_seed(2))

    identity_block = net.layer1[0]
    assert isinstance(identity_block, PreActBlock) and identity_block.shortcut is None
    a = torch.relu(_bn(x, identity_block.bn1))
    path = F.conv2d(a, identity_block.conv1.weight, padding=1)
    path = F.conv2d(
        torch.relu(_bn(path, identity_block.bn2)), identity_block.conv2.weight, padding=1
    )
    out = identity_block(x)
    torch.testing.assert_close(out, path + x)  # identity: the raw input, not its activation
    assert (out < 0).any()  # no ReLU after the addition

    # A downsampling block projects the *pre-activated* input with a strided 1x1 conv.
    down = net.layer2[0]
    assert down.shortcut is not None and down.shortcut.stride == (2, 2)
    a = torch.relu(_bn(x, down.bn1))
    path = F.conv2d(a, down.conv1.weight, stride=2, padding=1)
    path = F.conv2d(torch.relu(_bn(path, down.bn2)), down.conv2.weight, padding=1)
    torch.testing.assert_close(down(x), path + F.conv2d(a, down.shortcut.weight, stride=2))


# -- load_weights -------------------------------------------------------------------------
def test_safetensors_with_wrapper_prefix_loads_every_tensor(tmp_path, source, target):
    x = _images()
    assert not torch.equal(source(x), target(x))
    path = tmp_path / "trunk.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in source.state_dict().items()}, path)

    report = load_weights(target, path)

    assert report.loaded == sorted(target.state_dict())  # buffers included
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert _same_state(source, target)
    with torch.no_grad():
        assert torch.equal(source(x), target(x))


@pytest.mark.parametrize("nested", [False, True])
def test_torch_state_dict_file_loads(tmp_path, source, target, nested):
    state = source.state_dict()
    path = tmp_path / "trunk.pt"
    # training checkpoints often keep the weights under "state_dict" beside other facts
    torch.save({"state_dict": state, "epoch": 7} if nested else state, path)
    report = load_weights(target, path)
    assert report.missing == [] and len(report.loaded) == len(state)
    assert _same_state(source, target)


@pytest.mark.parametrize(
    "payload",
    [_Payload(), {"weight": torch.ones(2), "extra": _Payload()}],
    ids=["object", "dict-with-object"],
)
def test_pickled_objects_are_refused_without_running_them(tmp_path, target, payload):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:  # torch.save's own format, with an object inside
        torch.save(payload, handle)
    # a plain pickle of the same object would run _mark: the guard below is meaningful
    assert pickle.loads(pickle.dumps(_Payload())) == "unpickled"
    _RAN.clear()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(WeightsError) as info:
        load_weights(target, path)
    assert _RAN == []
    assert str(path) in str(info.value)
    assert "_mark" in str(info.value)  # names what was refused
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_classifier_is_unexpected_and_wrong_shapes_are_skipped(tmp_path, source, target):
    state = dict(source.state_dict())
    state["fc.weight"] = torch.randn(1000, 512)
    state["fc.bias"] = torch.randn(1000)
    state["layer1.0.conv1.weight"] = torch.randn(64, 64, 1, 1)  # wrong kernel size
    kept = target.layer1[0].conv1.weight.detach().clone()
    path = tmp_path / "resnet.safetensors"
    save_file(state, path)

    report = load_weights(target, path)

    assert sorted(report.unexpected) == ["fc.bias", "fc.weight"]
    assert report.mismatched == ["layer1.0.conv1.weight: (64, 64, 1, 1) vs (64, 64, 3, 3)"]
    assert report.missing == ["layer1.0.conv1.weight"]  # skipped, so not loaded
    assert len(report.loaded) == len(target.state_dict()) - 1
    assert torch.equal(target.layer1[0].conv1.weight, kept)  # network keeps its own value
    assert torch.equal(target.layer1[0].conv2.weight, source.layer1[0].conv2.weight)

    summary = report.summary()
    assert str(path) in summary
    assert f"loaded {len(report.loaded)} tensors" in summary
    assert "2 unexpected: " in summary and "fc.weight" in summary
    assert "1 mismatched: layer1.0.conv1.weight" in summary
    assert "1 missing: layer1.0.conv1.weight" in summary


def test_torchvision_style_names_map_to_stem_and_shortcut(tmp_path, source, target):
    state = {}
    for name, value in source.state_dict().items():
        name = name.replace("stem.0.", "conv1.").replace(".shortcut.", ".downsample.0.")
        state[name] = value
    assert "conv1.weight" in state and "layer2.0.downsample.0.weight" in state
    assert not any(k.startswith("stem.") or "shortcut" in k for k in state)
    # torchvision's stem BN and shortcut BN have no counterpart in a pre-activation net
    state["bn1.weight"] = torch.ones(64)
    state["layer2.0.downsample.1.weight"] = torch.ones(128)
    path = tmp_path / "tv.pt"
    torch.save(state, path)

    report = load_weights(target, path)

    assert report.missing == []
    assert sorted(report.unexpected) == ["bn1.weight", "layer2.0.downsample.1.weight"]
    assert "stem.0.weight" in report.loaded and "layer2.0.shortcut.weight" in report.loaded
    assert torch.equal(target.stem[0].weight, source.stem[0].weight)
    assert torch.equal(target.layer4[0].shortcut.weight, source.layer4[0].shortcut.weight)
    assert _same_state(source, target)


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("empty.pt", b""),
        ("empty.safetensors", b""),
        ("garbage.pt", b"not a checkpoint at all" * 4),
        ("garbage.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + b"x" * 40),
        ("zip.pt", b"PK\x03\x04" + b"\x00" * 60),
    ],
)
def test_unreadable_files_raise_weights_error_naming_the_path(tmp_path, target, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(WeightsError) as info:
        load_weights(target, path)
    assert str(path) in str(info.value)
    assert info.value.path == str(path)


def test_missing_file_and_no_tensors_raise_weights_error(tmp_path, target):
    net = target
    for path, problem in [
        (tmp_path / "absent.safetensors", "no such file"),
        (tmp_path, "not a file"),
    ]:
        with pytest.raises(WeightsError) as info:
            load_weights(net, path)
        assert str(path) in str(info.value) and problem in str(info.value)

    no_tensors = tmp_path / "facts.pt"
    torch.save({"epoch": 3, "lr": 0.1}, no_tensors)
    with pytest.raises(WeightsError, match="no tensors") as info:
        read_state_dict(no_tensors)
    assert str(no_tensors) in str(info.value)

    a_list = tmp_path / "list.pt"
    torch.save([torch.ones(2)], a_list)
    with pytest.raises(WeightsError, match="not a dictionary"):
        read_state_dict(a_list)


def test_file_matching_nothing_raises(tmp_path, target):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.embed.weight": torch.ones(3, 4), "head.bias": torch.ones(2)}, path)
    net = target
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(WeightsError, match="none of its 2 tensors match") as info:
        load_weights(net, path)
    assert str(path) in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_strict_raises_on_missing_tensors_and_leaves_the_network_alone(tmp_path, source, target):
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("layer4.")}
    path = tmp_path / "partial.safetensors"
    save_file(state, path)
    before = {k: v.clone() for k, v in target.state_dict().items()}

    with pytest.raises(WeightsError, match="network tensors missing") as info:
        load_weights(target, path, strict=True)
    assert str(path) in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())

    # not strict: loads what is there and reports the rest
    report = load_weights(target, path)
    assert report.missing and all(name.startswith("layer4.") for name in report.missing)
    assert torch.equal(target.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    assert f"{len(report.missing)} missing: layer4." in report.summary()


def test_path_given_as_a_string_works(tmp_path, source, target):
    path = tmp_path / "trunk.safetensors"
    save_file(source.state_dict(), path)
    report = load_weights(target, str(path))
    assert report.path == str(path) and not report.missing
