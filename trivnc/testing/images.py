"""Deterministic test pictures and a PSNR helper, shared by tests, benchmarks
and users' test suites."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

Pixels = npt.NDArray[np.uint8]


def photo_like(width: int, height: int, seed: int = 0) -> Pixels:
    """Smooth gradients plus mild noise, BGRX: what JPEG is for."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.zeros((height, width, 4), np.uint8)
    for c, (fx, fy, phase) in enumerate(rng.uniform(0.005, 0.03, (3, 3))):
        wave = 127 + 60 * np.sin(x * fx + phase * 50) + 50 * np.cos(y * fy + x * fy / 3)
        out[..., c] = np.clip(wave + rng.normal(0, 6, (height, width)), 0, 255).astype(np.uint8)
    return out


def desktop_like(width: int, height: int, seed: int = 0) -> Pixels:
    """A desktop: solid background, windows with title bars (gradients),
    text-like two-colour glyph rows, and a photo-like area, BGRX."""
    rng = np.random.default_rng(seed)
    out = np.empty((height, width, 4), np.uint8)
    out[...] = (96, 64, 32, 0)  # background
    for _ in range(max(2, width * height // 200_000)):
        w = int(rng.integers(width // 4, width // 2 + 1))
        h = int(rng.integers(height // 4, height // 2 + 1))
        x0 = int(rng.integers(0, max(1, width - w)))
        y0 = int(rng.integers(0, max(1, height - h)))
        out[y0 : y0 + h, x0 : x0 + w] = (240, 240, 240, 0)  # window body
        bar = min(20, h)
        ramp = np.linspace(120, 200, w, dtype=np.float32).astype(np.uint8)
        out[y0 : y0 + bar, x0 : x0 + w, 0] = ramp
        out[y0 : y0 + bar, x0 : x0 + w, 1] = ramp // 2
        out[y0 : y0 + bar, x0 : x0 + w, 2] = 40
        # Text: rows of 8x12 cells with random dark "glyph" pixels.
        for ty in range(y0 + bar + 4, y0 + h - 12, 16):
            glyphs = rng.random((12, w - 8)) < 0.22
            line = out[ty : ty + 12, x0 + 4 : x0 + w - 4]
            line[glyphs] = (20, 20, 20, 0)
    pw, ph = width // 3, height // 3
    out[height - ph :, width - pw :] = photo_like(pw, ph, seed + 1)
    return out


def psnr(a: npt.NDArray[np.uint8], b: npt.NDArray[np.uint8]) -> float:
    """Peak signal-to-noise ratio in dB (inf when equal)."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
