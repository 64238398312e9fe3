"""The node's settings: one frozen object built from a TOML file and ``DICOM_NODE_*`` variables.

Precedence, highest first: environment variables, the TOML file, the defaults below.
The object is built once (``load_settings``) and passed down; nothing reads it globally.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Iterable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from dicom_node.modalities import PLANAR_MODALITIES, planar_only_modalities
from dicom_node.security.deid_options import DeidOption, check_options
from processors.errors import BadInputError

if TYPE_CHECKING:
    from processors.base import Accepts

ENV_PREFIX = "DICOM_NODE_"
DEFAULT_CONFIG_PATH = Path("config/node.toml")


class ConfigError(BadInputError):
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


# -- routing: destinations and rules -------------------------------------------------------

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# Values of these VRs are not text or numbers: a rule cannot match on them.
UNMATCHABLE_VRS = frozenset({"SQ", "OB", "OD", "OF", "OL", "OV", "OW", "UN"})


class Destination(BaseModel):
    """Where outputs are sent: a DICOM node (C-STORE), or a DICOMweb server (STOW-RS) when
    ``url`` is given (then ``host``, ``port`` and ``ae_title`` may be left out)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    host: str = Field("", max_length=255)
    port: int = Field(0, ge=0, le=65535)
    ae_title: str = "STOW-RS"
    # A DICOMweb base URL (e.g. http://pacs:8042/dicom-web): STOW-RS instead of C-STORE.
    url: str | None = Field(None, pattern=r"^https?://")
    # The calling AE title we use towards it; None = the node's own ae_title.
    calling_ae_title: str | None = None
    max_attempts: int = Field(10, ge=1)
    # Seconds for association, DIMSE and network timeouts towards it.
    timeout: float = Field(60.0, gt=0)
    # At most this many associations at once towards it (C-STORE).
    associations: int = Field(4, ge=1, le=32)
    # -- DICOM TLS (issue 16 part 1, docs/security.md) ------------------------------------
    # tls = true: C-STORE to it over DICOM TLS. Its certificate must chain to
    # tls_ca_certificates (the system's roots when not given) and name its host unless
    # tls_check_hostname = false; tls_certificate and tls_private_key are the node's client
    # certificate, for a peer that asks for one.
    tls: bool = False
    tls_ca_certificates: Path | None = None
    tls_certificate: Path | None = None
    tls_private_key: Path | None = None
    tls_check_hostname: bool = True

    @model_validator(mode="after")
    def _check_tls(self) -> Destination:
        given = [
            name
            for name in ("tls_ca_certificates", "tls_certificate", "tls_private_key")
            if getattr(self, name) is not None
        ]
        if given and not self.tls:
            raise ValueError(f"destination {self.name!r}: {given[0]} is given but tls is false")
        if self.tls and self.url is not None:
            raise ValueError(f"destination {self.name!r}: tls is for C-STORE; use an https url")
        if (self.tls_certificate is None) != (self.tls_private_key is None):
            raise ValueError(
                f"destination {self.name!r}: tls_certificate and tls_private_key go together"
            )
        return self

    # -- end of DICOM TLS -----------------------------------------------------------------

    # -- de-identification (issue 16 part 2, docs/security.md) ---------------------------
    # "basic": what leaves for this destination (the source series of the rules that name
    # it) is de-identified by PS3.15's Basic Profile with these options; the pseudonym map
    # is sealed in the database (needs spool_encryption_key_file). Results it sends back
    # under the pseudonymous study are re-identified and sent on to results_to.
    deidentify: Literal["basic"] | None = None
    deidentify_options: tuple[DeidOption, ...] = ()
    allow_burned_in: bool = False
    results_to: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _check_deidentify(self) -> Destination:
        if self.deidentify is None and (self.deidentify_options or self.results_to):
            raise ValueError(
                f"destination {self.name!r}: deidentify_options and results_to need"
                ' deidentify = "basic"'
            )
        problem = check_options(self.deidentify_options)
        if problem:
            raise ValueError(f"destination {self.name!r}: deidentify_options: {problem}")
        return self

    # -- end of de-identification ----------------------------------------------------------

    # -- storage commitment (issue 18, docs/operations.md "Storage commitment") -----------
    # storage_commitment = true: after C-STORE, ask the PACS to commit what it received
    # (N-ACTION); an export is ``committed`` when its N-EVENT-REPORT says so. Unanswered
    # for commitment_timeout seconds: asked again, at most commitment_requests times.
    storage_commitment: bool = False
    commitment_timeout: float = Field(300.0, gt=0)
    commitment_requests: int = Field(3, ge=1)

    @model_validator(mode="after")
    def _check_storage_commitment(self) -> Destination:
        if self.storage_commitment and self.url is not None:
            raise ValueError(
                f"destination {self.name!r}: storage_commitment is DICOM (C-STORE"
                " destinations); a DICOMweb (url) destination cannot be asked to commit"
            )
        return self

    # -- end of storage commitment ---------------------------------------------------------

    _check_ae_title = field_validator("ae_title")(validate_ae_title)

    @field_validator("calling_ae_title")
    @classmethod
    def _check_calling_ae_title(cls, value: str | None) -> str | None:
        return None if value is None else validate_ae_title(value)

    @model_validator(mode="after")
    def _check_address(self) -> Destination:
        if self.url is None and (not self.host or not self.port):
            raise ValueError(
                f"destination {self.name!r}: give host and port (C-STORE) or url (STOW-RS)"
            )
        return self


class Orientation(StrEnum):
    AXIAL = "axial"
    CORONAL = "coronal"
    SAGITTAL = "sagittal"
    ANY = "any"


class RegexMatch(BaseModel):
    """``{ regex = "..." }``: the value contains a match (``re.search``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    regex: str

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile(self.regex)


class RangeMatch(BaseModel):
    """``{ min = .., max = .. }``: the value is a number within the bounds (inclusive)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min: float | None = None
    max: float | None = None


# An exact value (string or number), a list of exact values (any of), a regex or a range.
MatchCondition = str | float | tuple[str | float, ...] | RegexMatch | RangeMatch


def _rule_label(name: object) -> str:
    return f"rule {name!r}" if isinstance(name, str) else "rule (without a name)"


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_match_keyword(keyword: str) -> str | None:
    """Why ``keyword`` cannot be matched on, or None when it can."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    tag = tag_for_keyword(keyword) if isinstance(keyword, str) else None
    if tag is None:
        return f"unknown DICOM keyword {keyword!r} in match"
    vr = dictionary_VR(tag)
    if vr in UNMATCHABLE_VRS:
        return f"{keyword} (VR {vr}) cannot be matched on: only text and number values can"
    return None


def check_match_condition(keyword: str, condition: object) -> str | None:
    """Why ``condition`` is not a valid condition for ``keyword``, or None when it is."""
    if isinstance(condition, str) or _is_number(condition):
        return None
    if isinstance(condition, list | tuple):
        if not condition:
            return f"{keyword}: an empty list matches nothing"
        if not all(isinstance(item, str) or _is_number(item) for item in condition):
            return f"{keyword}: a list holds only strings or numbers"
        return None
    if isinstance(condition, dict):
        keys = set(condition)
        if "regex" in keys:
            pattern = condition["regex"]
            if keys != {"regex"} or not isinstance(pattern, str):
                return f'{keyword}: write a regex as {{ regex = "..." }} and nothing else'
            try:
                re.compile(pattern)
            except re.error as exc:
                return f"{keyword}: invalid regex {pattern!r}: {exc}"
            return None
        if keys and keys <= {"min", "max"}:
            low, high = condition.get("min"), condition.get("max")
            if not all(bound is None or _is_number(bound) for bound in (low, high)):
                return f"{keyword}: min and max are numbers"
            if low is not None and high is not None and low > high:
                return f"{keyword}: min {low} is greater than max {high}"
            return None
        return (
            f'{keyword}: a condition table is {{ regex = "..." }} or {{ min = .., max = .. }},'
            f" not {sorted(keys)}"
        )
    return (
        f"{keyword}: a condition is a string, a number, a list, {{ regex = .. }}"
        " or { min = .., max = .. }"
    )


class Rule(BaseModel):
    """Which series go through which pipeline, and where the outputs go.

    Every condition in ``match`` must hold (AND); see ``docs/routing.md``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    enabled: bool = True
    priority: int = 0
    match: dict[str, MatchCondition] = Field(default_factory=dict)
    # Calling AE titles the series must have come from; None = any sender.
    calling_ae_titles: tuple[str, ...] | None = None
    orientation: Orientation = Orientation.ANY
    min_instances: int = Field(1, ge=1)
    # Overrides study_quiet_seconds for the studies this rule routes.
    quiet_seconds: float | None = Field(None, gt=0)
    pipeline: tuple[str, ...] = Field(min_length=1)
    params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    destinations: tuple[str, ...] = ()
    # Also send the outputs back to the AE that sent the series: the destination whose
    # ae_title is the sender's calling AE title (a sender without one is logged).
    reply_to_sender: bool = False

    @model_validator(mode="before")
    @classmethod
    def _check_match(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "match" not in data:
            return data
        label = _rule_label(data.get("name"))
        match = data["match"]
        if not isinstance(match, dict):
            raise ValueError(f"{label}: match is a table of DICOM keyword = condition")
        for keyword, condition in match.items():
            problem = check_match_keyword(keyword) or check_match_condition(keyword, condition)
            if problem:
                raise ValueError(f"{label}: {problem}")
        return data

    @field_validator("calling_ae_titles")
    @classmethod
    def _check_calling_ae_titles(
        cls, value: tuple[str, ...] | None, info: ValidationInfo
    ) -> tuple[str, ...] | None:
        if value is None:
            return None
        label = _rule_label(info.data.get("name"))
        if not value:
            raise ValueError(f"{label}: an empty calling_ae_titles matches nothing; omit it")
        try:
            return tuple(validate_ae_title(title) for title in value)
        except ValueError as exc:
            raise ValueError(f"{label}: calling_ae_titles: {exc}") from exc

    @field_validator("pipeline")
    @classmethod
    def _check_pipeline(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        if any(not step.strip() for step in value):
            raise ValueError(f"{_rule_label(info.data.get('name'))}: a pipeline step has no name")
        return value

    @model_validator(mode="after")
    def _check_params(self) -> Rule:
        for step in self.params:
            if step not in self.pipeline:
                raise ValueError(
                    f"rule {self.name!r}: params for {step!r}, which is not a step of its"
                    f" pipeline {list(self.pipeline)}"
                )
        return self

    def step_params(self, step: str) -> dict[str, Any]:
        """The parameters given for ``step`` (empty: the processor's defaults)."""
        return dict(self.params.get(step, {}))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="forbid", validate_default=True
    )

    ae_title: str = "DICOMNODE"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535)  # 0: no plain port (TLS only, tls_port)
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
    # Jobs (docs/operations.md). "dask": an embedded LocalCluster of worker processes, or
    # the cluster at scheduler_address; "inline": in the node's own process (tests).
    executor: Literal["dask", "inline"] = "dask"
    scheduler_address: str | None = None
    dask_workers: int = Field(0, ge=0, le=64)
    dask_memory_limit: str = "auto"
    # Workers of the embedded cluster advertise this many "GPU" resources each.
    dask_worker_gpus: int = Field(0, ge=0)
    processing_device: str = "auto"
    job_timeout_seconds: float = Field(900.0, gt=0)
    job_max_attempts: int = Field(1, ge=1)
    dispatcher_interval_seconds: float = Field(0.25, gt=0)
    uid_root: str | None = None
    # Encryption at rest and of the pseudonym map (docs/security.md): a file of base64 keys,
    # the current one first (dicom_node/security/keys.py). None: files are written in clear.
    spool_encryption_key_file: Path | None = None
    # Names this node in jobs.claimed_by; empty = host name and port.
    node_name: str = ""
    # Audit trail (docs/security.md): also send each audit row as a DICOM audit message
    # (PS3.15 A.5) over RFC 5424 syslog to udp://HOST:PORT or tcp://HOST:PORT (None: don't);
    # at most audit_syslog_queue_size messages wait for a slow or absent collector.
    audit_syslog_address: str | None = Field(None, pattern=r"^(udp|tcp)://[^\s/]+:\d{1,5}$")
    audit_syslog_queue_size: int = Field(1000, ge=1, le=1_000_000)
    # Routing (docs/routing.md). destinations come first: rules are checked against them.
    destinations: tuple[Destination, ...] = ()
    rules: tuple[Rule, ...] = ()
    # -- DICOM TLS (issue 16 part 1, docs/security.md) ------------------------------------
    # With tls_certificate and tls_private_key (PEM, the key unencrypted) the node also
    # listens on tls_port with TLS; port = 0 leaves only that.
    # Peers' certificates are checked against tls_ca_certificates; a certificate is
    # required of them when tls_require_client_certificate (default: when a CA file is given).
    tls_port: int = Field(2762, ge=1, le=65535)
    tls_certificate: Path | None = None
    tls_private_key: Path | None = None
    tls_ca_certificates: Path | None = None
    tls_require_client_certificate: bool | None = None

    # -- the REST API and dashboard (issue 17): HTTP on http_host:http_port (0 turns it
    # off), HTTPS when tls_certificate and tls_private_key are set.
    http_host: str = "127.0.0.1"
    http_port: int = Field(8080, ge=0, le=65535)

    # -- models registered by admins (issue 17, docs/admin.md "Models"): the largest
    # upload accepted (written to <data_dir>/models/incoming as it arrives).
    model_upload_max_bytes: int = Field(512 * 1024 * 1024, ge=1)

    # -- metrics (issue 17): /metrics takes a viewer's bearer token unless metrics_public
    # (for a scraper on a trusted network; the series hold counts and rule, destination
    # and processor names, no patient data).
    metrics_public: bool = False

    # -- nodes sharing one database (issue 18, docs/operations.md): each writes a heartbeat
    # every node_heartbeat_seconds; one silent past node_lease_seconds has its running jobs
    # and exports being sent taken over by the others.
    node_heartbeat_seconds: float = Field(5.0, gt=0, le=300)
    node_lease_seconds: float = Field(30.0, gt=0, le=3600)

    # -- retention and disk space (issue 18, docs/operations.md "Retention and disk space")
    # Receivers answer C-STORE 0xA700 while the spool's file system has less than
    # receive_min_free_bytes free (0: only when a write fails), and store again once it has
    # receive_free_margin_bytes more than that.
    receive_min_free_bytes: int = Field(1024**3, ge=0)
    receive_free_margin_bytes: int = Field(256 * 1024**2, ge=0)
    # A study's spool files are deleted retention_spool_hours after it is done (complete,
    # its jobs finished, their exports delivered and committed where asked); a job's outputs
    # retention_outputs_hours after they are done (0: not by age). Below
    # retention_free_bytes or retention_free_percent free on the data folder's file system
    # (0: off), the oldest done studies and outputs go first, whatever their age, until it
    # is above. Checked every retention_interval_seconds; the rows stay, marked purged.
    retention_spool_hours: float = Field(168.0, ge=0)
    retention_outputs_hours: float = Field(168.0, ge=0)
    retention_free_bytes: int = Field(0, ge=0)
    retention_free_percent: float = Field(0.0, ge=0, lt=100)
    retention_interval_seconds: float = Field(300.0, gt=0)

    @model_validator(mode="after")
    def _check_tls(self) -> Settings:
        if (self.tls_certificate is None) != (self.tls_private_key is None):
            raise ValueError("tls_certificate and tls_private_key go together")
        if not self.tls_listening:
            if self.tls_ca_certificates is not None or self.tls_require_client_certificate:
                raise ValueError(
                    "tls_ca_certificates and tls_require_client_certificate need"
                    " tls_certificate and tls_private_key"
                )
            if self.port == 0:
                raise ValueError(
                    "port = 0 turns the plain port off: give tls_certificate and"
                    " tls_private_key to listen with TLS on tls_port"
                )
        elif self.port == self.tls_port:
            raise ValueError(f"port and tls_port are both {self.port}")
        if self.tls_require_client_certificate and self.tls_ca_certificates is None:
            raise ValueError("tls_require_client_certificate needs tls_ca_certificates")
        return self

    @property
    def tls_listening(self) -> bool:
        return self.tls_certificate is not None and self.tls_private_key is not None

    @property
    def effective_tls_require_client_certificate(self) -> bool:
        if self.tls_require_client_certificate is None:
            return self.tls_ca_certificates is not None
        return self.tls_require_client_certificate

    # -- end of DICOM TLS -----------------------------------------------------------------

    _check_ae_title = field_validator("ae_title")(validate_ae_title)

    @field_validator("destinations")
    @classmethod
    def _unique_destinations(cls, value: tuple[Destination, ...]) -> tuple[Destination, ...]:
        seen: set[str] = set()
        for destination in value:
            if destination.name in seen:
                raise ValueError(f"destination {destination.name!r} is defined twice")
            seen.add(destination.name)
        return value

    @field_validator("rules")
    @classmethod
    def _check_rules(cls, value: tuple[Rule, ...], info: ValidationInfo) -> tuple[Rule, ...]:
        seen: set[str] = set()
        for rule in value:
            if rule.name in seen:
                raise ValueError(f"rule {rule.name!r} is defined twice")
            seen.add(rule.name)
        if "destinations" not in info.data:
            return value  # the destinations are invalid; that error is reported already
        known = {destination.name for destination in info.data["destinations"]}
        for rule in value:
            missing = [name for name in rule.destinations if name not in known]
            if missing:
                raise ValueError(
                    f"rule {rule.name!r}: destination {missing[0]!r} is not defined"
                    f" (defined: {sorted(known) or 'none'})"
                )
        return value

    # -- de-identification (issue 16 part 2): needs the key, results go to known places ----
    @model_validator(mode="after")
    def _check_deidentifying_destinations(self) -> Settings:
        known = {destination.name for destination in self.destinations}
        for destination in self.destinations:
            if destination.deidentify and self.spool_encryption_key_file is None:
                raise ValueError(
                    f"destinations.deidentify (destination {destination.name!r}) needs"
                    " spool_encryption_key_file: the pseudonym map is sealed with its key"
                )
            for name in destination.results_to:
                if name not in known or name == destination.name:
                    raise ValueError(
                        f"destination {destination.name!r}: results_to names {name!r},"
                        f" which is not another defined destination"
                    )
        return self

    def destination(self, name: str) -> Destination:
        for destination in self.destinations:
            if destination.name == name:
                return destination
        raise KeyError(name)

    @field_validator("uid_root")
    @classmethod
    def _check_uid_root(cls, value: str | None) -> str | None:
        from dicom_node.encode.uids import check_root

        check_root(value)
        return value

    @field_validator("processing_device")
    @classmethod
    def _check_processing_device(cls, value: str) -> str:
        from processors.devices import BackendError, parse_device

        try:
            parse_device(value)
        except BackendError as exc:
            raise ValueError(str(exc)) from exc
        return value.strip().lower()

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def outputs_dir(self) -> Path:
        return self.data_dir / "outputs"

    @property
    def effective_node_name(self) -> str:
        return self.node_name or f"{socket.gethostname()}:{self.port or self.tls_port}"

    @property
    def effective_dask_workers(self) -> int:
        """0 means one worker per two CPU cores, at least one."""
        return self.dask_workers or max(1, (os.cpu_count() or 1) // 2)

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


def _entry_name(values: Mapping[str, Any], loc: tuple[int | str, ...]) -> str | None:
    """The name of the rule or destination an error location points into, if any."""
    if len(loc) < 2 or loc[0] not in ("rules", "destinations") or not isinstance(loc[1], int):
        return None
    entries = values.get(str(loc[0]))
    if not isinstance(entries, list | tuple) or not 0 <= loc[1] < len(entries):
        return None
    entry = entries[loc[1]]
    name = entry.get("name") if isinstance(entry, dict) else None
    return name if isinstance(name, str) else None


def _describe(error: ValidationError, values: Mapping[str, Any] | None = None) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        name = _entry_name(values or {}, item["loc"])
        if name is not None and repr(name) not in item["msg"]:
            kind = "rule" if item["loc"][0] == "rules" else "destination"
            key = f"{key} ({kind} {name!r})"
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
        except OSError as exc:
            raise ConfigError(f"cannot read the config file {config_path}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{config_path}: not UTF-8 text: {exc.reason}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config_path}: not valid TOML: {exc}") from exc
    values.update(overrides)
    try:
        return Settings(**values)
    except ValidationError as exc:
        where = f"{config_path}: " if config_path else ""
        raise ConfigError(f"invalid configuration: {where}{_describe(exc, values)}") from exc


def planar_refusal(rule: Rule, step: str, accepts: Accepts) -> str | None:
    """Why ``step`` cannot run on any series ``rule`` routes (the rule admits only 2-D
    modalities and the processor takes no 2-D image), or None (``dicom_node.modalities``)."""
    if accepts.planar:
        return None
    modalities = planar_only_modalities(rule.match)
    if modalities is None:
        return None
    kinds = ", ".join(f"{m} ({PLANAR_MODALITIES[m]})" for m in modalities)
    return (
        f"processor {step!r} takes no 2-D images (it takes {accepts.describe()}), and the"
        f" rule matches only 2-D modalities: {kinds}"
    )


def rule_plugin_problems(
    rule: Rule,
    plugin_names: Iterable[str],
    params_models: Mapping[str, type[BaseModel]] | None = None,
    accepts: Mapping[str, Accepts] | None = None,
) -> list[tuple[tuple[str | int, ...], str]]:
    """What is wrong with ``rule``'s processors: (the field at fault, a message naming it),
    e.g. ``(("pipeline", 1), "unknown processor 'x'")`` or ``(("params", "gaussian"), ...)``.
    ``params_models`` and ``accepts`` as for ``check_rules_against_plugins``."""
    known = set(plugin_names)
    problems: list[tuple[tuple[str | int, ...], str]] = []
    for index, step in enumerate(rule.pipeline):
        if step not in known:
            problems.append((("pipeline", index), f"unknown processor {step!r}"))
            continue
        takes = (accepts or {}).get(step)
        refusal = planar_refusal(rule, step, takes) if takes is not None else None
        if refusal is not None:
            problems.append((("pipeline", index), refusal))
    for step, values in rule.params.items():
        model = (params_models or {}).get(step)
        if model is None:
            continue
        try:
            model.model_validate(values)
        except ValidationError as exc:
            problems.append((("params", step), f"params for {step!r}: {_describe(exc)}"))
    return problems


def check_rules_against_plugins(
    settings: Settings,
    plugin_names: Iterable[str],
    params_models: Mapping[str, type[BaseModel]] | None = None,
    accepts: Mapping[str, Accepts] | None = None,
) -> None:
    """Refuse rules whose pipeline names a processor that is not installed.

    Kept apart from ``load_settings`` so that loading the configuration imports no
    processor. With ``params_models`` (processor name -> its ``Params`` class) each rule's
    ``params`` are validated too; with ``accepts`` (processor name -> the images it takes),
    a rule that matches only 2-D modalities may not name a processor that takes no 2-D
    image (``planar_refusal``). Disabled rules are checked as well: an admin may enable
    them at any time. Raises ``ConfigError`` naming each rule and processor at fault.
    """
    known = set(plugin_names)
    problems = [
        f"rule {rule.name!r}: {message}"
        for rule in settings.rules
        for _field, message in rule_plugin_problems(rule, known, params_models, accepts)
    ]
    if problems:
        message = "; ".join(problems)
        if "unknown processor" in message:
            message += f" (installed processors: {', '.join(sorted(known)) or 'none'})"
        raise ConfigError(message)
