"""Megapixel digits: attention sampling against CNNs on the low-res view and the full image.

The benchmark of attention sampling (Katharopoulos & Fleuret 2019, "megapixel MNIST";
PAPERS.md §3), on ``megapixel_digits`` canvases: five digits at their native 28 px (three
of the label's class, two of others) and line-noise patches on black. The models:

1. **attention sampling**: ``SoftAttention`` (3 convolutions of 8, 16, 32 channels) on the
   low-resolution view (``downscale`` by ``--scale``, the paper's 0.12) gives an attention
   distribution over its cells (one per ``--pool`` x ``--pool`` view pixels);
   ``sample_without_replacement`` draws ``--patches`` cells; a ``--patch-px`` square is cut
   at FULL resolution around the centre of each cell (cell (r, c) covers view rows
   [r·pool, (r+1)·pool), i.e. full-res rows times H / h, the exact step of ``downscale``;
   zeros past the canvas); a ResNet-8 gives each patch's features (global max pooling,
   then L2-normalised and scaled by sqrt(width), as K&F's patch network);
   ``expected_without_replacement`` averages them under the attention (unbiased, with
   gradients to the attention); a linear layer classifies. Loss: cross-entropy +
   ``entropy_loss`` (β = ``--entropy``, K&F's 1e-4). Test patches are sampled too (a
   fixed generator), as K&F do.
2. **low-res CNN**: the same ResNet-8 and linear layer on the low-resolution view alone.
3. **full-image CNN**: the same ResNet-8 and linear layer on the full image.

The ResNet-8 is ``preact_resnet8`` with 32 channels (K&F's "8 layers, 32 channels") and a
1-channel stem (the digits are grey), with its stem max-pool on patches and full images
but not on the small view (a digit there is 3 px), and global mean pooling for whole
images (a whole-image classifier must count digits, which a max cannot).

Budget: the same epochs over the same images, batch size, optimiser (Adam), learning rate
and gradient clipping (norm 1, as K&F) for every model. The full-image CNN's training
step costs about 2x the attention model's per image at 300 px but about 20x at 1500 px
on a CPU: ``--no-train-full`` leaves it untrained (no error reported; its costs are
measured all the same).

Costs, at ``--size`` and at each of ``--cost-sizes`` (default 1500, the paper's canvas),
for all three models on ``--cost-batch`` random images (costs depend on shapes only):
milliseconds per image of one training step (forward, backward, clipping, Adam) and of
inference, best of ``--repeat`` interleaved rounds; and the peak memory of one inference
pass and one training step above the resting state, after a warm-up step (``PeakRSS``:
the RSS sampled every 0.2 ms on CPU; ``torch.cuda.max_memory_allocated`` on CUDA). The
images and their low-res views are inputs: generation and downscaling are timed nowhere.
Then the ratios: attention sampling / low-res CNN (test error), attention sampling /
full-image CNN (error, time, memory). There is no target: the script prints the figures
and exits 0.

Data: ``megapixel_digits`` built from scikit-learn's 1797 digits at 28 px by default
(``sklearn_digits``), or from MNIST IDX files (``--images FILE --labels FILE``, gzipped or
not). The source digits are split first (``--test-source-fraction``, seeded), so test
canvases hold no digit a training canvas holds.

CPU defaults: 300 px canvases (view 36 px, where a digit is about 3 px as in the paper's
180 px view) with 2 noise patches (the paper's 50 per 1500^2 px, scaled by area), 1000
train / 500 test canvases, 30 epochs of 16: 9.5 minutes on the project's 2-core machine
(training: attention sampling 114 s, low-res CNN 21 s, full-image CNN 393 s;
``--no-train-full``: 3 minutes).

Why 300 px: attention sampling first has to learn, from patches drawn uniformly, that
patches holding digits help; only then does the attention move to the digits. Ten 50 px
patches cover 28% of a 300 px canvas, 10% of a 500 px one and 1.1% of the paper's
1500 px one, and the time until the attention locks onto the digits grows accordingly.
Measured (seeds 0-2): at 300 px every seed locked on within 5-8 epochs (seeds 1 and
2: test error 0.08 and 0.19 after 18 epochs; seed 0, the defaults: 0.056 after 30); at
500 px seed 0 locked on after about 10 epochs (test error 0.073, attention mass on the
digits 0.997 against 0.016 by chance) but seed 1 had not after 30 (test error 0.880).
K&F train for 500 epochs. Without the L2 normalisation of the patch features the
attention learnt to AVOID the digits (its mass on them fell from chance to 0.000 within
two epochs) and the error stayed at chance.

``--size 1500 --noise 50`` is the paper's recipe, e.g. on a GPU (not run here)::

    .venv/bin/python benchmarks/megapixel_digits.py --device cuda --size 1500 \\
        --noise 50 --train 5000 --test 1000 --epochs 100 --batch 32

Usage (from the repository root)::

    .venv/bin/python benchmarks/megapixel_digits.py --json data/bench/megapixel_digits.json
    .venv/bin/python benchmarks/megapixel_digits.py --images train-images-idx3-ubyte.gz \\
        --labels train-labels-idx1-ubyte.gz
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # digits.py lives beside this script
from digits import (
    as_arrays,
    downscale,
    megapixel_digits,
    source_digits,
)
from napari_slide_attention.models.preact_resnet import PreActResNet, preact_resnet8
from napari_slide_attention.models.sampling import (
    expected_without_replacement,
    sample_without_replacement,
)
from napari_slide_attention.models.soft_attention import (
    SoftAttention,
    SoftAttentionConfig,
    entropy_loss,
)

MODELS = ("attention sampling", "low-res CNN", "full-image CNN")
CLASSES = 10
MB = 1 << 20
# Pixel normalisation (pixels in [0, 1]): the canvases are mostly black.
PIXEL_MEAN, PIXEL_STD = 0.05, 0.2
CLIP_NORM = 1.0
# Images held in memory at most; beyond, records are made again for each batch.
CACHE_BYTES = 1 << 30


# -- data ---------------------------------------------------------------------------------


class MegapixelSet:
    """Megapixel-digits images, labels and low-res views, indexable by batches of indices.

    The views are always kept; the full images are kept when they fit ``CACHE_BYTES``,
    and made again from their records for each batch otherwise (1500 px images are
    2.25 MB each).
    """

    def __init__(
        self,
        source: tuple[np.ndarray, np.ndarray],
        n: int,
        size: int,
        scale: float,
        seed: int,
        noise: int,
    ):
        self.records = megapixel_digits(*source, n, size=size, noise=noise, seed=seed)
        self.size, self.scale = size, scale
        self.labels = np.empty(n, dtype=np.int64)
        self.boxes = np.empty((n, self.records.digits, 4), dtype=np.int64)  # (x, y, w, h)
        self.images = None
        keep = n * size * size <= CACHE_BYTES
        if keep:
            self.images = np.empty((n, size, size), dtype=np.uint8)
        views = []
        for first in range(0, n, 64):
            arrays = as_arrays(self.records[first : first + 64])
            self.labels[first : first + len(arrays["label"])] = arrays["label"]
            self.boxes[first : first + len(arrays["label"])] = arrays["boxes"]
            if keep:
                self.images[first : first + len(arrays["image"])] = arrays["image"]
            views.append(downscale(arrays["image"], scale))  # (b, h, w) uint8
        self.views = np.concatenate(views)  # (n, h, w)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images (b, H, W) uint8, views (b, h, w) uint8, labels (b,)) as tensors."""
        if self.images is not None:
            images = self.images[index]
        else:
            images = np.stack([self.records[int(i)].image for i in index])
        return (
            torch.from_numpy(images),
            torch.from_numpy(self.views[index]),
            torch.from_numpy(self.labels[index]),
        )


# -- models -------------------------------------------------------------------------------


class GreyResNet8(nn.Module):
    """ResNet-8 (``preact_resnet8``) with a 1-channel (grey) stem and global max or mean pooling.

    Max pooling (K&F's patch network ends with one) says whether a feature is anywhere in
    the input: a patch that holds a digit, wherever in the patch. Mean pooling, the
    trunk's own head, keeps how often it occurs, which a whole-image classifier needs to
    count digits.

    Args:
        width: channels.
        stem_pool: the stem's 3x3 stride-2 max-pool.
        pooling: "max" or "mean".
    """

    def __init__(self, width: int, stem_pool: bool, pooling: str):
        super().__init__()
        net = preact_resnet8(width, stem_pool=stem_pool)
        stem = net.stem[0]
        net.stem[0] = nn.Conv2d(
            1, stem.out_channels, stem.kernel_size, stem.stride, stem.padding, bias=False
        )
        nn.init.kaiming_normal_(net.stem[0].weight, mode="fan_out", nonlinearity="relu")
        self.trunk: PreActResNet = net
        self.pooling = pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _, stage in self.trunk.stages():
            x = stage(x)
        x = torch.relu(self.trunk.final_bn(x))  # (N, width, h, w)
        return x.amax(dim=(2, 3)) if self.pooling == "max" else x.mean(dim=(2, 3))


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels.float() / 255.0 - PIXEL_MEAN) / PIXEL_STD


class AttentionSampling(nn.Module):
    """Attention sampling (K&F 2019): attention on the view, a ResNet on full-res patches.

    Args:
        size: side of the full images.
        view: side of the low-resolution views.
        patches: patches sampled per image (N).
        patch_px: patch side in full-resolution pixels.
        pool: view pixels per attention cell (SoftAttention's ``pool``).
        width: channels of the ResNet-8.
        entropy: β of the entropy regulariser.
    """

    def __init__(
        self,
        size: int,
        view: int,
        patches: int,
        patch_px: int,
        pool: int,
        width: int,
        entropy: float,
    ):
        super().__init__()
        self.size, self.view, self.patches, self.patch_px = size, view, patches, patch_px
        config = SoftAttentionConfig(
            in_channels=1,
            layers=3,
            channels=8,
            pool=pool,
            entropy_weight=entropy,
            mean=(PIXEL_MEAN,),
            std=(PIXEL_STD,),
        )
        self.attention = SoftAttention(config)
        self.features = GreyResNet8(width, stem_pool=True, pooling="max")
        self.classifier = nn.Linear(width, CLASSES)
        rows, cols = self.attention.grid_shape(view, view)
        step = size / view  # full-res pixels per view pixel (downscale's exact step)
        # Centre of each cell in full-res pixels; the last cell may be partial (ceil grid).
        ends = np.minimum((np.arange(rows) + 1) * pool, view)
        centres = (np.arange(rows) * pool + ends) / 2 * step  # (rows,)
        corner = np.floor(centres - patch_px / 2 + 0.5).astype(np.int64)  # (rows,)
        self.register_buffer("corner", torch.from_numpy(corner), persistent=False)
        self.centres = centres  # the grid is square: the same for columns
        self.grid = (rows, cols)
        self.feature_scale = math.sqrt(width)

    def cut_patches(self, images: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """(B, N, p, p) full-res patches around the cells (B, N) of the attention grid."""
        p = self.patch_px
        padded = F.pad(images, (p, p, p, p))  # (B, H + 2p, W + 2p), zeros past the canvas
        rows = self.corner[cells // self.grid[1]] + p  # (B, N) top, in padded pixels
        cols = self.corner[cells % self.grid[1]] + p  # (B, N)
        step = torch.arange(p, device=images.device)
        r = (rows[..., None] + step)[..., :, None]  # (B, N, p, 1)
        c = (cols[..., None] + step)[..., None, :]  # (B, N, 1, p)
        b = torch.arange(images.shape[0], device=images.device)[:, None, None, None]
        return padded[b, r, c]  # (B, N, p, p)

    def forward(
        self, images: torch.Tensor, views: torch.Tensor, generator: torch.Generator | None = None
    ):
        """(logits (B, K), regulariser) of full images (B, H, W) and their views (B, h, w)."""
        tissue = torch.ones_like(views, dtype=torch.bool)  # the whole canvas counts
        out = self.attention(views[:, None], tissue)  # (B, rows, cols) attention
        attention = out.attention.flatten(1)  # (B, P)
        cells = sample_without_replacement(attention, self.patches, generator)  # (B, N)
        patches = self.cut_patches(images, cells)  # (B, N, p, p) uint8
        batch, n = cells.shape
        x = _normalise(patches.flatten(0, 1)[:, None])  # (B·N, 1, p, p)
        # L2-normalised, as K&F's patch network: a patch's features have the same norm
        # whatever it holds. Without it the attention learnt to AVOID the digits here (their
        # large, still meaningless features raised the loss) and never came back; the scale
        # (sqrt(width): unit RMS per feature) lets the linear layer reach confident logits.
        features = F.normalize(self.features(x), dim=1) * self.feature_scale  # (B·N, width)
        features = features.view(batch, n, -1)  # (B, N, width)
        pooled = expected_without_replacement(attention, cells, features)  # (B, width)
        regulariser = entropy_loss(out.attention, out.tissue, self.attention.config.entropy_weight)
        return self.classifier(pooled), regulariser


class ImageCNN(nn.Module):
    """ResNet-8 and a linear layer on one whole image (the low-res view or the full image).

    Args:
        width: channels of the ResNet-8.
        stem_pool: the stem's max-pool (on for the full image).
        full: classify the full image (else the low-res view).
    """

    def __init__(self, width: int, stem_pool: bool, full: bool):
        super().__init__()
        self.full = full
        self.features = GreyResNet8(width, stem_pool=stem_pool, pooling="mean")
        self.classifier = nn.Linear(width, CLASSES)

    def forward(
        self, images: torch.Tensor, views: torch.Tensor, generator: torch.Generator | None = None
    ):
        x = _normalise((images if self.full else views)[:, None])  # (B, 1, s, s)
        logits = self.classifier(self.features(x))
        return logits, logits.new_zeros(())


def build_model(name: str, settings: dict) -> nn.Module:
    """One of MODELS with the benchmark's settings (seeded: the same weights every time)."""
    torch.manual_seed(settings["seed"])
    width = settings["width"]
    if name == "attention sampling":
        return AttentionSampling(
            settings["size"],
            settings["view"],
            settings["patches"],
            settings["patch_px"],
            settings["pool"],
            width,
            settings["entropy"],
        )
    if name == "low-res CNN":
        return ImageCNN(width, stem_pool=False, full=False)
    return ImageCNN(width, stem_pool=True, full=True)


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, images, views, labels, generator):
    optimizer.zero_grad(set_to_none=True)
    logits, regulariser = model(images, views, generator)
    loss = F.cross_entropy(logits, labels) + regulariser
    loss.backward()
    # K&F clip the gradient norm at 1; the same for every model.
    nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
    optimizer.step()
    return loss.detach(), logits.detach()


def train(
    name: str, model: nn.Module, data: MegapixelSet, settings: dict, device: torch.device
) -> dict:
    """Train for the budget's epochs; returns per-epoch loss, error and seconds."""
    optimizer = torch.optim.Adam(model.parameters(), lr=settings["lr"])
    order_rng = np.random.default_rng(settings["seed"])
    generator = torch.Generator(device).manual_seed(settings["seed"])
    batch = settings["batch"]
    history = []
    start = time.perf_counter()
    for epoch in range(1, settings["epochs"] + 1):
        model.train()
        t0 = time.perf_counter()
        total, right, seen = 0.0, 0, 0
        order = order_rng.permutation(len(data))
        for first in range(0, len(order), batch):
            index = order[first : first + batch]
            if len(index) < 2:  # batch norm needs two samples
                continue
            images, views, labels = (t.to(device) for t in data.batch(index))
            loss, logits = _step(model, optimizer, images, views, labels, generator)
            total += float(loss) * len(index)
            right += int((logits.argmax(1) == labels).sum())
            seen += len(index)
        seconds = time.perf_counter() - t0
        record = {
            "epoch": epoch,
            "loss": total / seen,
            "train_error": 1 - right / seen,
            "seconds": seconds,
        }
        history.append(record)
        print(
            f"  {name}: epoch {epoch}/{settings['epochs']}  loss {record['loss']:.3f}  "
            f"train error {record['train_error']:.3f}  {seconds:.1f} s",
            flush=True,
        )
    return {"history": history, "train_seconds": time.perf_counter() - start}


def _digit_cells(model: AttentionSampling, boxes: np.ndarray) -> torch.Tensor:
    """(B, rows, cols) bool: attention cells whose centre lies inside a digit's box."""
    centres = model.centres  # (rows,) full-res px, the same for columns
    x, y = boxes[..., 0, None], boxes[..., 1, None]  # (B, digits, 1)
    w, h = boxes[..., 2, None], boxes[..., 3, None]
    in_y = (centres >= y) & (centres < y + h)  # (B, digits, rows)
    in_x = (centres >= x) & (centres < x + w)  # (B, digits, cols)
    return torch.from_numpy((in_y[..., :, None] & in_x[..., None, :]).any(1))


@torch.no_grad()
def evaluate(model: nn.Module, data: MegapixelSet, settings: dict, device: torch.device) -> dict:
    """Test error; for attention sampling also the attention's mass on the digits.

    Patches are sampled with a fixed generator, as in training (K&F test the same way).
    The mass on the digits is the attention summed over the cells whose centre lies in
    a digit's box, against chance: the share of such cells.
    """
    model.eval()
    generator = torch.Generator(device).manual_seed(settings["seed"] + 1)
    wrong, mass, chance = 0, 0.0, 0.0
    for first in range(0, len(data), settings["batch"]):
        index = np.arange(first, min(first + settings["batch"], len(data)))
        images, views, labels = (t.to(device) for t in data.batch(index))
        logits, _ = model(images, views, generator)
        wrong += int((logits.argmax(1) != labels).sum())
        if isinstance(model, AttentionSampling):
            tissue = torch.ones_like(views, dtype=torch.bool)
            attention = model.attention(views[:, None], tissue).attention.cpu()
            cells = _digit_cells(model, data.boxes[index])
            mass += float((attention * cells).sum())
            chance += float(cells.float().mean((1, 2)).sum())
    result: dict[str, float] = {"test_error": wrong / len(data)}
    if isinstance(model, AttentionSampling):
        result["digit_mass"] = mass / len(data)
        result["digit_mass_chance"] = chance / len(data)
    return result


# -- time and memory ----------------------------------------------------------------------


def _cost_settings(settings: dict, size: int) -> dict:
    """The settings of a cost measurement at another canvas size (cost batch, its view)."""
    return {
        **settings,
        "size": size,
        "view": max(1, round(size * settings["scale"])),
        "batch": settings["cost_batch"],
    }


def _random_batch(settings: dict, device: torch.device):
    """A batch of random images, views and labels of the settings' shapes (seeded).

    Costs do not depend on the pixels or the weights, only on the shapes.
    """
    generator = torch.Generator().manual_seed(settings["seed"])
    b, size, view = settings["batch"], settings["size"], settings["view"]
    images = torch.randint(0, 256, (b, size, size), dtype=torch.uint8, generator=generator)
    views = torch.randint(0, 256, (b, view, view), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, CLASSES, (b,), generator=generator)
    return images.to(device), views.to(device), labels.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_models(settings: dict, device: torch.device) -> dict:
    """ms per image of a training step and of inference, in interleaved rounds.

    Fresh (seeded) models on a random batch of the settings' shapes; round 0 warms up,
    each model keeps its fastest round (and the median).
    """
    models = {name: build_model(name, settings).to(device) for name in MODELS}
    optimizers = {
        name: torch.optim.Adam(model.parameters(), lr=settings["lr"])
        for name, model in models.items()
    }
    images, views, labels = _random_batch(settings, device)
    generator = torch.Generator(device).manual_seed(settings["seed"])
    runs = {name: {"train": [], "infer": []} for name in MODELS}
    n = len(labels)
    for round_ in range(settings["repeat"] + 1):
        for name, model in models.items():
            model.train()
            _sync(device)
            t0 = time.perf_counter()
            _step(model, optimizers[name], images, views, labels, generator)
            _sync(device)
            t1 = time.perf_counter()
            model.eval()
            with torch.no_grad():
                model(images, views, generator)
            _sync(device)
            t2 = time.perf_counter()
            if round_:
                runs[name]["train"].append((t1 - t0) / n * 1e3)
                runs[name]["infer"].append((t2 - t1) / n * 1e3)
    return {
        name: {
            "train_ms": min(r["train"]),
            "train_ms_median": statistics.median(r["train"]),
            "infer_ms": min(r["infer"]),
            "infer_ms_median": statistics.median(r["infer"]),
        }
        for name, r in runs.items()
    }


def _rss_now() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """The largest resident set size seen while the block runs, sampled every 0.2 ms.

    ``ru_maxrss`` cannot measure one step inside a process that has already peaked
    higher (it only grows), and the first step of a fresh process also pays for one-time
    set-up (about 150 MB of oneDNN and thread-pool state here). So each step is measured
    after a warm-up step, by sampling ``/proc/self/statm`` from a thread (torch's kernels
    release the GIL). Tensors of more than 128 kB live in their own mappings, returned to
    the system when freed, so the RSS follows the live tensors closely.
    """

    def __enter__(self) -> PeakRSS:
        self.baseline = self.peak = _rss_now()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.0002):
                self.peak = max(self.peak, _rss_now())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_now())


def _release_freed_memory() -> None:
    """Return freed memory to the system now, and blocks over 128 kB always from now on.

    glibc raises its mmap threshold when a mapped block is freed (up to 32 MB), after
    which such blocks come from the heap and stay resident when freed: the RSS would then
    hold an earlier step's peak, and the measured step would seem to need nothing. A
    threshold set explicitly stays fixed; ``malloc_trim`` releases what the heap holds.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: the figures may then read low
        return
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    libc.malloc_trim(0)


def measure_memory(name: str, settings: dict, device: torch.device) -> dict:
    """Peak memory above the resting state of one inference pass and one training step.

    CPU: the peak RSS during the step (``PeakRSS``) minus the RSS before it, with the
    model, optimiser (its state made by a warm-up step) and batch in memory. CUDA:
    ``max_memory_allocated`` after ``reset_peak_memory_stats`` minus what was allocated.
    """
    model = build_model(name, settings).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings["lr"])
    images, views, labels = _random_batch(settings, device)
    generator = torch.Generator(device).manual_seed(settings["seed"])

    def infer() -> None:
        model.eval()
        with torch.no_grad():
            model(images, views, generator)

    def step() -> None:
        model.train()
        _step(model, optimizer, images, views, labels, generator)

    report: dict[str, float] = {}
    for mode, run in (("infer", infer), ("train", step)):
        run()  # warm-up: one-time allocations, Adam's state
        _sync(device)
        gc.collect()
        if device.type == "cpu":
            _release_freed_memory()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            baseline = torch.cuda.memory_allocated(device)
            run()
            _sync(device)
            peak = torch.cuda.max_memory_allocated(device)
        else:
            with PeakRSS() as rss:
                run()
            baseline, peak = rss.baseline, rss.peak
        report[f"{mode}_mb"] = (peak - baseline) / MB
    return report


def measure_costs(settings: dict, size: int, device: torch.device, memory: bool) -> dict:
    """Time per image and peak memory of every model at one canvas size."""
    at = _cost_settings(settings, size)
    costs = time_models(at, device)
    if memory:
        for name in MODELS:
            costs[name].update(measure_memory(name, at, device))
    return costs


# -- main ---------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=None, help="MNIST IDX images (.gz ok)")
    parser.add_argument("--labels", type=Path, default=None, help="MNIST IDX labels (.gz ok)")
    parser.add_argument(
        "--test-source-fraction", type=float, default=1 / 3, help="source digits kept for test"
    )
    parser.add_argument("--size", type=int, default=300, help="canvas side, px (paper: 1500)")
    parser.add_argument(
        "--noise",
        type=int,
        default=None,
        help="line-noise patches per image (default: the paper's 50 per 1500^2 px, by area)",
    )
    parser.add_argument("--scale", type=float, default=0.12, help="low-res view / full image")
    parser.add_argument("--train", type=int, default=1000, help="training images")
    parser.add_argument("--test", type=int, default=500, help="test images")
    parser.add_argument("--epochs", type=int, default=30, help="epochs, the same for every model")
    parser.add_argument("--batch", type=int, default=16, help="images per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--patches", type=int, default=10, help="patches sampled per image")
    parser.add_argument("--patch-px", type=int, default=50, help="patch side, full-res px")
    parser.add_argument("--pool", type=int, default=1, help="view pixels per attention cell")
    parser.add_argument("--width", type=int, default=32, help="ResNet-8 channels")
    parser.add_argument("--entropy", type=float, default=1e-4, help="entropy regulariser β")
    parser.add_argument(
        "--train-full",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train the full-image CNN (--no-train-full: costs only)",
    )
    parser.add_argument(
        "--cost-sizes",
        type=int,
        nargs="*",
        default=[1500],
        help="canvas sizes whose costs are measured besides --size",
    )
    parser.add_argument("--cost-batch", type=int, default=4, help="images per cost measurement")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    parser.add_argument("--repeat", type=int, default=3, help="timing rounds (best kept)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, weights, sampling")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    noise = args.noise if args.noise is not None else round(50 * (args.size / 1500) ** 2)
    view = max(1, round(args.size * args.scale))
    settings = {
        "size": args.size,
        "view": view,
        "scale": args.scale,
        "noise": noise,
        "train": args.train,
        "test": args.test,
        "epochs": args.epochs,
        "batch": args.batch,
        "lr": args.lr,
        "clip_norm": CLIP_NORM,
        "patches": args.patches,
        "patch_px": args.patch_px,
        "pool": args.pool,
        "width": args.width,
        "entropy": args.entropy,
        "train_full": args.train_full,
        "cost_sizes": sorted({args.size, *args.cost_sizes}),
        "cost_batch": args.cost_batch,
        "repeat": args.repeat,
        "device": args.device,
        "threads": args.threads,
        "seed": args.seed,
        "source": "sklearn_digits" if args.images is None else str(args.images),
    }
    start = time.perf_counter()
    try:
        train_source, test_source = source_digits(
            args.images, args.labels, test_fraction=args.test_source_fraction, seed=args.seed
        )
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    train_set = MegapixelSet(train_source, args.train, args.size, args.scale, args.seed, noise)
    test_set = MegapixelSet(test_source, args.test, args.size, args.scale, args.seed + 1, noise)
    print(
        f"megapixel digits: {args.size} px canvases, {noise} noise patches, view {view} px "
        f"(x{args.scale}); {args.train} train / {args.test} test images from "
        f"{settings['source']} ({len(train_source[0])} / {len(test_source[0])} source "
        f"digits); made in {time.perf_counter() - start:.1f} s"
    )
    print(
        f"budget: {args.epochs} epochs of batch {args.batch}, Adam lr {args.lr}, gradient norm "
        f"clipped at {CLIP_NORM}, for every trained model; attention sampling: "
        f"{args.patches} patches of {args.patch_px} px, cells of {args.pool} view px, "
        f"entropy β {args.entropy}; device {args.device}, {torch.get_num_threads()} torch "
        f"threads, {os.cpu_count()} cores; python {platform.python_version()}, "
        f"torch {torch.__version__}",
        flush=True,
    )

    results: dict[str, dict] = {}
    for name in MODELS:
        model = build_model(name, settings).to(device)
        results[name] = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "trained": False,
            "test_error": None,
        }
        if name == "full-image CNN" and not args.train_full:
            print(f"  {name}: not trained (--no-train-full); costs only")
            continue
        results[name].update(train(name, model, train_set, settings, device))
        results[name]["trained"] = True
        results[name].update(evaluate(model, test_set, settings, device))
        extra = ""
        if "digit_mass" in results[name]:
            extra = (
                f", attention mass on the digits {results[name]['digit_mass']:.3f} "
                f"(chance {results[name]['digit_mass_chance']:.3f})"
            )
        print(f"  {name}: test error {results[name]['test_error']:.3f}{extra}", flush=True)
        del model

    costs: dict[int, dict] = {}
    for size in settings["cost_sizes"]:
        print(f"costs at {size} px (batch of {args.cost_batch}) ...", flush=True)
        costs[size] = measure_costs(settings, size, device, not args.no_memory)

    unit = "CUDA allocated" if device.type == "cuda" else "RSS increment"
    print()
    print(f"{'model':<20}{'params':>8}{'test error':>12}  (on {args.size} px, {args.test} images)")
    for name in MODELS:
        r = results[name]
        error = f"{r['test_error']:.3f}" if r["test_error"] is not None else "not trained"
        print(f"{name:<20}{r['parameters']:>8}{error:>12}")
    for size, at_size in costs.items():
        print()
        print(
            f"{size} px:{'':<12}{'train ms/img':>14}{'infer ms/img':>14}"
            f"{'train MB':>10}{'infer MB':>10}"
        )
        for name in MODELS:
            c = at_size[name]
            mem = (
                f"{c['train_mb']:>10.1f}{c['infer_mb']:>10.1f}"
                if "train_mb" in c
                else f"{'-':>10}{'-':>10}"
            )
            print(f"{name:<20}{c['train_ms']:>14.2f}{c['infer_ms']:>14.2f}{mem}")
    print(
        f"(ms/img: best of {args.repeat} interleaved rounds on {args.cost_batch} random images; "
        f"MB: peak {unit} of one step on them, after a warm-up step)"
    )
    print()
    ours, low, full = (results[name] for name in MODELS)
    ratios: dict[str, float | None] = {
        "error attention / low-res": _ratio(ours["test_error"], low["test_error"]),
        "error attention / full": _ratio(ours["test_error"], full["test_error"]),
    }
    for size, at_size in costs.items():
        a, f = at_size["attention sampling"], at_size["full-image CNN"]
        ratios[f"train time attention / full @{size}"] = _ratio(a["train_ms"], f["train_ms"])
        ratios[f"infer time attention / full @{size}"] = _ratio(a["infer_ms"], f["infer_ms"])
        if "train_mb" in a:
            ratios[f"train memory attention / full @{size}"] = _ratio(a["train_mb"], f["train_mb"])
            ratios[f"infer memory attention / full @{size}"] = _ratio(a["infer_mb"], f["infer_mb"])
    for key, value in ratios.items():
        shown = f"{value:6.3f}" if value is not None else "     -"
        print(f"{key:<38} {shown}  (information; no target)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "benchmark": "megapixel_digits",
            "settings": settings,
            "memory_measure": unit,
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "results": results,
            "costs": {str(size): value for size, value in costs.items()},
            "ratios": ratios,
            "seconds": time.perf_counter() - start,
        }
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
