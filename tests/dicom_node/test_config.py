from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.config import ConfigError, DuplicatePolicy, Settings, load_settings

REPO = Path(__file__).resolve().parents[2]


def test_defaults() -> None:
    settings = load_settings(None)
    assert settings.ae_title == "DICOMNODE"
    assert settings.port == 11112
    assert settings.duplicate_policy is DuplicatePolicy.OVERWRITE
    assert settings.effective_database_url == f"sqlite:///{settings.data_dir / 'dicom-node.db'}"


def test_shipped_config_file_is_valid_and_matches_defaults() -> None:
    from_file = load_settings(REPO / "config" / "node.toml")
    defaults = load_settings(None)
    assert from_file.model_dump() == defaults.model_dump()


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "node.toml"
    config.write_text('ae_title = "FROMFILE"\nport = 2000\nstudy_quiet_seconds = 5\n')
    monkeypatch.setenv("DICOM_NODE_AE_TITLE", "FROMENV")
    monkeypatch.setenv("DICOM_NODE_PORT", "4242")
    monkeypatch.setenv("DICOM_NODE_DATA_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("DICOM_NODE_DATABASE_URL", "postgresql://u@h/db")
    monkeypatch.setenv("DICOM_NODE_STUDY_QUIET_SECONDS", "7.5")
    settings = load_settings(config)
    assert settings.ae_title == "FROMENV"
    assert settings.port == 4242
    assert settings.data_dir == tmp_path / "elsewhere"
    assert settings.effective_database_url == "postgresql://u@h/db"
    assert settings.study_quiet_seconds == 7.5


def test_settings_are_frozen() -> None:
    settings = load_settings(None)
    with pytest.raises(Exception, match="frozen"):
        settings.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("port = 70000", "port"),
        ('ae_title = "THIS_TITLE_IS_TOO_LONG"', "ae_title"),
        ('ae_title = "   "', "ae_title"),
        ("study_quiet_seconds = -1", "study_quiet_seconds"),
        ('duplicate_policy = "maybe"', "duplicate_policy"),
        ("no_such_key = 1", "no_such_key"),
        ('allowed_peers = [{ ae_title = "CT1", host = "not-an-address" }]', "allowed_peers.0.host"),
    ],
)
def test_invalid_values_name_the_key(tmp_path: Path, toml: str, key: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(toml + "\n")
    with pytest.raises(ConfigError, match=rf"\b{key}\b"):
        load_settings(config)


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.toml"
    bad.write_text("port = = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.toml")


def test_allowed_peer_matching() -> None:
    settings = Settings(
        allowed_peers=[
            {"ae_title": "CT1", "host": "10.0.0.0/24"},
            {"ae_title": "PACS"},
        ]
    )
    ct, pacs = settings.allowed_peers
    assert ct.admits("CT1", "10.0.0.7")
    assert not ct.admits("CT1", "10.0.1.7")
    assert not ct.admits("CT2", "10.0.0.7")
    assert pacs.admits("PACS ", "192.0.2.1")


def test_receiver_processes_auto_is_bounded() -> None:
    assert 1 <= load_settings(None).effective_receiver_processes <= 4
    assert load_settings(None, receiver_processes=3).effective_receiver_processes == 3
