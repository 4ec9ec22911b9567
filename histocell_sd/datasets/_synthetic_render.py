"""Render the synthetic slide as H&E, block by block (Beer–Lambert mix of hematoxylin and eosin)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import cKDTree

from ._synthetic_cells import GRID_UM, Layout

FIBRE_WAVELENGTH_UM = 9.0
RBC_RADIUS_UM = 3.4
HEMATOXYLIN_GAIN = 1.6


@dataclass(frozen=True)
class Stain:
    """Optical densities per unit stain (rows H, E; columns R, G, B) and slide brightness."""

    vectors: np.ndarray
    background: np.ndarray
    eosin_scale: float


def random_stain(rng: np.random.Generator) -> Stain:
    """Stain vectors jittered around the usual H&E ones, so slides of different seeds differ in colour."""
    h = np.array([0.60, 0.75, 0.30]) + rng.normal(0, 0.04, 3)
    e = np.array([0.20, 0.80, 0.38]) + rng.normal(0, 0.04, 3)
    vectors = np.abs(np.vstack([h / np.linalg.norm(h), e / np.linalg.norm(e)]))
    return Stain(vectors=vectors, background=rng.uniform(0.92, 0.99, 3), eosin_scale=rng.uniform(0.8, 1.2))


def texture_bank(rng: np.random.Generator, mpp: float, size_um: float = 64.0, n: int = 16) -> np.ndarray:
    """Chromatin textures: smooth noise at a µm scale, unit variance."""
    size = int(np.ceil(size_um / mpp)) + 2
    bank = np.empty((n, size, size), dtype=np.float32)
    for i in range(n):
        fine = ndimage.gaussian_filter(rng.standard_normal((size, size)), 0.45 / mpp)
        coarse = ndimage.gaussian_filter(rng.standard_normal((size, size)), 1.1 / mpp)
        tex = fine / fine.std() + 0.7 * coarse / coarse.std()
        bank[i] = tex / tex.std()
    return bank


def _interp_matrix(coords: np.ndarray, n: int) -> np.ndarray:
    """Dense linear-interpolation weights (len(coords) × n) for sampling a grid at fractional coords."""
    coords = np.clip(coords, 0, n - 1)
    lo = np.floor(coords).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    w = (coords - lo).astype(np.float32)
    m = np.zeros((len(coords), n), dtype=np.float32)
    rows = np.arange(len(coords))
    m[rows, lo] += 1 - w
    m[rows, hi] += w
    return m


class BlockRenderer:
    """Renders any pixel window of one slide; windows tile seamlessly."""

    def __init__(self, layout: Layout, cells: pd.DataFrame, stain: Stain, mpp: float, seed: int):
        self.layout, self.cells, self.stain, self.mpp, self.seed = layout, cells, stain, mpp, seed
        self.textures = texture_bank(np.random.default_rng(seed + 1), mpp)
        self.cell_xy = cells[["x_um", "y_um"]].to_numpy() / mpp
        self.cell_reach = np.maximum(cells["major_um"].to_numpy() * cells["cytoplasm"].to_numpy() / 2 / mpp + 3, 4)
        self._records = cells.to_dict("records")
        self._cell_tree = cKDTree(self.cell_xy)
        self._fat_tree = cKDTree(layout.fat_seeds / mpp)

    def render(self, y0: int, y1: int, x0: int, x1: int, margin: int = 6) -> tuple[np.ndarray, np.ndarray]:
        """RGB uint8 (h, w, 3) and instance labels int32 (h, w) of pixel rows y0:y1, columns x0:x1."""
        ys = np.arange(y0 - margin, y1 + margin)
        xs = np.arange(x0 - margin, x1 + margin)
        fields = self._fields(ys, xs)
        hema, eosin = self._tissue(ys, xs, fields)
        labels = np.zeros((len(ys), len(xs)), dtype=np.int32)
        self._draw_cells(ys, xs, hema, eosin, labels)
        rng = np.random.default_rng([self.seed, y0, x0])
        rgb = self._to_rgb(hema, eosin, rng)
        crop = (slice(margin, margin + y1 - y0), slice(margin, margin + x1 - x0))
        return rgb[crop], labels[crop]

    def _fields(self, ys, xs) -> dict[str, np.ndarray]:
        lay = self.layout
        wy = _interp_matrix(ys * self.mpp / GRID_UM, lay.tissue.shape[0])
        wx = _interp_matrix(xs * self.mpp / GRID_UM, lay.tissue.shape[1])
        rows = np.flatnonzero(wy.any(axis=0))
        cols = np.flatnonzero(wx.any(axis=0))
        wy, wx = wy[:, rows], wx[:, cols]
        names = ("tissue", "fat", "lumen", "tumor", "immune", "fibre_stream", "loose")
        return {n: wy @ getattr(lay, n)[np.ix_(rows, cols)] @ wx.T for n in names}

    def _tissue(self, ys, xs, f) -> tuple[np.ndarray, np.ndarray]:
        mpp = self.mpp
        yy, xx = np.meshgrid(ys * mpp, xs * mpp, indexing="ij")
        wave = np.sin(2 * np.pi * f["fibre_stream"] / FIBRE_WAVELENGTH_UM)
        fibre = ((1 + wave) / 2) ** 1.5 * np.clip(0.7 + 0.4 * f["loose"], 0, 1.2)
        tissue = np.clip(f["tissue"], 0, 1)
        fat, lumen, tumor, immune = (np.clip(f[k], 0, 1) for k in ("fat", "lumen", "tumor", "immune"))
        stroma = np.clip(tissue - fat - lumen - tumor - immune, 0, 1)
        eosin = stroma * (0.2 + 0.4 * fibre) * np.clip(1 + 0.35 * f["loose"], 0.3, 1.5) + tumor * 0.30 + immune * 0.16 + lumen * 0.06 + fat * 0.02
        hema = tissue * (0.05 + 0.05 * immune) * (1 - fat) * (1 - lumen)
        eosin += fat * 0.45 * self._fat_membranes(yy, xx, fat > 0.01)
        self._draw_vessels(ys, xs, hema, eosin)
        return hema.astype(np.float32), eosin.astype(np.float32)

    def _fat_membranes(self, yy, xx, where) -> np.ndarray:
        out = np.zeros(yy.shape, dtype=np.float32)
        if not where.any() or len(self.layout.fat_seeds) < 2:
            return out
        pts = np.c_[xx[where], yy[where]] / self.mpp
        d, _ = self._fat_tree.query(pts, k=2)
        half_gap = (d[:, 1] - d[:, 0]) / 2 * self.mpp
        out[where] = np.exp(-(half_gap**2) / (2 * 0.7**2))
        return out

    def _draw_vessels(self, ys, xs, hema, eosin) -> None:
        mpp = self.mpp
        for v in self.layout.vessels.itertuples():
            cx, cy, r = v.x / mpp, v.y / mpp, (v.radius + 2) / mpp
            window = _window(cx, cy, r + 2, ys, xs)
            if window is None:
                continue
            sl, yy, xx = window
            d = np.hypot(xx - cx, yy - cy) * mpp
            inside = d < v.radius
            eosin[sl] = np.where(inside, 0.04, eosin[sl]) + 0.5 * np.exp(-((d - v.radius - 1.0) ** 2) / 1.0)
            hema[sl] = np.where(inside, 0.0, hema[sl])
            rng = np.random.default_rng(int(v.seed))
            n_rbc = rng.poisson(v.radius**2 / RBC_RADIUS_UM**2 * 0.5)
            ang, rad = rng.uniform(0, 2 * np.pi, n_rbc), v.radius * np.sqrt(rng.uniform(0, 0.8, n_rbc))
            for a, rr in zip(ang, rad):
                dr = np.hypot(xx - (cx + rr * np.cos(a) / mpp), yy - (cy + rr * np.sin(a) / mpp)) * mpp
                eosin[sl] += 0.9 * np.clip(RBC_RADIUS_UM - dr, 0, 1)

    def _draw_cells(self, ys, xs, hema, eosin, labels) -> None:
        centre = np.array([(xs[0] + xs[-1]) / 2, (ys[0] + ys[-1]) / 2])
        half = np.hypot(xs[-1] - xs[0], ys[-1] - ys[0]) / 2
        idx = np.sort(self._cell_tree.query_ball_point(centre, half + self.cell_reach.max()))
        for i in idx:
            self._draw_cell(int(i), ys, xs, hema, eosin, labels)

    def _draw_cell(self, i: int, ys, xs, hema, eosin, labels) -> None:
        c = self._records[i]
        mpp = self.mpp
        cx, cy = self.cell_xy[i]
        window = _window(cx, cy, self.cell_reach[i], ys, xs)
        if window is None:
            return
        sl, yy, xx = window
        a, b = c["major_um"] / 2 / mpp, c["minor_um"] / 2 / mpp
        cos, sin = np.cos(c["angle"]), np.sin(c["angle"])
        u = (xx - cx) * cos + (yy - cy) * sin
        v = -(xx - cx) * sin + (yy - cy) * cos
        rho = np.hypot(u / a, v / b)
        theta = np.arctan2(v / b, u / a)
        pert = 1 + sum(c[f"harm{k}"] * np.cos((k + 2) * theta + c[f"phase{k}"]) for k in range(3))
        pert -= c["kidney"] * np.exp(-((theta - np.pi / 2) ** 2) / 0.25)
        rho = rho / pert
        cyto = np.clip((c["cytoplasm"] - rho) * 2.0, 0, 1) * c["cytoplasm_eosin"]
        eosin[sl] = np.maximum(eosin[sl], cyto)
        mask = np.clip((1 - rho) * b + 0.5, 0, 1)
        if not (mask > 0).any():
            return
        seed = int(c["texture_seed"])
        tex = self.textures[seed % len(self.textures)]
        oy, ox = (seed // 16) % (tex.shape[0] - yy.shape[0] + 1), (seed // 4096) % (tex.shape[1] - yy.shape[1] + 1)
        texture = tex[oy : oy + yy.shape[0], ox : ox + yy.shape[1]]
        nucleus = c["darkness"] * (1 + c["texture"] * texture) * (1 - c["vesicular"] * (1 - 1.4 * np.clip(rho, 0, 1) ** 3))
        for k in range(int(c["n_nucleoli"])):
            r, phi = 0.45 * np.sqrt(((seed >> (3 * k)) % 97) / 97), 2 * np.pi * ((seed >> (5 * k + 2)) % 89) / 89
            d2 = (u / a - r * np.cos(phi)) ** 2 * a * a + (v / b - r * np.sin(phi)) ** 2 * b * b
            nucleus = nucleus + 0.9 * np.exp(-d2 * mpp * mpp / (2 * 0.45**2))
        hema[sl] = np.maximum(hema[sl], np.clip(nucleus, 0.05, 2.5) * mask)
        own = (mask > 0.5) & (labels[sl] == 0)
        labels[sl][own] = i + 1

    def _to_rgb(self, hema, eosin, rng) -> np.ndarray:
        sigma = 0.3 / self.mpp
        hema = ndimage.gaussian_filter(hema, sigma)
        eosin = ndimage.gaussian_filter(eosin * self.stain.eosin_scale, sigma)
        od = HEMATOXYLIN_GAIN * hema[..., None] * self.stain.vectors[0] + eosin[..., None] * self.stain.vectors[1]
        od += rng.normal(0, 0.025, od.shape).astype(np.float32)
        rgb = 255 * self.stain.background * np.exp(-od)
        return np.clip(rgb, 0, 255).astype(np.uint8)


def _window(cx: float, cy: float, reach: float, ys: np.ndarray, xs: np.ndarray):
    """Slice of the block around a point and the pixel coordinates inside it, or None if outside."""
    r0, r1 = max(int(np.floor(cy - reach)) - ys[0], 0), min(int(np.ceil(cy + reach)) + 1 - ys[0], len(ys))
    c0, c1 = max(int(np.floor(cx - reach)) - xs[0], 0), min(int(np.ceil(cx + reach)) + 1 - xs[0], len(xs))
    if r0 >= r1 or c0 >= c1:
        return None
    yy, xx = np.meshgrid(ys[r0:r1].astype(np.float32), xs[c0:c1].astype(np.float32), indexing="ij")
    return (slice(r0, r1), slice(c0, c1)), yy, xx
