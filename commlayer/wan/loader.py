"""Link-matrix JSON files and the ``links=`` argument (profile name, file, dict or matrix).

File format (every key optional except that a base must cover every link)::

    {
      "name": "my-lab",
      "world_size": 4,                       # required unless "devices" is given
      "profile": "lte",                      # base 1: a named profile
      "devices": ["fiber-server", "lte-phone", "my-box", "lte-phone"],   # base 2: per-rank classes
      "device_classes": {"my-box": {"up_mbit": 5, "down_mbit": 40, "access_delay_ms": 15,
                                     "jitter_ms": 3, "loss": 0.0002, "energy_nj_per_bit": 283}},
      "core_delay_ms": 10,                   # same-region core delay for "devices"
      "default": {"delay_ms": 25, "rate_mbit": 20},                    # base 3: every link
      "links": [                             # per-directed-link overrides, applied in order
        {"src": 0, "dst": 1, "rate_mbit": 100, "schedule": [{"at_s": 60, "rate_mbit": 10}]},
        {"src": 2, "dst": "*", "loss": 0.001, "both": true}
      ]
    }
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from commlayer.wan.matrix import DeviceClass, LinkMatrix, matrix_from_devices, uniform_matrix
from commlayer.wan.profiles import DEVICE_CLASSES, PROFILES, profile_matrix
from commlayer.wan.spec import LinkConfigError, LinkSpec, spec_from_dict

_TOP_KEYS = {"name", "world_size", "profile", "devices", "device_classes", "core_delay_ms", "default", "links"}
_CLASS_KEYS = {"up_mbit", "down_mbit", "access_delay_ms", "jitter_ms", "loss", "energy_nj_per_bit", "region", "queue_ms"}


def resolve_links(links: str | os.PathLike[str] | Mapping[str, Any] | LinkMatrix, world_size: int) -> LinkMatrix:
    """Turns a profile name, JSON file path, parsed JSON object or matrix into a LinkMatrix.

    Raises:
        LinkConfigError: unknown name, unreadable file, invalid content or world size mismatch.
    """
    if isinstance(links, LinkMatrix):
        m = links
    elif isinstance(links, Mapping):
        m = matrix_from_json(links, world_size, "<dict>")
    elif isinstance(links, str) and links in PROFILES:
        m = profile_matrix(links, world_size)
    else:
        path = Path(links)
        if not path.is_file():
            raise LinkConfigError(f"{links!s}: neither a profile ({', '.join(sorted(PROFILES))}) nor a file")
        m = load_links(path, world_size)
    if m.world_size != world_size:
        raise LinkConfigError(f"{m.name}: matrix has {m.world_size} ranks, expected {world_size}")
    return m


def load_links(path: str | os.PathLike[str], world_size: int | None = None) -> LinkMatrix:
    """Reads a link-matrix JSON file (format in the module docstring)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LinkConfigError(f"{path}: cannot read link matrix: {exc}") from exc
    return matrix_from_json(data, world_size, str(path))


def matrix_from_json(data: Any, world_size: int | None, name: str) -> LinkMatrix:
    """Builds and validates a LinkMatrix from a parsed JSON object."""
    if not isinstance(data, Mapping):
        raise LinkConfigError(f"{name}: expected a JSON object at top level, got {type(data).__name__}")
    bad = set(data) - _TOP_KEYS
    if bad:
        raise LinkConfigError(f"{name}: unknown key(s) {sorted(bad)}; allowed: {sorted(_TOP_KEYS)}")
    name = str(data.get("name", name))
    n = _world_size(data, world_size, name)
    bases = [k for k in ("profile", "devices", "default") if k in data]
    if len(bases) > 1:
        raise LinkConfigError(f"{name}: give at most one of profile/devices/default, got {bases}")
    if "profile" in data:
        m = profile_matrix(str(data["profile"]), n)
    elif "devices" in data:
        classes = dict(DEVICE_CLASSES)
        classes.update(_device_classes(data.get("device_classes", {}), name))
        devs = data["devices"]
        unknown = [d for d in devs if d not in classes]
        if unknown:
            raise LinkConfigError(f"{name}: unknown device class(es) {unknown}; known: {sorted(classes)}")
        core = data.get("core_delay_ms", 10.0)
        if not isinstance(core, (int, float)) or core < 0:
            raise LinkConfigError(f"{name}: expected core_delay_ms >= 0, got {core!r}")
        m = matrix_from_devices(name, [classes[d] for d in devs], float(core))
    elif "default" in data:
        m = uniform_matrix(name, n, spec_from_dict(data["default"], f"{name} default"))
    else:
        m = None
    rows: list[list[LinkSpec | None]] = [[None] * n for _ in range(n)] if m is None else [list(r) for r in m.links]
    for k, entry in enumerate(data.get("links", [])):
        if not isinstance(entry, Mapping) or "src" not in entry or "dst" not in entry:
            raise LinkConfigError(f"{name} links[{k}]: expected an object with src and dst, got {entry!r}")
        for i, j in _pairs(entry, n, f"{name} links[{k}]"):
            rows[i][j] = spec_from_dict(entry, f"link {i}->{j}", base=rows[i][j])
    for i in range(n):
        for j in range(n):
            if i != j and rows[i][j] is None:
                raise LinkConfigError(f"link {i}->{j}: not covered by profile/devices/default or links")
    devices = m.devices if m is not None else ("",) * n
    energy = m.device_energy_nj_per_bit if m is not None else tuple(
        max((s.energy_nj_per_bit for s in rows[i] if s is not None), default=0.0) for i in range(n))
    return LinkMatrix(name, tuple(tuple(r) for r in rows), devices, energy).validate()


def _world_size(data: Mapping[str, Any], world_size: int | None, name: str) -> int:
    n = data.get("world_size")
    if "devices" in data:
        if not isinstance(data["devices"], list) or not data["devices"]:
            raise LinkConfigError(f"{name}: expected devices to be a non-empty list, got {data['devices']!r}")
        if n is not None and n != len(data["devices"]):
            raise LinkConfigError(f"{name}: world_size {n} but {len(data['devices'])} devices")
        n = len(data["devices"])
    if n is None:
        n = world_size
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise LinkConfigError(f"{name}: expected world_size to be an integer >= 1, got {n!r}")
    if world_size is not None and n != world_size:
        raise LinkConfigError(f"{name}: file is for {n} ranks, expected {world_size}")
    return n


def _device_classes(raw: Any, name: str) -> dict[str, DeviceClass]:
    if not isinstance(raw, Mapping):
        raise LinkConfigError(f"{name}: expected device_classes to be an object")
    out = {}
    for cname, d in raw.items():
        where = f"{name} device class {cname}"
        if not isinstance(d, Mapping):
            raise LinkConfigError(f"{where}: expected an object, got {d!r}")
        bad = set(d) - _CLASS_KEYS
        if bad:
            raise LinkConfigError(f"{where}: unknown field(s) {sorted(bad)}; allowed: {sorted(_CLASS_KEYS)}")
        for req in ("up_mbit", "down_mbit", "access_delay_ms"):
            if req not in d:
                raise LinkConfigError(f"{where}: missing required field {req}")
        out[cname] = DeviceClass(cname, **{k: d[k] for k in _CLASS_KEYS if k in d})
    return out


def _pairs(entry: Mapping[str, Any], n: int, where: str) -> list[tuple[int, int]]:
    def ranks(v: Any, field: str) -> list[int]:
        if v == "*":
            return list(range(n))
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n:
            raise LinkConfigError(f"{where}: expected {field} to be a rank in [0, {n}) or \"*\", got {v!r}")
        return [v]

    out = [(i, j) for i in ranks(entry["src"], "src") for j in ranks(entry["dst"], "dst") if i != j]
    if entry.get("both", False):
        out += [(j, i) for i, j in out if (j, i) not in out]
    return out
