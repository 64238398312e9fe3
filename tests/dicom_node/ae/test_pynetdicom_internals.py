"""The pynetdicom internals the node relies on are still there and still behave as
``dicom_node/ae/pynetdicom_internals.py`` expects; each failure names the internal."""

from __future__ import annotations

import copy
import inspect
import socket
import threading
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, _config, build_context, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.ae.pynetdicom_internals import (
    PYNETDICOM_CHECKED,
    CheapCopyContext,
    ProcessWideSwitchError,
    serve_shared_listener,
    unrestricted_storage_service,
)

PYPROJECT = Path(__file__).parents[3] / "pyproject.toml"

# What a PresentationContext holds (pynetdicom 3.0.4): CheapCopyContext shares all but the list.
PRESENTATION_CONTEXT_ATTRIBUTES = {
    "_context_id",
    "_abstract_syntax",
    "_transfer_syntax",
    "result",
    "_scu_role",
    "_scp_role",
    "_as_scp",
    "_as_scu",
}


def changed(internal: str, relied_on_by: str) -> str:
    return (
        f"pynetdicom {metadata.version('pynetdicom')} changed {internal}, which {relied_on_by} in"
        " dicom_node/ae/pynetdicom_internals.py relies on: re-check that module, then the"
        f" pin (checked: pynetdicom{PYNETDICOM_CHECKED})"
    )


def test_pyproject_pins_pynetdicom_to_the_checked_versions() -> None:
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    [pin] = [Requirement(d) for d in dependencies if Requirement(d).name == "pynetdicom"]
    assert pin.specifier == Requirement(f"pynetdicom{PYNETDICOM_CHECKED}").specifier
    installed = metadata.version("pynetdicom")  # 3.0.0's __version__ says 3.0.0.dev0
    assert pin.specifier.contains(installed), (
        f"pynetdicom {installed} is installed; checked: {PYNETDICOM_CHECKED}"
    )


def test_presentation_context_keeps_only_immutable_values_beside_its_transfer_syntaxes() -> None:
    context = build_context(CTImageStorage, [ExplicitVRLittleEndian])
    assert set(vars(context)) == PRESENTATION_CONTEXT_ATTRIBUTES, changed(
        "PresentationContext's attributes", "CheapCopyContext (copies only _transfer_syntax)"
    )
    assert context.transfer_syntax is context._transfer_syntax, changed(
        "PresentationContext._transfer_syntax", "CheapCopyContext"
    )


def test_cheap_context_copies_are_independent() -> None:
    original = build_context(CTImageStorage, [ExplicitVRLittleEndian])
    cheap = CheapCopyContext.copy_of(original)
    clone = copy.deepcopy(cheap)
    clone.transfer_syntax.clear()
    clone.context_id = 7
    assert cheap.transfer_syntax == original.transfer_syntax != []
    assert cheap.abstract_syntax == clone.abstract_syntax == original.abstract_syntax
    assert cheap.context_id is None


@pytest.mark.parametrize("hook", ["server_bind", "server_activate", "get_request"])
def test_server_hooks_the_shared_listener_overrides(hook: str) -> None:
    method = getattr(ThreadedAssociationServer, hook, None)
    assert callable(method), changed(f"ThreadedAssociationServer.{hook}", "shared_listener_server")
    assert list(inspect.signature(method).parameters) == ["self"], changed(
        f"the signature of ThreadedAssociationServer.{hook}", "shared_listener_server"
    )


def test_make_server_takes_a_server_class() -> None:
    assert "server_class" in inspect.signature(AE.make_server).parameters, changed(
        "AE.make_server(server_class=...)", "serve_shared_listener"
    )


def test_shared_listener_server_serves_copies_cheaply_and_shuts_down() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    ae = AE(ae_title="SHARED")
    ae.add_supported_context(Verification)
    context_types: list[type] = []

    def established(event: Event) -> None:
        context_types.extend(type(c) for c in event.assoc.acceptor.supported_contexts)

    server = serve_shared_listener(ae, listener, [(evt.EVT_ESTABLISHED, established)])
    assert ae._servers == [server], changed("AE._servers", "serve_shared_listener")
    try:
        scu = AE(ae_title="SCU")
        scu.add_requested_context(Verification)
        assoc = scu.associate("127.0.0.1", listener.getsockname()[1], ae_title="SHARED")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
    finally:
        server.shutdown()
    assert ae._servers == [], changed(
        "AssociationServer.shutdown (it removed the server from AE._servers)",
        "serve_shared_listener (it adds the server there)",
    )
    ae.shutdown()
    assert listener.fileno() == -1  # the server closed the socket it was given
    assert context_types == [CheapCopyContext], changed(
        "how an association gets the server's contexts (a deep copy of server.contexts)",
        "shared_listener_server",
    )


def test_unrestricted_storage_service_is_a_module_level_switch() -> None:
    assert isinstance(getattr(_config, "UNRESTRICTED_STORAGE_SERVICE", None), bool), changed(
        "pynetdicom._config.UNRESTRICTED_STORAGE_SERVICE", "unrestricted_storage_service"
    )


def test_unrestricted_storage_service_is_held_then_restored() -> None:
    assert _config.UNRESTRICTED_STORAGE_SERVICE is False
    with unrestricted_storage_service(True):
        with unrestricted_storage_service(True):
            assert _config.UNRESTRICTED_STORAGE_SERVICE is True
        assert _config.UNRESTRICTED_STORAGE_SERVICE is True  # the first holder still serves
        with (
            pytest.raises(ProcessWideSwitchError, match="UNRESTRICTED_STORAGE_SERVICE"),
            unrestricted_storage_service(False),
        ):
            pass
    assert _config.UNRESTRICTED_STORAGE_SERVICE is False
    with (
        unrestricted_storage_service(False),
        pytest.raises(ProcessWideSwitchError, match="needs it on"),
        unrestricted_storage_service(True),
    ):
        pass
    assert _config.UNRESTRICTED_STORAGE_SERVICE is False


def test_unrestricted_storage_service_refuses_a_switch_left_on_by_someone_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_config, "UNRESTRICTED_STORAGE_SERVICE", True)
    with (
        pytest.raises(ProcessWideSwitchError, match="needs it off"),
        unrestricted_storage_service(False),
    ):
        pass
    with unrestricted_storage_service(True):
        pass
    assert _config.UNRESTRICTED_STORAGE_SERVICE is True


def test_association_reactor_can_be_paused() -> None:
    assoc = Association(AE(), "requestor")
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    assert isinstance(checkpoint, threading.Event), changed(
        "Association._reactor_checkpoint", "paused_reactor"
    )
    assert getattr(assoc, "_is_paused", None) is False, changed(
        "Association._is_paused", "paused_reactor"
    )
    for method in ("send_msg", "get_msg"):
        assert callable(getattr(assoc.dimse, method, None)), changed(
            f"DIMSEServiceProvider.{method}", "paused_reactor's callers (tests)"
        )
