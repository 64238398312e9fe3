"""The node's settings: one frozen object built from a TOML file and ``DICOM_NODE_*`` variables.

Precedence, highest first: environment variables, the TOML file, the defaults below.
The object is built once (``load_settings``) and passed down; nothing reads it globally.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "DICOM_NODE_"
DEFAULT_CONFIG_PATH = Path("config/node.toml")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the offending key."""


class DuplicatePolicy(StrEnum):
    OVERWRITE = "overwrite"
    KEEP_FIRST = "keep-first"
    REJECT = "reject"


def validate_ae_title(value: str) -> str:
    stripped = value.strip()
    if not stripped or len(stripped) > 16:
        raise ValueError("an AE title is 1 to 16 characters")
    if "\\" in stripped or not stripped.isprintable():
        raise ValueError("an AE title has no backslash or control characters")
    return stripped


class AllowedPeer(BaseModel):
    """A calling AE title that may associate, optionally only from one address or network."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ae_title: str
    host: str | None = None

    _check_ae_title = field_validator("ae_title")(validate_ae_title)

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str | None) -> str | None:
        if value is not None:
            ipaddress.ip_network(value, strict=False)
        return value

    def admits(self, ae_title: str, address: str) -> bool:
        if ae_title.strip() != self.ae_title:
            return False
        if self.host is None:
            return True
        return ipaddress.ip_address(address) in ipaddress.ip_network(self.host, strict=False)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="forbid", validate_default=True
    )

    ae_title: str = "DICOMNODE"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    data_dir: Path = Path("data")
    database_url: str | None = None
    study_quiet_seconds: float = Field(60.0, gt=0)
    fsync: bool = True
    duplicate_policy: DuplicatePolicy = DuplicatePolicy.OVERWRITE
    accept_unknown_sop_classes: bool = False
    max_pdu_size: int = Field(0, ge=0)
    max_associations: int = Field(32, ge=1)
    acse_timeout: float = Field(30.0, gt=0)
    dimse_timeout: float = Field(60.0, gt=0)
    network_timeout: float = Field(60.0, gt=0)
    require_called_ae_title: bool = False
    allowed_peers: tuple[AllowedPeer, ...] = ()
    index_batch_size: int = Field(256, ge=1)
    index_flush_seconds: float = Field(0.25, gt=0)
    receiver_processes: int = Field(0, ge=0, le=64)
    shutdown_grace_seconds: float = Field(30.0, ge=0)
    assembler_interval_seconds: float = Field(1.0, gt=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["console", "json"] = "console"

    _check_ae_title = field_validator("ae_title")(validate_ae_title)

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def effective_receiver_processes(self) -> int:
        """0 means one receiver process per CPU core, at most four."""
        return self.receiver_processes or max(1, min(os.cpu_count() or 1, 4))

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'dicom-node.db'}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's values arrive as init arguments; the environment overrides them.
        return (env_settings, init_settings)


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"{key}: {item['msg']}")
    return "; ".join(lines)


def load_settings(config_path: Path | None = None, **overrides: Any) -> Settings:
    """Read the TOML file (if any), apply the environment, validate, and freeze.

    Raises ``ConfigError`` with a message naming the key when anything is wrong.
    """
    values: dict[str, Any] = {}
    if config_path is not None:
        try:
            values = tomllib.loads(config_path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {config_path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config_path}: not valid TOML: {exc}") from exc
    values.update(overrides)
    try:
        return Settings(**values)
    except ValidationError as exc:
        where = f"{config_path}: " if config_path else ""
        raise ConfigError(f"invalid configuration: {where}{_describe(exc)}") from exc
