"""Weighted Brovey pansharpening: numpy in, numpy out, masks carried through.

Method (the "weighted Brovey" of GDAL's ``VRTPansharpenedDataset`` / ``gdal_pansharpen``,
whose ``<AlgorithmOptions><Weights>`` are the ``w_i`` below). With the multispectral bands
``ms_i`` already resampled to the pan grid and per-band weights ``w_i``::

    pan_synth = sum_i w_i * ms_i          # what the pan would be if it were as blurry as the MS
    out_i     = ms_i * pan / pan_synth    # each band scaled by the same per-pixel factor

Every band of a pixel is multiplied by the *same* factor ``pan / pan_synth``, so

    out_i / out_j == ms_i / ms_j          (exactly, before rounding to an integer dtype)

and the spectral angle between ``out`` and ``ms`` is zero: Brovey changes the brightness of
a pixel, never its colour. All the spatial detail comes from the pan; all the colour from the
upsampled MS. If the weights are right (``pan == sum_i w_i * truth_i``) and the colour does
not vary inside an MS pixel, the result is the high-resolution truth; where it does vary
(edges between different materials) the colour stays as blurred as the MS. With wrong
weights the factor is biased per material (it is ``(w . c) / (w' . c)`` on a surface of
colour ``c``), which shows up as a colour-dependent brightness error. The pan carries
little NIR (the SPOT 6/7 pan stops at 745 nm), so the NIR band gets visible-light detail,
wrong where NIR and visible brightness disagree (vegetation/soil edges): on the synthetic
scene of ``tests/test_pansharpen.py`` the visible RMSE drops 2.8-30x but the NIR's rises 1.7x.

Pixels are invalid (masked, filled with ``nodata``) where any MS band or the pan is masked or
not finite, or where ``pan_synth <= 0`` (no division by zero; GDAL writes 0 or nodata there).
Integer outputs are rounded and clipped to ``[dtype min, max_value]``, so a uint16 never
wraps; ratios are then exact up to the rounding (and broken only where a band saturates).

Weights (``SENSOR_WEIGHTS``) are *estimates*, not vendor figures: we found no published
pansharpening weights for SPOT 6/7 or Pléiades. They are the spectral overlap (nm) of each MS
band with the pan band, normalised to sum to 1, from the band edges published by DINAMIS
(SPOT 6/7: https://dinamis.data-terra.org/en/spot-6-7-imagery ; PAN 450-745, B0 450-520,
B1 530-590, B2 625-695, B3 760-890 nm) and by the Pléiades product documentation as quoted by
CATALYST (https://catalyst.earth/catalyst-system-files/help/references/gdb_r/Pleiades.html ;
PAN 470-830, B0 430-550, B1 500-620, B2 590-710, B3 740-940 nm). They ignore the spectral
response shapes and, more importantly, the DN calibration gains of each band, which scale
``pan_synth`` relative to ``pan``: on real DN products prefer ``fit_weights`` on the scene.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

import numpy as np

from tiler.errors import InvalidPansharpenParameters

#: Band edges in nm: (pan, (blue, green, red, nir)), from the sources in the module docstring.
BAND_EDGES: dict[str, tuple[tuple[float, float], tuple[tuple[float, float], ...]]] = {
    "spot67": ((450, 745), ((450, 520), (530, 590), (625, 695), (760, 890))),
    "pleiades": ((470, 830), ((430, 550), (500, 620), (590, 710), (740, 940))),
}


def overlap_weights(pan: tuple[float, float], bands: Sequence[tuple[float, float]]) -> tuple[float, ...]:
    """Weights proportional to each band's spectral overlap with the pan band, summing to 1."""
    overlaps = [max(0.0, min(hi, pan[1]) - max(lo, pan[0])) for lo, hi in bands]
    return tuple(round(o / sum(overlaps), 4) for o in overlaps)


SPOT67_WEIGHTS = overlap_weights(*BAND_EDGES["spot67"])  # (0.35, 0.3, 0.35, 0.0)
PLEIADES_WEIGHTS = overlap_weights(*BAND_EDGES["pleiades"])  # (0.1951, 0.2927, 0.2927, 0.2195)

#: Default (blue, green, red, nir) weights by normalised STAC ``platform`` (see `sensor_weights`).
SENSOR_WEIGHTS: dict[str, tuple[float, ...]] = {
    "spot6": SPOT67_WEIGHTS,
    "spot7": SPOT67_WEIGHTS,
    "pleiades1a": PLEIADES_WEIGHTS,
    "pleiades1b": PLEIADES_WEIGHTS,
    "phr1a": PLEIADES_WEIGHTS,
    "phr1b": PLEIADES_WEIGHTS,
}


def _platform_key(platform: str) -> str:
    ascii_ = unicodedata.normalize("NFKD", platform).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]", "", ascii_.lower())


def sensor_weights(platform: str) -> tuple[float, ...]:
    """Default (blue, green, red, nir) weights for a platform: "spot-6", "SPOT 7", "pleiades-1a"...

    Raises:
        InvalidPansharpenParameters: unknown platform.

    """
    try:
        return SENSOR_WEIGHTS[_platform_key(platform)]
    except KeyError:
        raise InvalidPansharpenParameters(
            f"No default pansharpening weights for platform {platform!r}; pass weights explicitly."
        ) from None


def _as_masked(arr: np.ndarray, mask: np.ndarray | None, ndim: int, name: str) -> np.ma.MaskedArray:
    """``arr`` as a float64 masked array of ``ndim`` dims, ``mask`` (True = invalid) OR-ed in."""
    out = np.ma.masked_invalid(np.ma.asarray(arr, dtype="float64"), copy=False)
    if out.ndim != ndim:
        raise InvalidPansharpenParameters(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    if mask is not None:
        try:
            extra = np.broadcast_to(np.asarray(mask, dtype=bool), out.shape)
        except ValueError:
            raise InvalidPansharpenParameters(
                f"{name} mask of shape {np.shape(mask)} does not fit {name} of shape {out.shape}"
            ) from None
        out = np.ma.MaskedArray(out.data, mask=np.ma.getmaskarray(out) | extra)
    return out


def _check_weights(weights: Sequence[float], nbands: int) -> np.ndarray:
    w = np.asarray(weights, dtype="float64")
    if w.shape != (nbands,):
        raise InvalidPansharpenParameters(f"{nbands} weights expected (one per MS band), got {len(w)}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise InvalidPansharpenParameters(f"weights must be finite, >= 0 and not all 0, got {list(weights)}")
    return w


def brovey(
    ms: np.ndarray,
    pan: np.ndarray,
    weights: Sequence[float],
    *,
    mask: np.ndarray | None = None,
    pan_mask: np.ndarray | None = None,
    dtype: str | np.dtype | None = None,
    max_value: float | None = None,
    nodata: float = 0,
) -> np.ma.MaskedArray:
    """Weighted Brovey pansharpening of MS bands already on the pan grid.

    Args:
        ms: (bands, H, W) multispectral bands resampled to the pan grid, any numeric dtype;
            a `numpy.ma.MaskedArray` (e.g. rio-tiler's ``ImageData.array``) keeps its mask.
        pan: (H, W) or (1, H, W) panchromatic band, masked array or not.
        weights: one weight >= 0 per MS band (see `sensor_weights`, `fit_weights`).
        mask: extra MS mask, (H, W) or (bands, H, W), True = invalid (numpy.ma convention).
        pan_mask: extra pan mask, (H, W), True = invalid.
        dtype: output dtype; default the dtype of ``ms`` (uint16 stays uint16).
        max_value: clip ceiling, e.g. 4095 for 12-bit data; default the dtype maximum for
            integers, none for floats.
        nodata: value written under the mask; a valid integer result equal to it is moved
            one step away (as GDAL does), so ``nodata`` alone also identifies the mask.

    Returns:
        (bands, H, W) masked array of ``dtype``; a pixel is masked in every band when it is
        masked in any MS band or the pan, or when ``sum(w_i * ms_i) <= 0``.

    Raises:
        InvalidPansharpenParameters: bad weights or mismatched shapes.

    """
    out_dtype = np.dtype(dtype if dtype is not None else np.asarray(ms).dtype)
    pan_arr = pan[0] if np.ndim(pan) == 3 and np.shape(pan)[0] == 1 else pan
    m = _as_masked(ms, mask, 3, "ms")
    p = _as_masked(pan_arr, pan_mask, 2, "pan")
    if m.shape[1:] != p.shape:
        raise InvalidPansharpenParameters(
            f"ms {m.shape[1:]} and pan {p.shape} must be on the same grid (resample the MS first)"
        )
    w = _check_weights(weights, m.shape[0])

    data = m.filled(0.0)
    synth = np.tensordot(w, data, axes=1)
    invalid = np.ma.getmaskarray(m).any(axis=0) | np.ma.getmaskarray(p) | ~(synth > 0)
    factor = np.divide(p.filled(0.0), synth, out=np.zeros_like(synth), where=~invalid)
    out = data * factor

    if out_dtype.kind in "ui":
        info = np.iinfo(out_dtype)
        hi = info.max if max_value is None else min(max_value, info.max)
        out = np.clip(np.rint(out), info.min, hi)
        if info.min <= nodata <= info.max:
            bumped = nodata + 1 if nodata == info.min else nodata - 1
            out[out == nodata] = bumped
    elif max_value is not None:
        out = np.minimum(out, max_value)
    out[:, invalid] = nodata
    full_mask = np.broadcast_to(invalid, out.shape).copy()
    return np.ma.MaskedArray(out.astype(out_dtype), mask=full_mask, fill_value=nodata)


def upsample(
    ms: np.ndarray, ratio: int, method: str = "bilinear", mask: np.ndarray | None = None
) -> np.ma.MaskedArray:
    """Resample (bands, h, w) to (bands, h*ratio, w*ratio) on a grid sharing its pixel edges.

    For tests and offline use: in the tiler, rio-tiler reads the MS directly on the pan tile's
    grid. Pixel centres are interpolated between MS pixel centres; at the borders the edge
    pixel is repeated. An output pixel is masked if any MS pixel it draws on (with a non-zero
    weight) is masked.

    Args:
        ms: multispectral bands, masked array or not.
        ratio: integer resolution ratio (4 for SPOT 6/7 and Pléiades).
        method: "bilinear" or "nearest".
        mask: extra mask, (h, w) or (bands, h, w), True = invalid.

    Returns:
        float64 masked array.

    """
    if int(ratio) != ratio or ratio < 1:
        raise InvalidPansharpenParameters(f"ratio must be a positive integer, got {ratio}")
    ratio = int(ratio)
    m = _as_masked(ms, mask, 3, "ms")
    data, msk = m.filled(0.0), np.ma.getmaskarray(m)
    if method == "nearest":
        data = data.repeat(ratio, axis=1).repeat(ratio, axis=2)
        msk = msk.repeat(ratio, axis=1).repeat(ratio, axis=2)
        return np.ma.MaskedArray(data, mask=msk)
    if method != "bilinear":
        raise InvalidPansharpenParameters(f"method must be 'bilinear' or 'nearest', got {method!r}")
    for axis in (1, 2):
        n = data.shape[axis]
        u = (np.arange(n * ratio) + 0.5) / ratio - 0.5  # output centres in input pixel units
        i0 = np.floor(u).astype("int64")
        t = u - i0
        lo, hi = np.clip(i0, 0, n - 1), np.clip(i0 + 1, 0, n - 1)
        shape = [1, 1, 1]
        shape[axis] = -1
        t = t.reshape(shape)
        data = (1 - t) * data.take(lo, axis=axis) + t * data.take(hi, axis=axis)
        msk = msk.take(lo, axis=axis) | (msk.take(hi, axis=axis) & (t > 0))
    return np.ma.MaskedArray(data, mask=msk)


def fit_weights(ms: np.ndarray, pan: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, ...]:
    """Non-negative least-squares weights ``w`` with ``pan ~= sum_i w_i * ms_i`` on valid pixels.

    Fit on the MS grid: ``pan`` averaged to the MS resolution (e.g. read with resampling
    "average" at the MS size), so that both see the same blur. Negative coefficients are
    dropped one at a time (most negative first) and the rest refitted: a simple active-set
    heuristic, not a general NNLS solver, enough for 3-4 bands. On a scene with few
    materials the weights are not unique (the MS spectra span fewer than 4 directions);
    any solution gives the same ``pan_synth`` on that scene, which is all `brovey` uses.

    Args:
        ms: (bands, h, w) multispectral bands, masked array or not.
        pan: (h, w) or (1, h, w) pan averaged to the same grid.
        mask: extra mask, True = invalid.

    Returns:
        One weight per band.

    Raises:
        InvalidPansharpenParameters: shapes differ or fewer valid pixels than bands.

    """
    pan_arr = pan[0] if np.ndim(pan) == 3 and np.shape(pan)[0] == 1 else pan
    m = _as_masked(ms, mask, 3, "ms")
    p = _as_masked(pan_arr, None, 2, "pan")
    if m.shape[1:] != p.shape:
        raise InvalidPansharpenParameters(f"ms {m.shape[1:]} and pan {p.shape} must be on the same grid")
    valid = ~(np.ma.getmaskarray(m).any(axis=0) | np.ma.getmaskarray(p))
    a = m.data[:, valid].T
    b = p.data[valid]
    if len(b) < m.shape[0]:
        raise InvalidPansharpenParameters("not enough valid pixels to fit the weights")
    active = list(range(m.shape[0]))
    w = np.zeros(m.shape[0])
    while active:
        sol = np.linalg.lstsq(a[:, active], b, rcond=None)[0]
        if np.all(sol >= 0):
            w[active] = sol
            break
        del active[int(np.argmin(sol))]
    return tuple(float(x) for x in w)
