"""Comparing what windows show with the server's document, and building test benches."""

from __future__ import annotations

import copy
import json
import math
import uuid as uuidlib
from pathlib import Path

from .client import REPO

FIXTURES = REPO.parent / "shared" / "fixtures"

# Fields both client variants serialise for an item of each type (their to_dict output, read
# from both code bases). Left out: `z_value` (the fork renumbers it from its layer panel on its
# own), the fork-only source fields `source_type` and `beam_waist_mm`, and `uuid`/`item_type`,
# which a client echoes back only after it received them.
COMMON_FIELDS = {
    "component": (
        "_type", "x_mm", "y_mm", "angle_deg", "name", "object_height_mm", "mm_per_pixel",
        "image_path", "reference_line_mm", "interfaces", "category", "notes", "locked",
    ),
    "source": (
        "_type", "x_mm", "y_mm", "angle_deg", "size_mm", "n_rays", "ray_length_mm", "spread_deg",
        "color_hex", "wavelength_nm", "polarization_type", "polarization_angle_deg",
        "custom_jones_ex_real", "custom_jones_ex_imag", "custom_jones_ey_real",
        "custom_jones_ey_imag", "use_custom_jones", "locked",
    ),
}
# Interface properties only one variant knows (the fork's lens clear aperture); every other
# interface field (geometry, element type, efl, reflectivity, split ratios...) is compared.
VARIANT_ONLY_INTERFACE_FIELDS = {"clear_aperture_mm"}


def same_value(a, b) -> bool:
    """Exact equality: floats bit-identical (0.1 != 0.1 + 1 ulp, -0.0 != 0.0), and a float is
    not an integer (the server keeps each number's kind as sent)."""
    if isinstance(a, float) and isinstance(b, float):
        return a.hex() == b.hex() or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def comparable(item_type: str, data: dict) -> dict:
    """The part of an item's data that every window must show identically."""
    fields = COMMON_FIELDS.get(item_type)
    if fields is None:
        raise AssertionError(f"no comparison defined for item type {item_type!r}: {data}")
    out = {k: data[k] for k in fields if k in data}
    if "interfaces" in out and isinstance(out["interfaces"], list):
        out["interfaces"] = [
            {k: v for k, v in iface.items() if k not in VARIANT_ONLY_INTERFACE_FIELDS}
            if isinstance(iface, dict) else iface
            for iface in out["interfaces"]
        ]
    return out


def window_items(state: dict, who: str) -> dict[str, dict]:
    """{uuid: {"item_type", "data"}} of a client's window; an item shown twice fails."""
    out: dict[str, dict] = {}
    for rec in state["items"]:
        if rec["uuid"] in out:
            raise AssertionError(f"{who}'s window shows item {rec['uuid']} twice")
        out[rec["uuid"]] = rec
    return out


def document_item_type(item: dict) -> str:
    return item.get("item_type") or item.get("_type")


def diff_items(expected: dict, actual: dict, *, expected_name: str, actual_name: str,
               limit: int = 6) -> list[str]:
    """Differences between two {uuid: {"item_type", "data"}} maps on the compared fields, one
    line per item."""
    problems = []
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    if missing:
        problems.append(f"{actual_name} lacks {len(missing)} item(s) {expected_name} has: "
                        f"{[_label(u, expected[u]) for u in missing[:limit]]}")
    if extra:
        problems.append(f"{actual_name} has {len(extra)} item(s) {expected_name} lacks: "
                        f"{[_label(u, actual[u]) for u in extra[:limit]]}")
    for uuid in sorted(set(expected) & set(actual)):
        e, a = expected[uuid], actual[uuid]
        if e["item_type"] != a["item_type"]:
            problems.append(f"{_label(uuid, e)}: item_type {a['item_type']!r} in {actual_name}, "
                            f"{e['item_type']!r} in {expected_name}")
            continue
        ce, ca = comparable(e["item_type"], e["data"]), comparable(a["item_type"], a["data"])
        keys = [k for k in sorted(set(ce) | set(ca))
                if k not in ca or k not in ce or not same_value(ce[k], ca[k])]
        if keys:
            shown = "; ".join(f"{k}: {_show(ca.get(k, '<absent>'))} vs "
                              f"{_show(ce.get(k, '<absent>'))}" for k in keys[:3])
            more = f" (+{len(keys) - 3} more fields)" if len(keys) > 3 else ""
            problems.append(f"{_label(uuid, e)} in {actual_name} vs {expected_name}: "
                            f"{shown}{more}")
    if len(problems) > limit:
        problems = problems[:limit] + [f"... and {len(problems) - limit} more items"]
    return problems


def _label(uuid: str, rec: dict) -> str:
    name = rec["data"].get("name") if isinstance(rec.get("data"), dict) else None
    return f"{uuid[:8]} ({name or rec.get('item_type')})"


def _show(v) -> str:
    if isinstance(v, float):
        return repr(v)
    text = json.dumps(v)
    return text if len(text) < 100 else text[:100] + "..."


def document_as_items(doc: dict[str, dict] | None) -> dict[str, dict]:
    """The server's scene in the same shape as window_items()."""
    if doc is None:
        return {}
    return {u: {"item_type": document_item_type(i), "data": i} for u, i in doc.items()}


def bench_file(path: Path, count: int) -> Path:
    """A scene file of `count` items: the shared fixtures' components and sources repeated with
    new uuids and shifted positions, as the desktop client writes scene files."""
    templates = []
    for f in sorted(FIXTURES.glob("*.scene.json")):
        templates.extend(json.loads(f.read_text())["items"])
    if not templates:
        raise AssertionError(f"no fixture items found in {FIXTURES}")
    items = []
    for i in range(count):
        item = copy.deepcopy(templates[i % len(templates)])
        item["item_uuid"] = str(uuidlib.UUID(f"{i:08x}-be7c-4000-8000-000000000300"))
        row, col = divmod(i, 20)
        item["x_mm"] = float(item.get("x_mm", 0.0)) + col * 37.5
        item["y_mm"] = float(item.get("y_mm", 0.0)) + row * 41.25
        items.append(item)
    path.write_text(json.dumps({"version": "2.0", "items": items, "rulers": [], "texts": [],
                                "rectangles": [], "path_measures": []}))
    return path
