"""Discovery through entry points, broken plugins, autoload switch, the admin's choices."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import EntryPoint
from typing import ClassVar

import pytest

from processors import registry
from processors.base import ProcessorParams

BUILTINS = {
    "mean",
    "median",
    "gaussian",
    "nlm",
    "bilateral",
    "window",
    "histeq",
    "clahe",
    "threshold_segment",
    "kmeans",
    "features",
    "predict",
    "unet",
}


def test_every_builtin_is_discovered_and_available_on_cpu():
    infos = {i.name: i for i in registry.discover()}
    assert set(infos) >= BUILTINS
    for name in BUILTINS:
        info = infos[name]
        assert info.available, f"{name}: {info.reason}"
        assert info.builtin
        assert info.version and info.family in {
            "denoise",
            "enhance",
            "segment",
            "cluster",
            "features",
            "predict",
            "model",
        }
        assert info.params_schema()["type"] == "object"


class GoodPlugin:
    name: ClassVar[str] = "good_plugin"
    version: ClassVar[str] = "2.1.0"
    family: ClassVar[str] = "enhance"

    class Params(ProcessorParams):
        pass

    def run(self, volume, params, xp):
        return []


class NeedsGpu(GoodPlugin):
    name: ClassVar[str] = "needs_gpu"
    requires: ClassVar[tuple[str, ...]] = ("cupy",)


class NotFrozen:
    name = "not_frozen"
    version = "1"
    family = "enhance"

    from pydantic import BaseModel as Params

    def run(self, volume, params, xp):
        return []


class Impostor(GoodPlugin):
    name: ClassVar[str] = "mean"


class WrongFamily(GoodPlugin):
    family: ClassVar[str] = "astrology"


def _fake_entry_points(monkeypatch, extra: list[EntryPoint]) -> None:
    real = registry.entry_points(group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [*real, *extra])


def ep(name: str, value: str) -> EntryPoint:
    return EntryPoint(name=name, value=value, group=registry.ENTRY_POINT_GROUP)


@pytest.fixture
def third_party(monkeypatch):
    here = __name__
    _fake_entry_points(
        monkeypatch,
        [
            ep("good_plugin", f"{here}:GoodPlugin"),
            ep("broken_import", "no_such_module_anywhere:Thing"),
            ep("missing_attribute", f"{here}:DoesNotExist"),
            ep("not_frozen", f"{here}:NotFrozen"),
            ep("wrong_family", f"{here}:WrongFamily"),
            ep("mean", f"{here}:Impostor"),  # a third party trying to shadow a built-in
            ep("misnamed", f"{here}:GoodPlugin"),
            ep("needs_gpu", f"{here}:NeedsGpu"),
        ],
    )


def test_bad_plugins_are_listed_with_reasons_and_never_break_discovery(third_party, monkeypatch):
    monkeypatch.setattr(registry, "cupy_status", lambda: (False, "CuPy is not importable"))
    infos = registry.discover(autoload=True)
    by_name: dict[str, list[registry.PluginInfo]] = {}
    for info in infos:
        by_name.setdefault(info.name, []).append(info)
    assert by_name["good_plugin"][0].available
    assert by_name["good_plugin"][0].version == "2.1.0"
    assert not by_name["good_plugin"][0].builtin
    assert "import failed: ModuleNotFoundError" in by_name["broken_import"][0].reason
    assert "import failed" in by_name["missing_attribute"][0].reason
    assert "frozen" in by_name["not_frozen"][0].reason
    assert "astrology" in by_name["wrong_family"][0].reason
    assert not any(i.available for i in by_name["wrong_family"])
    # The built-in "mean" wins; the impostor is listed as a duplicate.
    means = by_name["mean"]
    assert means[0].available and means[0].builtin
    assert any("duplicate" in m.reason for m in means[1:])
    assert registry.find("mean", infos).builtin
    assert "names processor 'good_plugin'" in by_name["misnamed"][0].reason
    gpu = by_name["needs_gpu"][0]
    assert not gpu.available and "CuPy" in gpu.reason
    assert {i.name for i in infos if i.available} >= BUILTINS


def test_requirement_met_when_cupy_is_there(third_party, monkeypatch):
    monkeypatch.setattr(registry, "cupy_status", lambda: (True, "CuPy 13, 1 CUDA device(s)"))
    info = registry.find("needs_gpu", registry.discover(autoload=True))
    assert info.available


def test_env_var_disables_autoload(third_party, monkeypatch):
    monkeypatch.setenv(registry.AUTOLOAD_ENV, "1")
    names = {i.name for i in registry.discover()}
    assert names >= BUILTINS
    assert not names & {"good_plugin", "broken_import", "needs_gpu"}
    monkeypatch.setenv(registry.AUTOLOAD_ENV, "0")
    assert "good_plugin" in {i.name for i in registry.discover()}


def test_get_processor_refuses_unknown_unavailable_and_disabled(third_party):
    infos = registry.discover(autoload=True)
    with pytest.raises(registry.UnknownProcessorError):
        registry.get_processor("nope", infos)
    with pytest.raises(registry.ProcessorUnavailableError, match="import failed"):
        registry.get_processor("broken_import", infos)
    disabled = registry.apply_states(infos, {"good_plugin": registry.PluginChoice(enabled=False)})
    with pytest.raises(registry.ProcessorUnavailableError, match="disabled"):
        registry.get_processor("good_plugin", disabled)
    assert registry.get_processor("good_plugin", infos).name == "good_plugin"


def test_a_pin_to_another_version_makes_the_plugin_unavailable(third_party):
    infos = registry.discover(autoload=True)
    same = registry.PluginChoice(pinned_version="2.1.0")
    other = registry.PluginChoice(pinned_version="2.0.0")
    pinned = registry.find("good_plugin", registry.apply_states(infos, {"good_plugin": same}))
    assert pinned.available and pinned.pinned_version == "2.1.0"
    stale = registry.find("good_plugin", registry.apply_states(infos, {"good_plugin": other}))
    assert not stale.available
    assert stale.reason == "pinned to version 2.0.0, installed version is 2.1.0"


def test_importing_processors_imports_no_gpu_library():
    code = (
        "import sys, processors, processors.registry, processors.backend, processors.denoise, "
        "processors.enhance, processors.segment, processors.cluster, processors.features, "
        "processors.predict; processors.registry.discover(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('cupy', 'cupyx')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_plugin_that_exits_or_raises_on_import_is_contained(monkeypatch, tmp_path):
    (tmp_path / "plugin_exits.py").write_text("import sys\nsys.exit(3)\n", encoding="utf-8")
    (tmp_path / "plugin_raises.py").write_text("raise RuntimeError('boom')\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    _fake_entry_points(
        monkeypatch,
        [ep("exits", "plugin_exits:Thing"), ep("raises", "plugin_raises:Thing")],
    )
    infos = {i.name: i for i in registry.discover(autoload=True)}
    assert "SystemExit: 3" in infos["exits"].reason
    assert "RuntimeError: boom" in infos["raises"].reason
    assert all(infos[name].available for name in BUILTINS)
