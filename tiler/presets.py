"""Band presets: named band combinations resolved by ``eo:bands`` common names.

A preset is data: the built-in catalogue (``presets.yaml``) or a STAC ``renders`` entry
(render extension) of a collection or an item, which replaces a built-in preset of the same
name. `Preset.resolve` turns a preset into titiler's tile parameters for a band layout (the
``eo:bands`` of an item's assets, or of a collection's ``item_assets``):

* ``bands: [red, green, blue]`` becomes ``assets=ms|bands=red,green,blue``: rio-tiler looks
  each common name up again in every item it reads, so a product that stores its bands in
  another order renders the same;
* ``expression: (nir - red) / (nir + red)`` becomes ``assets=ms|bands=nir,red`` and
  ``expression=(b1 - b2) / (b1 + b2)``;
* ``pansharpen`` becomes a `PansharpenSpec` that the readers (`tiler.reader`) apply per item.

Resolution needs no I/O; looking up layouts, renders and stretches in pgstac is done (and
cached) by `tiler.dependencies`.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml
from titiler.extensions.render import _adapt_render_for_v2

from tiler.errors import InvalidPreset, PresetNotFound
from tiler.pansharpen import _platform_key
from tiler.stats import stretch_range

if TYPE_CHECKING:
    import pystac

CATALOGUE_FILE = Path(__file__).with_name("presets.yaml")

#: Order in which MS bands are read for pansharpening (weights are given by name).
MS_ORDER = ("coastal", "blue", "green", "yellow", "red", "rededge", "nir", "nir08", "nir09")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_RENDER_KEYS = {
    "title",
    "description",
    "assets",
    "asset_bidx",
    "bands",
    "expression",
    "rescale",
    "nodata",
    "colormap_name",
    "colormap",
    "color_formula",
    "resampling",
    "minmax_zoom",
    "pansharpen",
    "tilematrixsets",
    "thumbnail",
    "links",
}
#: Keys of a comparison preset (two dates): ``kind`` and ``of`` (the single-date preset compared).
_COMPARISON_KEYS = {"title", "description", "kind", "of", "rescale", "colormap_name", "colormap"}
#: How a comparison combines its two dates: ``difference`` is after minus before, band by band.
COMPARISON_KINDS = ("difference",)


def common_name(band: Mapping[str, Any]) -> str | None:
    """The common name of an ``eo:bands``/``bands`` entry (STAC 1.0 or 1.1 spelling)."""
    name = band.get("eo:common_name") or band.get("common_name")
    return str(name) if name else None


def band_layout(assets: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """``{common_name: asset key}`` for the assets (item ``assets`` or collection ``item_assets``).

    When two assets carry the same band (an MS bundle and a single-band copy, say), the
    asset with more bands wins, so that one read serves several bands.
    """
    layout: dict[str, tuple[str, int]] = {}
    for key, asset in assets.items():
        bands = asset.get("eo:bands") or asset.get("bands") or []
        for band in bands:
            name = common_name(band)
            if name and (name not in layout or len(bands) > layout[name][1]):
                layout[name] = (key, len(bands))
    return {name: key for name, (key, _) in layout.items()}


def _group(names: Sequence[str], layout: Mapping[str, str]) -> list[str]:
    """Titiler asset strings reading ``names`` in order, consecutive bands of one asset together."""
    missing = [n for n in names if n not in layout]
    if missing:
        raise PresetNotApplicable(
            f"no asset has the band(s) {', '.join(missing)} (bands here: {', '.join(sorted(layout)) or 'none'})"
        )
    groups: list[tuple[str, list[str]]] = []
    for n in names:
        if groups and groups[-1][0] == layout[n]:
            groups[-1][1].append(n)
        else:
            groups.append((layout[n], [n]))
    return [f"{asset}|bands={','.join(bands)}" for asset, bands in groups]


class PresetNotApplicable(InvalidPreset):
    """The data lacks a band the preset needs."""


@dataclass(frozen=True)
class PansharpenSpec:
    """What a reader needs to pansharpen one item (hashable: it travels as a read option).

    Attributes:
        ms: titiler asset strings reading ``ms_bands`` in that order.
        ms_bands: MS common names read (the output bands and every band with a weight).
        output: positions in ``ms_bands`` of the output bands, in output order.
        pan: titiler asset string of the pan band.
        weights: ``((platform key, weights aligned with ms_bands), ...)``; key ``*`` for any.

    """

    ms: tuple[str, ...]
    ms_bands: tuple[str, ...]
    output: tuple[int, ...]
    pan: str
    weights: tuple[tuple[str, tuple[float, ...]], ...]

    def weights_for(self, platform: str | None) -> tuple[float, ...] | None:
        """Weights for an item's ``platform`` (then ``*``), or None."""
        table = dict(self.weights)
        if platform and (w := table.get(_platform_key(platform))):
            return w
        return table.get("*")


@dataclass(frozen=True)
class Resolved:
    """A preset's tile parameters for one band layout (titiler query-parameter values)."""

    name: str
    assets: tuple[str, ...]
    expression: str | None = None
    rescale: tuple[tuple[float, float], ...] | None = None
    colormap_name: str | None = None
    colormap: str | None = None
    color_formula: str | None = None
    resampling: str | None = None
    pansharpen: PansharpenSpec | None = None
    #: common names of the output bands (for a collection stretch), None for expressions
    output_bands: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Preset:
    """A named band combination (built-in, or from STAC ``renders``)."""

    name: str
    title: str
    source: str = "builtin"  # builtin | collection | item
    description: str | None = None
    bands: tuple[str, ...] | None = None
    expression: str | None = None
    assets: tuple[str, ...] | None = None  # titiler asset strings (STAC renders by asset name)
    rescale: tuple[tuple[float, float], ...] | None = None
    colormap_name: str | None = None
    colormap: str | None = None  # JSON
    color_formula: str | None = None
    resampling: str | None = None
    minmax_zoom: tuple[int, int] | None = None
    pansharpen: Mapping[str, Any] | None = field(default=None, hash=False, compare=False)
    #: comparison presets (two dates): how they combine (`COMPARISON_KINDS`) and the preset compared
    kind: str | None = None
    of: str | None = None

    @property
    def is_comparison(self) -> bool:
        """True for a preset over two dates (served by ``/compare``), not one item or mosaic."""
        return self.kind is not None

    @classmethod
    def from_mapping(cls, name: str, data: Mapping[str, Any], source: str) -> Preset:
        """Build from a catalogue entry or a STAC render; raise `InvalidPreset` if unusable."""
        if not isinstance(data, Mapping):
            raise InvalidPreset(f"preset {name!r}: expected an object")
        values: dict[str, Any] = copy.deepcopy(dict(data))
        if "kind" in values:
            return cls._comparison(name, values, source)
        unknown = set(values) - _RENDER_KEYS
        if unknown:
            raise InvalidPreset(f"preset {name!r}: unknown key(s) {', '.join(sorted(unknown))}")
        _adapt_render_for_v2(values)  # asset_bidx -> assets=ms|bidx=...
        bands = values.get("bands")
        assets = values.get("assets")
        expression = values.get("expression")
        if bands is not None and (
            not isinstance(bands, list) or not bands or not all(isinstance(b, str) for b in bands)
        ):
            raise InvalidPreset(f"preset {name!r}: `bands` must be a list of common names")
        if not (bands or assets or expression):
            raise InvalidPreset(f"preset {name!r}: needs `bands`, `assets` or `expression`")
        if values.get("pansharpen") is not None and not bands:
            raise InvalidPreset(f"preset {name!r}: `pansharpen` needs `bands`")
        bad = f"preset {name!r}: bad `rescale` or `minmax_zoom`"
        styling = _styling(values, bad)
        try:
            zooms = values.get("minmax_zoom")
            zooms_t = (int(zooms[0]), int(zooms[1])) if zooms else None
        except (TypeError, ValueError):
            raise InvalidPreset(bad) from None
        return cls(
            name=name,
            title=str(values.get("title") or name),
            source=source,
            description=values.get("description"),
            bands=tuple(bands) if bands else None,
            expression=expression,
            assets=tuple(assets) if assets and not bands else None,
            **styling,
            color_formula=values.get("color_formula"),
            resampling=values.get("resampling"),
            minmax_zoom=zooms_t,
            pansharpen=values.get("pansharpen"),
        )

    @classmethod
    def _comparison(cls, name: str, values: dict[str, Any], source: str) -> Preset:
        unknown = set(values) - _COMPARISON_KEYS
        if unknown:
            raise InvalidPreset(f"comparison preset {name!r}: unknown key(s) {', '.join(sorted(unknown))}")
        if values["kind"] not in COMPARISON_KINDS:
            raise InvalidPreset(
                f"comparison preset {name!r}: `kind` must be one of {', '.join(COMPARISON_KINDS)}"
            )
        if not isinstance(values.get("of"), str) or not values["of"]:
            raise InvalidPreset(f"comparison preset {name!r}: `of` must name the preset compared")
        return cls(
            name=name,
            title=str(values.get("title") or name),
            source=source,
            description=values.get("description"),
            **_styling(values, f"comparison preset {name!r}: bad `rescale`"),
            kind=values["kind"],
            of=values["of"],
        )

    @property
    def needs(self) -> tuple[str, ...]:
        """Common names this preset reads (empty for presets given by asset name)."""
        if self.assets:
            return ()
        names = list(self.bands or ())
        if self.expression and not self.bands:
            names = _expression_names(self.expression)
        if self.pansharpen is not None:
            names.append(str(self.pansharpen.get("pan", "pan")))
        return tuple(names)

    def applies_to(self, layout: Mapping[str, str], asset_keys: Iterable[str] = ()) -> bool:
        """True if every band (or asset) it reads exists in ``layout``/``asset_keys`` (never for a comparison)."""
        if self.is_comparison:
            return False
        if self.assets:
            keys = set(asset_keys)
            return all(a.split("|", 1)[0] in keys for a in self.assets)
        return all(n in layout for n in self.needs)

    def resolve(self, layout: Mapping[str, str]) -> Resolved:
        """Tile parameters for ``layout`` (``{common_name: asset}``); `PresetNotApplicable` if a band is missing."""
        if self.is_comparison:
            raise InvalidPreset(_two_dates(self.name))
        common = {
            "name": self.name,
            "rescale": self.rescale,
            "colormap_name": self.colormap_name,
            "colormap": self.colormap,
            "color_formula": self.color_formula,
            "resampling": self.resampling,
        }
        if self.assets:
            return Resolved(assets=self.assets, expression=self.expression, **common)
        if self.pansharpen is not None:
            assert self.bands
            return Resolved(
                assets=(),
                pansharpen=_pansharpen_spec(self.name, self.bands, self.pansharpen, layout),
                output_bands=self.bands,
                **common,
            )
        if self.bands:
            names = list(self.bands)
            return Resolved(
                assets=tuple(_group(names, layout)),
                expression=_rewrite(self.expression, names) if self.expression else None,
                output_bands=self.bands if not self.expression else None,
                **common,
            )
        assert self.expression
        names = _expression_names(self.expression)
        return Resolved(
            assets=tuple(_group(names, layout)), expression=_rewrite(self.expression, names), **common
        )

    def describe(self) -> dict[str, Any]:
        """JSON description for ``/presets`` listings."""
        out: dict[str, Any] = {"name": self.name, "title": self.title, "source": self.source}
        for key in (
            "description",
            "bands",
            "expression",
            "assets",
            "colormap_name",
            "color_formula",
            "kind",
            "of",
        ):
            if (value := getattr(self, key)) is not None:
                out[key] = list(value) if isinstance(value, tuple) else value
        if self.rescale:
            out["rescale"] = [list(r) for r in self.rescale]
        if self.minmax_zoom:
            out["minmax_zoom"] = list(self.minmax_zoom)
        if self.pansharpen is not None:
            out["pansharpen"] = {"method": "weighted-brovey", **dict(self.pansharpen)}
        return out


def _styling(values: Mapping[str, Any], bad: str) -> dict[str, Any]:
    """The ``rescale``, ``colormap_name`` and ``colormap`` fields of a preset entry.

    ``rescale`` becomes float pairs and a ``colormap`` object its JSON text; a malformed
    ``rescale`` raises `InvalidPreset` with the message ``bad``.
    """
    rescale = values.get("rescale")
    try:
        rescale_t = tuple((float(lo), float(hi)) for lo, hi in rescale) if rescale else None
    except (TypeError, ValueError):
        raise InvalidPreset(bad) from None
    cmap = values.get("colormap")
    return {
        "rescale": rescale_t,
        "colormap_name": values.get("colormap_name"),
        "colormap": json.dumps(cmap) if isinstance(cmap, dict | list) else cmap,
    }


def _two_dates(name: str) -> str:
    return f"preset {name!r} compares two dates: use it on /compare/... (two items of a collection, or two searches)"


def _expression_names(expression: str) -> list[str]:
    """Common names in an expression, in order of first use (numpy functions excluded)."""
    seen: list[str] = []
    for token in _NAME.findall(expression):
        if token in KNOWN_NAMES and token not in seen:
            seen.append(token)
    if not seen:
        raise InvalidPreset(f"expression {expression!r} names no band")
    return seen


def _rewrite(expression: str, names: Sequence[str]) -> str:
    """Replace common names by ``b1..bN`` (their position in ``names``)."""
    index = {n: f"b{i}" for i, n in enumerate(names, start=1)}
    return _NAME.sub(lambda m: index.get(m.group(0), m.group(0)), expression)


def _pansharpen_spec(
    preset: str, bands: Sequence[str], options: Mapping[str, Any], layout: Mapping[str, str]
) -> PansharpenSpec:
    pan_name = str(options.get("pan", "pan"))
    table = options.get("weights") or {}
    if not isinstance(table, Mapping) or not table:
        raise InvalidPreset(f"preset {preset!r}: `pansharpen.weights` must map platforms to weights")
    weighted: set[str] = set()
    for platform, w in table.items():
        if not isinstance(w, Mapping) or not all(isinstance(v, int | float) and v >= 0 for v in w.values()):
            raise InvalidPreset(f"preset {preset!r}: weights for {platform!r} must be {{band: number >= 0}}")
        weighted |= {b for b, v in w.items() if v > 0}
    wanted = set(bands) | weighted
    ms_bands = [b for b in MS_ORDER if b in wanted] + sorted(wanted - set(MS_ORDER))
    ms_bands = [b for b in ms_bands if b in layout or b in bands]  # weighted bands absent here are skipped
    ms = _group(ms_bands, layout)
    (pan,) = _group([pan_name], layout)
    weights = []
    for platform, w in table.items():
        key = "*" if platform == "*" else _platform_key(str(platform))
        weights.append((key, tuple(float(w.get(b, 0.0)) for b in ms_bands)))
    return PansharpenSpec(
        ms=tuple(ms),
        ms_bands=tuple(ms_bands),
        output=tuple(ms_bands.index(b) for b in bands),
        pan=pan,
        weights=tuple(weights),
    )


#: Band common names of the STAC eo extension (and ``pan``), as used in expressions.
KNOWN_NAMES = frozenset(
    {
        "coastal",
        "blue",
        "green",
        "yellow",
        "red",
        "rededge",
        "nir",
        "nir08",
        "nir09",
        "cirrus",
        "swir16",
        "swir22",
        "lwir",
        "lwir11",
        "lwir12",
        "pan",
    }
)


def parse_catalogue(data: Mapping[str, Any], source: str) -> dict[str, Preset]:
    """Presets of a catalogue or a ``renders`` object, in document order."""
    return {str(name): Preset.from_mapping(str(name), value, source) for name, value in data.items()}


@cache
def _catalogue() -> dict[str, Preset]:
    return parse_catalogue(yaml.safe_load(CATALOGUE_FILE.read_text()), "builtin")


def builtin() -> dict[str, Preset]:
    """The built-in single-date presets (``presets.yaml``)."""
    return {n: p for n, p in _catalogue().items() if not p.is_comparison}


def comparisons() -> dict[str, Preset]:
    """The built-in comparison presets (``presets.yaml`` entries with a ``kind``), served by ``/compare``."""
    return {n: p for n, p in _catalogue().items() if p.is_comparison}


def merged(
    collection_renders: Mapping[str, Any] | None = None, item_renders: Mapping[str, Any] | None = None
) -> dict[str, Preset]:
    """Built-in presets, replaced or extended by collection then item ``renders`` of the same name.

    A render that cannot be used (unknown keys, no band) is skipped, never fatal: renders
    are provider data. Comparisons are built-in only: a render with a ``kind`` is skipped.
    """
    out = dict(builtin())
    for source, renders in (("collection", collection_renders), ("item", item_renders)):
        for name, value in (renders or {}).items():
            try:
                preset = Preset.from_mapping(str(name), value, source)
            except InvalidPreset:
                continue
            if not preset.is_comparison:
                out[str(name)] = preset
    return out


def applicable(
    presets: Mapping[str, Preset], layout: Mapping[str, str], asset_keys: Iterable[str]
) -> dict[str, Preset]:
    """The presets whose bands (or assets) exist in the data, in order."""
    keys = list(asset_keys)
    return {name: p for name, p in presets.items() if p.applies_to(layout, keys)}


def get(presets: Mapping[str, Preset], name: str) -> Preset:
    """One preset by name; `PresetNotFound` (404) lists the available ones."""
    try:
        return presets[name]
    except KeyError:
        if name in comparisons():
            raise InvalidPreset(_two_dates(name)) from None
        raise PresetNotFound(
            f"Unknown preset {name!r}; available here: {', '.join(presets) or 'none'}"
        ) from None


def stretch_by_band(
    assets_of_items: Sequence[dict[str, dict]], layout: dict[str, str]
) -> dict[str, tuple[float, float]]:
    """Per band common name, the median of the items' stored ``percentile_2`` and ``percentile_98``.

    Only the asset ``layout`` reads each band from counts (a quicklook's 8-bit red is not the
    multispectral red).
    """
    lows: dict[str, list[float]] = {}
    highs: dict[str, list[float]] = {}
    for assets in assets_of_items:
        for key, asset in assets.items():
            bands = asset.get("eo:bands") or asset.get("bands") or []
            stretch = stretch_range(asset.get("raster:bands")) or []
            for band, (lo, hi) in zip(bands, stretch, strict=False):
                if (name := common_name(band)) and layout.get(name) == key:
                    lows.setdefault(name, []).append(lo)
                    highs.setdefault(name, []).append(hi)
    return {n: (float(np.median(lows[n])), float(np.median(highs[n]))) for n in lows}


@dataclass(frozen=True)
class PresetContext:
    """The presets of the data a request reads, and what resolving them needs."""

    presets: dict[str, Preset]
    layout: dict[str, str]
    asset_keys: tuple[str, ...]
    collections: tuple[str, ...]
    mosaic: bool
    #: the item's assets (items) or the collections' item_assets (mosaics)
    assets: dict[str, dict] = field(default_factory=dict)
    item: pystac.Item | None = None
    #: key of a georeferenced quicklook asset (role ``overview``, with eo:bands), if any
    quicklook: str | None = None

    @property
    def available(self) -> dict[str, Preset]:
        """Presets whose bands exist here, in catalogue order (the first is the default)."""
        return applicable(self.presets, self.layout, self.asset_keys)


def item_context(
    item: pystac.Item, collection_renders: Mapping[str, Any] | None = None, collection_id: str | None = None
) -> PresetContext:
    """Presets of one item: the built-in ones, its collection's ``renders``, then its own (no I/O)."""
    assets = {k: a.to_dict() for k, a in item.assets.items()}
    ql = quicklook_key(assets)
    return PresetContext(
        presets=merged(collection_renders, item.properties.get("renders")),
        layout=band_layout({k: a for k, a in assets.items() if k != ql}),
        asset_keys=tuple(assets),
        collections=(collection_id,) if collection_id else (),
        mosaic=False,
        assets=assets,
        item=item,
        quicklook=ql,
    )


def quicklook_key(assets: dict[str, dict]) -> str | None:
    """The asset to read instead of the COGs at small scales: role ``overview``, bands by common name."""
    for key, asset in assets.items():
        if "overview" in (asset.get("roles") or []) and any(
            common_name(b) for b in asset.get("eo:bands") or asset.get("bands") or []
        ):
            media = (asset.get("type") or "").lower()
            if not media or media.startswith("image/tiff"):
                return key
    return None
