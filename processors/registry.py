"""Processor discovery (entry-point group ``dicom_node.processors``).

Discovery never raises because of a plugin: one that fails to import, is not a valid
processor, repeats a name, or needs what this machine lacks (CuPy) is listed as unavailable
with the reason. ``DICOM_NODE_DISABLE_PLUGIN_AUTOLOAD=1`` loads the built-ins only (those
registered by the ``dicom-node`` distribution itself). The admin's choices (enabled, pinned
version) come in as plain data (``PluginChoice``, ``apply_states``); the node keeps them in
its database (``dicom_node.plugin_state``), the SDK never touches it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from processors.backend import cupy_status
from processors.base import Accepts, Processor, accepts_of, check_processor_class
from processors.errors import BadInputError

ENTRY_POINT_GROUP = "dicom_node.processors"
AUTOLOAD_ENV = "DICOM_NODE_DISABLE_PLUGIN_AUTOLOAD"
BUILTIN_DISTRIBUTION = "dicom-node"
BUILTIN_MODULE_PREFIX = "processors."


# LookupError and RuntimeError too: dicom_node.process catches the two by those names.
class UnknownProcessorError(BadInputError):
    """No processor of that name was discovered."""


class ProcessorUnavailableError(BadInputError):
    """The processor exists but cannot run here (or is disabled); the message says why."""


@dataclass(frozen=True)
class PluginChoice:
    """An admin's choice for one plugin; a plugin without one is enabled and not pinned."""

    enabled: bool = True
    pinned_version: str | None = None


@dataclass(frozen=True)
class PluginInfo:
    """One discovered processor plugin, usable or not."""

    name: str
    entry_point: str
    builtin: bool
    available: bool
    reason: str
    version: str = ""
    family: str = ""
    requires: tuple[str, ...] = ()
    processor: type[Any] | None = None
    enabled: bool = True
    pinned_version: str | None = None

    @property
    def usable(self) -> bool:
        return self.available and self.enabled

    @property
    def accepts(self) -> Accepts:
        """What images the processor takes (``processors.base.Accepts``)."""
        return accepts_of(self.processor)

    def params_schema(self) -> dict[str, Any] | None:
        if self.processor is None:
            return None
        schema: dict[str, Any] = self.processor.Params.model_json_schema()
        return schema

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "family": self.family,
            "available": self.available,
            "reason": self.reason,
            "enabled": self.enabled,
            "pinned_version": self.pinned_version,
            "builtin": self.builtin,
            "entry_point": self.entry_point,
            "requires": list(self.requires),
            "accepts": self.accepts.describe(),
        }


def autoload_disabled() -> bool:
    return os.environ.get(AUTOLOAD_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _is_builtin(ep: EntryPoint) -> bool:
    dist = getattr(ep, "dist", None)
    dist_name = getattr(dist, "name", None) if dist is not None else None
    if dist_name is not None:
        return str(dist_name).replace("_", "-").lower() == BUILTIN_DISTRIBUTION
    return ep.value.startswith(BUILTIN_MODULE_PREFIX)


def _requirement_reason(requires: Iterable[str]) -> str | None:
    for requirement in requires:
        if requirement == "cupy":
            ok, reason = cupy_status()
            if not ok:
                return reason
        else:
            return f"unknown requirement {requirement!r}"
    return None


def _inspect(ep: EntryPoint, builtin: bool) -> PluginInfo:
    """Load one entry point; any failure becomes an unavailable PluginInfo."""
    try:
        obj = ep.load()
    except BaseException as exc:  # a plugin may even call sys.exit on import
        if isinstance(exc, KeyboardInterrupt):
            raise
        return PluginInfo(
            ep.name, ep.value, builtin, False, f"import failed: {type(exc).__name__}: {exc}"
        )
    problem = check_processor_class(obj)
    if problem is not None:
        return PluginInfo(ep.name, ep.value, builtin, False, f"not a processor: {problem}")
    name = str(obj.name)
    version = str(obj.version)
    family = str(obj.family)
    requires = tuple(str(r) for r in getattr(obj, "requires", ()))
    base = PluginInfo(name, ep.value, builtin, True, "", version, family, requires, obj)
    if name != ep.name:
        return replace(
            base,
            name=ep.name,
            available=False,
            reason=f"entry point {ep.name!r} names processor {name!r}",
        )
    missing = _requirement_reason(requires)
    if missing is not None:
        return replace(base, available=False, reason=missing)
    checker = getattr(obj, "is_available", None)
    if callable(checker):
        try:
            ok, reason = checker()
        except Exception as exc:
            ok, reason = False, f"is_available raised {type(exc).__name__}: {exc}"
        if not ok:
            return replace(base, available=False, reason=str(reason))
    return base


def discover(*, autoload: bool | None = None) -> list[PluginInfo]:
    """Every processor registered in the entry-point group, sorted by name.

    ``autoload=False`` (or the environment variable) keeps only the built-ins.
    """
    if autoload is None:
        autoload = not autoload_disabled()
    try:
        eps = list(entry_points(group=ENTRY_POINT_GROUP))
    except Exception:  # a broken distribution's metadata must not stop the node
        eps = []
    found: dict[str, PluginInfo] = {}
    extra: list[PluginInfo] = []
    seen: set[tuple[str, str]] = set()
    # Built-ins first, so a third-party plugin cannot shadow one.
    for ep in sorted(eps, key=lambda e: (not _is_builtin(e), e.name, e.value)):
        builtin = _is_builtin(ep)
        if not builtin and not autoload:
            continue
        if (ep.name, ep.value) in seen:
            continue  # the same distribution seen twice on sys.path
        seen.add((ep.name, ep.value))
        info = _inspect(ep, builtin)
        if info.name in found:
            first = found[info.name]
            extra.append(
                replace(
                    info,
                    available=False,
                    reason=f"duplicate name: {info.name!r} is already provided by "
                    f"{first.entry_point}",
                )
            )
            continue
        found[info.name] = info
    return sorted([*found.values(), *extra], key=lambda i: (i.name, not i.available))


def apply_states(
    infos: Iterable[PluginInfo], states: Mapping[str, PluginChoice]
) -> list[PluginInfo]:
    """Fold the admin's choices (enabled, pinned version) into discovered plugins."""
    merged = []
    for info in infos:
        state = states.get(info.name)
        if state is None:
            merged.append(info)
            continue
        pinned = state.pinned_version
        updated = replace(info, enabled=state.enabled, pinned_version=pinned)
        if info.available and pinned and pinned != info.version:
            updated = replace(
                updated,
                available=False,
                reason=f"pinned to version {pinned}, installed version is {info.version}",
            )
        merged.append(updated)
    return merged


def find(name: str, infos: Iterable[PluginInfo]) -> PluginInfo:
    candidates = [i for i in infos if i.name == name]
    if not candidates:
        raise UnknownProcessorError(f"no processor named {name!r}")
    usable = [i for i in candidates if i.available]
    return usable[0] if usable else candidates[0]


def get_processor(
    name: str, infos: Iterable[PluginInfo] | None = None, *, require_enabled: bool = True
) -> Processor:
    """An instance of the processor ``name``; raises if unknown, unavailable or disabled."""
    info = find(name, discover() if infos is None else infos)
    if not info.available or info.processor is None:
        raise ProcessorUnavailableError(f"processor {name!r} is unavailable: {info.reason}")
    if require_enabled and not info.enabled:
        raise ProcessorUnavailableError(f"processor {name!r} is disabled")
    instance: Processor = info.processor()
    return instance
