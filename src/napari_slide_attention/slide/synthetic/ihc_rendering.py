"""The pixels of a synthetic IHC slide: haematoxylin counterstain, DAB, and the distractors.

Colours follow :mod:`.ihc_stains` (Beer-Lambert, mixed in transmitted light), so a coarse
level's pixel is the mean of the fine pixels it covers: levels with a downsample up to 8
(4 µm per pixel at 0.5 µm per level-0 pixel) draw every cell, coarser levels use each
material's mean colour (measured once on a patch drawn cell by cell) weighted by its share
of the pixel.

Tiles are rendered one at a time from the layout at the scale of their level, as for the
H&E slides, so memory stays bounded by a few tiles whatever the slide size.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .ihc_distractors import fold_light, pen_light, vessel_light
from .ihc_shapes import blob_depth, blob_extent, voronoi
from .ihc_stains import DAB, GREY, H, lerp, transmitted
from .rendering import Renderer, grow_bounds
from .shapes import centres, hash01, nuclei_coverage, piece_depth, value_noise

# Levels with a downsample up to this draw cells; coarser ones mix mean colours.
_DETAIL_MAX_DOWNSAMPLE = 8.0
# Within a tumour region, lattice squares whose nest noise is above this hold tumour cells;
# the threshold rises towards the rim, where nests break up into cords and single cells.
_NEST_THRESHOLD = 0.38
_NEST_FRONT = 0.12
# Nest noise: two octaves, µm across, and their weights.
_NEST_OCTAVES = ((60.0, 0.65), (22.0, 0.35))


def _coverage(cell: float, density: float, radius: float, pleomorphism: float) -> float:
    """Expected share of pixels covered by the nuclei of :func:`nuclei_coverage`."""
    return density * math.pi * radius**2 * (1.0 + pleomorphism**2 / 3.0) / cell**2


class IhcRenderer(Renderer):
    """Renders tiles of an IHC slide, any pyramid level, one at a time."""

    def __init__(
        self,
        width: int,
        height: int,
        seed: int,
        tile_size: int,
        layout: dict[str, Any],
        stain: str,
        staining: dict[str, Any],
        mpp: float,
    ) -> None:
        super().__init__(width, height, seed, tile_size, layout["pieces"], [], 2)
        self.stain = stain
        self.mmr = stain == "mmr"
        self.staining = staining
        self.px = 1.0 / mpp  # level-0 px per µm
        self.tumours = layout["tumours"]
        self.artefacts = layout["artefacts"]
        self.ducts = [dict(d, stained=False) for d in layout["ducts"]] + [
            dict(a["shape"], stained=True) for a in self.artefacts if a["kind"] == "dab_duct"
        ]
        self.vessels = [a["shape"] for a in self.artefacts if a["kind"] == "vessel"]
        self.blushes = [a["shape"] for a in self.artefacts if a["kind"] == "dab_stroma"]
        self.folds = [a["shape"] for a in self.artefacts if a["kind"] == "fold"]
        self.pens = [a["shape"] for a in self.artefacts if a["kind"] == "pen"]
        self.glass = self.tissue_base - np.float32(255 - 240)
        self.piece_stain = np.asarray([p["stain"] for p in self.pieces] + [1.0], np.float32)
        self.dab = float(staining["dab_strength"])
        self.counter = float(staining["counterstain_strength"])
        self.stats["tumour_px"] = 0
        self.stats["tumour_bounds"] = [[width, height, -1, -1] for _ in self.tumours]

        c = self.counter
        self.stroma = (0.11 * c, 0.045)  # (h, grey) before the fibre shading
        normal_dab = staining["normal_nuclei"][1] * self.dab
        # Fibroblasts and lymphocytes, unstained and (MMR) stained.
        self.fibro_neg = transmitted(1.0 * c)
        self.lymph_neg = transmitted(1.6 * c)
        self.fibro = transmitted(0.35 * c, normal_dab) if self.mmr else self.fibro_neg
        self.lymph = transmitted(0.45 * c, 1.25 * normal_dab) if self.mmr else self.lymph_neg
        self.lumen = transmitted(0.02 * c, 0.0, 0.01)
        self.wall = transmitted(0.3 * c, 0.0, 0.12)
        # Mean colours for the coarse levels, measured on a patch drawn cell by cell.
        patch = centres(0, 256, 1.0)
        blank = np.zeros((256, 256, 3), dtype=np.float32)
        self.tumour_mean = self._tumour_detail(blank, patch, patch, 1.0, force=True).mean((0, 1))
        self.duct_mean = {
            stained: self._duct_cells(patch, patch, 1.0, stained).mean((0, 1))
            for stained in (False, True)
        }

    # -- tiles ----------------------------------------------------------------------------

    def _tile(self, level: int, x0: int, y0: int, rows: int, cols: int) -> np.ndarray:
        ts = self.ts
        d = float(2**level)
        bank = self._bank(level, x0, y0)
        xs = centres(x0, ts, d)
        ys = centres(y0, ts, d)

        tissue = np.zeros((ts, ts), dtype=bool)
        depth = np.full((ts, ts), -np.inf, dtype=np.float32)
        piece_id = np.full((ts, ts), -1, dtype=np.int8)
        for i, piece, sx, sy in self._pieces_on(xs, ys):
            sub_depth = piece_depth(piece, xs[sx], ys[sy])
            sub = sub_depth > 0.0
            if not sub.any():
                continue
            tissue[sy, sx] |= sub
            # In µm from the rim, roughly: the depth is in units of the piece's axes.
            rim_um = sub_depth * (piece["axes"][1] / self.px)
            depth[sy, sx] = np.where(sub, np.maximum(depth[sy, sx], rim_um), depth[sy, sx])
            piece_id[sy, sx][sub] = i
            if level == 0:
                self._track_piece(i, sub, x0 + sx.start, y0 + sy.start, rows, cols)
        if level == 0:
            self.stats["tissue_px"] += int(tissue[: rows - y0, : cols - x0].sum())

        pen = pen_light(self.pens, xs, ys, d, self.px)
        background = self.background[bank]
        if not tissue.any():
            if pen is None:
                return background
            out = background.astype(np.float32) * pen
            return np.clip(out, 0, 255).astype(np.uint8)

        light = self._tissue(level, xs, ys, d, tissue, depth, x0, y0, rows, cols)
        light **= self.piece_stain[piece_id][:, :, None]
        light = fold_light(light, self.folds, xs, ys, d, self.px)
        out = self.glass[bank] * light
        out = np.where(tissue[:, :, None], out, background)
        if pen is not None:
            out = out * pen
        np.clip(out, 0, 255, out=out)
        return out.astype(np.uint8)

    def _tissue(
        self,
        level: int,
        xs: np.ndarray,
        ys: np.ndarray,
        d: float,
        tissue: np.ndarray,
        rim_um: np.ndarray,
        x0: int,
        y0: int,
        rows: int,
        cols: int,
    ) -> np.ndarray:
        """Transmitted light (ts, ts, 3) of the tissue, distractors and tumour included."""
        detail = d <= _DETAIL_MAX_DOWNSAMPLE
        seed = self.seed * 131
        c = self.counter
        # Stroma: broad counterstain variation and fibre-like streaks (octaves finer than two
        # output pixels would only alias; their mean is zero).
        shade = np.ones((ys.size, xs.size), dtype=np.float32)
        broad = 120.0 * self.px
        if broad / d >= 2.0:
            shade += 0.3 * value_noise(seed * 7 + 1, xs, ys, broad, broad, np.float32) - 0.15
        # Collagen bundles run one way here and the other way there.
        fibres = 40.0 * self.px, 5.0 * self.px
        if fibres[1] / d >= 2.0:
            along_x = value_noise(seed * 7 + 2, xs, ys, fibres[0], fibres[1], np.float32)
            along_y = value_noise(seed * 7 + 3, xs, ys, fibres[1], fibres[0], np.float32)
            mix = value_noise(seed * 7 + 4, xs, ys, 2.5 * broad, 2.5 * broad, np.float32)
            mix = np.clip((mix - 0.5) * 4.0 + 0.5, 0.0, 1.0)
            streaks = along_x * mix + along_y * (1.0 - mix)
            shade += 0.35 * streaks - 0.175
        h = self.stroma[0] * shade
        grey = self.stroma[1] * shade
        dab = np.zeros_like(shade)
        # The DAB edge effect along the (ragged) rim: antibody pools where the section ends.
        edge = np.clip(1.0 - rim_um / 15.0, 0.0, 1.0) ** 1.5
        dab += np.float32(0.35 * self.dab) * edge
        h = h + np.float32(0.15 * c) * edge
        for blush in self.blushes:
            profile = self._blob_alpha(blush, xs, ys, d, soft=0.35)
            if profile is None:
                continue
            grain_px = 20.0 * self.px
            if grain_px / d >= 2.0:
                profile = profile * (0.5 + value_noise(blush["noise_seed"] + 1, xs, ys, grain_px))
            dab += np.float32(0.6 * self.dab) * profile.astype(np.float32)
        light = np.exp(-(h[:, :, None] * H + dab[:, :, None] * DAB + grey[:, :, None] * GREY))
        light = light.astype(np.float32)

        # Stroma nuclei: fibroblasts and lymphocytes; on MMR most are stained (the control).
        positive = self.staining["normal_nuclei"][0] if self.mmr else 0.0
        kinds = (
            (self.fibro, self.fibro_neg, 22.0, 0.4, 2.0, 0.25, 3.0, 1),
            (self.lymph, self.lymph_neg, 30.0, 0.14, 2.8, 0.1, 0.1, 2),
        )
        for pos_t, neg_t, cell, dens, radius, pleo, elong, s in kinds:
            for colour, share, stream in ((pos_t, positive, 0), (neg_t, 1.0 - positive, 1)):
                if share <= 0:
                    continue
                args = {
                    "cell": cell * self.px,
                    "density": dens * share,
                    "radius": radius * self.px,
                    "pleomorphism": pleo,
                    "elongation": elong,
                }
                if detail:
                    alpha = nuclei_coverage(seed * 11 + 2 * s + stream, xs, ys, d, **args)
                else:
                    alpha = np.float32(
                        _coverage(args["cell"], args["density"], args["radius"], pleo)
                    )
                light = lerp(light, colour, alpha)

        light = self._ducts(light, xs, ys, d)
        light = vessel_light(light, self.vessels, self.wall, xs, ys, d, self.px)
        light = self._tumour(light, xs, ys, d, tissue, level, x0, y0, rows, cols)
        return light

    # -- structures -----------------------------------------------------------------------

    def _blob_alpha(
        self, blob: dict[str, Any], xs: np.ndarray, ys: np.ndarray, d: float, soft: float = 0.0
    ) -> np.ndarray | None:
        """Coverage of a blob on the grid (None when it misses the grid). ``soft`` fades it
        in over that share of its depth."""
        depth = self._blob_depth(blob, xs, ys)
        if depth is None:
            return None
        aa = d / blob["axes"][1]  # one output pixel, in depth units
        width = max(soft, aa)
        return np.clip(depth / width + (0.5 if soft == 0 else 0.0), 0.0, 1.0).astype(np.float32)

    @staticmethod
    def _blob_depth(blob: dict[str, Any], xs: np.ndarray, ys: np.ndarray) -> np.ndarray | None:
        x0, y0, x1, y1 = blob_extent(blob)
        if x1 < xs[0] or x0 > xs[-1] or y1 < ys[0] or y0 > ys[-1]:
            return None
        return blob_depth(blob, xs, ys)

    def _ducts(self, light: np.ndarray, xs: np.ndarray, ys: np.ndarray, d: float) -> np.ndarray:
        """Normal ducts: a ring of small regular cells around a pale lumen."""
        for duct in self.ducts:
            depth = self._blob_depth(duct, xs, ys)
            if depth is None or not (depth > -0.05).any():
                continue
            aa = d / duct["axes"][1]
            outer = np.clip(depth / aa + 0.5, 0.0, 1.0)
            inner = np.clip((depth - (1.0 - duct["lumen"])) / aa + 0.5, 0.0, 1.0)
            ring = outer - inner
            if d <= _DETAIL_MAX_DOWNSAMPLE:
                epithelium = self._duct_cells(xs, ys, d, duct["stained"])
            else:
                epithelium = self.duct_mean[duct["stained"]]
            light = lerp(light, epithelium, ring)
            light = lerp(light, self.lumen, inner)
        return light

    def _duct_cells(self, xs: np.ndarray, ys: np.ndarray, d: float, stained: bool) -> np.ndarray:
        """Transmitted light of duct epithelium drawn cell by cell (9 µm cells)."""
        c = self.counter
        cells = voronoi(self.seed * 17 + 3, xs, ys, 9.0 * self.px)
        u = hash01(self.seed * 19 + 5, cells.lattice_x, cells.lattice_y).ravel()[cells.index]
        cyto_dab = 0.35 * self.dab if stained else 0.0
        cytoplasm = transmitted(0.18 * c, cyto_dab, 0.08)
        light = np.broadcast_to(cytoplasm, (*cells.edge.shape, 3)).copy()
        if stained:
            mem = np.clip((0.9 * self.px - cells.edge) / d + 0.5, 0.0, 1.0)
            light = lerp(light, transmitted(0.18 * c, 1.1 * self.dab, 0.08), mem)
        r = 2.7 * self.px * (0.9 + 0.2 * u)
        dist = np.sqrt(cells.dx**2 + cells.dy**2) / r
        nucleus = np.clip((1.0 - dist) * (r / d) + 0.5, 0.0, 1.0)
        if self.mmr:
            share, amount = self.staining["normal_nuclei"]
            pos = u < share
            nuc_h = np.where(pos, 0.4 * c, 1.4 * c)[:, :, None]
            nuc_dab = np.where(pos, amount * self.dab, 0.0)[:, :, None]
            colour = np.exp(-(nuc_h * H + nuc_dab * DAB)).astype(np.float32)
        else:
            colour = transmitted(1.4 * c)
        return lerp(light, colour, nucleus)

    def _tumour(
        self,
        light: np.ndarray,
        xs: np.ndarray,
        ys: np.ndarray,
        d: float,
        tissue: np.ndarray,
        level: int,
        x0: int,
        y0: int,
        rows: int,
        cols: int,
    ) -> np.ndarray:
        """Tumour nests: cell by cell on fine levels, their mean colour on coarse ones."""
        near = []
        region_depth = None
        for i, region in enumerate(self.tumours):
            depth = self._blob_depth(region, xs, ys)
            if depth is None:
                continue
            inside = (depth > 0) & tissue
            if not inside.any():
                continue
            near.append(region)
            region_depth = depth if region_depth is None else np.maximum(region_depth, depth)
            if level == 0:
                self._track_tumour(i, inside, x0, y0, rows, cols)
        if level == 0 and region_depth is not None:
            inside = (region_depth > 0) & tissue
            self.stats["tumour_px"] += int(inside[: rows - y0, : cols - x0].sum())
        if not near:
            return light
        if d <= _DETAIL_MAX_DOWNSAMPLE:
            return self._tumour_detail(light, xs, ys, d, regions=near)
        nest = self._nests(xs, ys, d)
        threshold = _NEST_THRESHOLD + _NEST_FRONT * np.clip(1.0 - region_depth / 0.3, 0.0, 1.0)
        soft = 0.02 * d / 4.0
        alpha = np.clip((nest - threshold) / soft + 0.5, 0.0, 1.0) * (region_depth > 0)
        return lerp(light, self.tumour_mean, alpha.astype(np.float32))

    def _nests(self, xs: np.ndarray, ys: np.ndarray, d: float) -> np.ndarray:
        """Nest noise on the grid ``ys x xs``: tumour cells where it is high. An octave finer
        than two output pixels is replaced by its mean."""
        out = np.zeros((ys.size, xs.size))
        for k, (size_um, weight) in enumerate(_NEST_OCTAVES):
            size = size_um * self.px
            if size / d >= 2.0:
                out += weight * value_noise(self.seed * 23 + k, xs, ys, size)
            else:
                out += weight * 0.5
        return out

    def _track_tumour(
        self, i: int, inside: np.ndarray, x0: int, y0: int, rows: int, cols: int
    ) -> None:
        grow_bounds(self.stats["tumour_bounds"][i], inside, x0, y0, rows, cols)

    def _tumour_detail(
        self,
        light: np.ndarray,
        xs: np.ndarray,
        ys: np.ndarray,
        d: float,
        *,
        regions: list[dict[str, Any]] | None = None,
        force: bool = False,
    ) -> np.ndarray:
        """``light`` with the tumour cells drawn over it one by one (15 µm cells).

        ``force`` makes every cell a tumour cell (to measure the tumour's mean colour).
        """
        c = self.counter
        spacing = 15.0 * self.px
        cells = voronoi(self.seed * 29 + 7, xs, ys, spacing)
        lx, ly = cells.lattice_x, cells.lattice_y
        if force:
            is_tumour = np.ones(lx.shape, dtype=bool)
        else:
            # Which lattice squares hold tumour cells: inside a region, where the nest noise
            # is high enough (higher at the invasive front).
            cx = (lx[0] + 0.5) * spacing
            cy = (ly[:, 0] + 0.5) * spacing
            depth = np.full(lx.shape, -np.inf)
            for region in regions or ():
                depth = np.maximum(depth, blob_depth(region, cx, cy))
            nest = self._nests(cx, cy, 1.0)
            threshold = _NEST_THRESHOLD + _NEST_FRONT * np.clip(1.0 - depth / 0.3, 0.0, 1.0)
            is_tumour = (depth > 0) & (nest > threshold)
        is_tumour = is_tumour.ravel()

        def per_cell(stream: int) -> np.ndarray:
            """A uniform [0, 1) value per cell of the lattice window, flat."""
            return hash01(self.seed * 31 + stream, lx, ly).ravel().astype(np.float32)

        own = cells.index
        body = is_tumour[own].astype(np.float32)
        # Membranes: the cell's half of the boundary band with its neighbours.
        membrane_px = self.staining["membrane_um"] * self.px
        mem_cover = np.clip((membrane_px / 2.0 - cells.edge) / d + 0.5, 0.0, 1.0)
        mem_dab = np.zeros(lx.size, dtype=np.float32)
        complete = np.zeros(lx.size, dtype=np.float32)
        pick, strength = per_cell(1), per_cell(2)
        start = 0.0
        for share, amount, completeness in self.staining["membranes"]:
            chosen = (pick >= start) & (pick < start + share)
            mem_dab = np.where(chosen, amount * self.dab * (0.8 + 0.4 * strength), mem_dab)
            complete = np.where(chosen, completeness, complete)
            start += share
        mem_dab, complete = mem_dab[own], complete[own]
        # Incomplete membranes: arcs of the ring, about ``completeness`` of it.
        theta = np.arctan2(cells.dy, cells.dx)
        lobes = 1.0 + np.floor(2.0 * per_cell(3))[own]
        phase = 2.0 * math.pi * per_cell(4)[own]
        arc = np.sin(lobes * theta + phase) > np.cos(math.pi * complete)
        mem_cover = mem_cover * arc * (mem_dab > 0)
        cyto = np.exp(
            -((0.3 * c) * H + (0.15 * mem_dab)[:, :, None] * DAB + np.float32(0.1) * GREY)
        )
        mem = np.exp(-((0.3 * c) * H + mem_dab[:, :, None] * DAB + 0.1 * GREY))
        cell_light = lerp(cyto.astype(np.float32), mem.astype(np.float32), mem_cover)
        light = lerp(light, cell_light, body)

        # Nuclei: large, pleomorphic; a nucleus near its cell's edge spills over it, so
        # the neighbour across the nearest boundary is drawn too.
        radius = 4.3 * self.px * (0.8 + 0.4 * per_cell(5))
        elong = 1.0 + 0.4 * per_cell(6)
        phi = math.pi * per_cell(7)
        off_x = 1.2 * self.px * (2.0 * per_cell(8) - 1.0)
        off_y = 1.2 * self.px * (2.0 * per_cell(9) - 1.0)
        chromatin = 0.8 + 0.4 * per_cell(10)
        if self.mmr:
            share, amount = self.staining["tumour_nuclei"]
            positive = per_cell(11) < share
            nuc_h = np.where(positive, 0.35, 1.1) * c * chromatin
            nuc_dab = np.where(positive, amount * self.dab * (0.75 + 0.5 * per_cell(12)), 0.0)
        else:
            nuc_h = 1.1 * c * chromatin
            nuc_dab = np.zeros_like(nuc_h)

        def nucleus(index: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
            r = radius[index]
            e = np.sqrt(elong[index])
            cos, sin = np.cos(phi[index]), np.sin(phi[index])
            ex, ey = dx - off_x[index], dy - off_y[index]
            p = (ex * cos + ey * sin) / (r * e)
            q = (-ex * sin + ey * cos) / (r / e)
            cover = np.clip((1.0 - np.sqrt(p * p + q * q)) * (r / d) + 0.5, 0.0, 1.0)
            return cover * is_tumour[index]

        near = nucleus(own, cells.dx, cells.dy)
        across = nucleus(cells.index2, cells.dx2, cells.dy2)
        which = np.where(near >= across, own, cells.index2)
        h = nuc_h[which]
        if 1.5 * self.px / d >= 2.0:  # chromatin texture
            h = h * (0.8 + 0.4 * value_noise(self.seed * 37, xs, ys, 1.5 * self.px))
        colour = np.exp(-(h[:, :, None] * H + nuc_dab[which][:, :, None] * DAB))
        return lerp(light, colour.astype(np.float32), np.maximum(near, across))
