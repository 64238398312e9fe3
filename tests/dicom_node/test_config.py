from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from dicom_node.config import ConfigError, DuplicatePolicy, Rule, Settings, load_settings

if TYPE_CHECKING:
    from processors.base import Accepts

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
        ('processing_device = "gpu"', "processing_device"),
        ('processing_device = "cuda:x"', "processing_device"),
        ('processing_device = ""', "processing_device"),
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


def test_a_config_file_that_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_settings(tmp_path)  # a folder
    binary = tmp_path / "node.toml"
    binary.write_bytes(b"port = 1\xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_settings(binary)


@pytest.mark.parametrize(
    ("written", "kept"),
    [(" CUDA:1 ", "cuda:1"), ("cuda", "cuda"), ("Auto", "auto"), ("cpu", "cpu")],
)
def test_processing_device_is_checked_and_normalised(written: str, kept: str) -> None:
    """Checked with the backend's own parser; whether this machine can use it is the
    command's question (``serve`` asks before it starts)."""
    assert load_settings(None, processing_device=written).processing_device == kept


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


# -- routing: destinations and rules ---------------------------------------------------------

ISSUE_EXAMPLE = """
[[destinations]]
name = "pacs"
host = "127.0.0.1"
port = 4242
ae_title = "ORTHANC"

[[rules]]
name = "ct-default"
match = { Modality = "CT" }
pipeline = ["gaussian", "threshold_segment", "kmeans", "features"]
destinations = ["pacs"]
"""

PACS_TOML = '[[destinations]]\nname = "pacs"\nhost = "h"\nport = 104\nae_title = "PACS"\n'


def builtin_processors() -> dict[str, type]:
    from processors.registry import discover

    return {
        info.name: info.processor.Params
        for info in discover(autoload=False)
        if info.processor is not None
    }


def test_issue_example_rules_and_destinations(tmp_path: Path) -> None:
    from dicom_node.config import Orientation, RegexMatch

    config = tmp_path / "node.toml"
    config.write_text(ISSUE_EXAMPLE)
    settings = load_settings(config)
    [pacs] = settings.destinations
    assert (pacs.name, pacs.host, pacs.port, pacs.ae_title) == (
        "pacs",
        "127.0.0.1",
        4242,
        "ORTHANC",
    )
    assert (pacs.calling_ae_title, pacs.max_attempts, pacs.timeout) == (None, 10, 60.0)
    assert settings.destination("pacs") is pacs
    [rule] = settings.rules
    assert rule.match == {"Modality": "CT"}
    assert rule.pipeline == ("gaussian", "threshold_segment", "kmeans", "features")
    assert rule.destinations == ("pacs",)
    assert (rule.enabled, rule.priority, rule.orientation) == (True, 0, Orientation.ANY)
    assert (rule.min_instances, rule.quiet_seconds, rule.calling_ae_titles) == (1, None, None)
    with pytest.raises(Exception, match="frozen"):
        rule.priority = 3  # type: ignore[misc]
    # A dump (what an admin API would store) validates back to the same rules.
    assert Settings(**settings.model_dump()).rules == settings.rules
    assert not isinstance(rule.match["Modality"], RegexMatch)


def test_every_rule_field(tmp_path: Path) -> None:
    from dicom_node.config import Orientation, RangeMatch, RegexMatch

    config = tmp_path / "node.toml"
    config.write_text(
        PACS_TOML
        + """calling_ae_title = "ME"
max_attempts = 3
timeout = 5

[[rules]]
name = "everything"
enabled = false
priority = 7
calling_ae_titles = ["CT1", "CT2"]
orientation = "coronal"
min_instances = 30
quiet_seconds = 12.5
pipeline = ["gaussian", "features"]
params = { gaussian = { sigma_mm = 1.5 } }
destinations = ["pacs"]

[rules.match]
Modality = ["CT", "MR"]
SeriesDescription = { regex = "(?i)chest" }
SliceThickness = { min = 0.5, max = 2 }
SeriesNumber = 2
"""
    )
    settings = load_settings(config)
    assert settings.destinations[0].calling_ae_title == "ME"
    assert settings.destinations[0].max_attempts == 3
    rule = settings.rules[0]
    assert rule.match == {
        "Modality": ("CT", "MR"),
        "SeriesDescription": RegexMatch(regex="(?i)chest"),
        "SliceThickness": RangeMatch(min=0.5, max=2.0),
        "SeriesNumber": 2,
    }
    assert rule.calling_ae_titles == ("CT1", "CT2")
    assert (rule.enabled, rule.priority, rule.orientation) == (False, 7, Orientation.CORONAL)
    assert (rule.min_instances, rule.quiet_seconds) == (30, 12.5)
    assert rule.step_params("gaussian") == {"sigma_mm": 1.5}
    assert rule.step_params("features") == {}
    # What an admin API stores (JSON) validates back to the same rule.
    assert Rule.model_validate_json(rule.model_dump_json()) == rule


RULE_ERRORS = [
    ('match = { Modalty = "CT" }', "unknown DICOM keyword 'Modalty'"),
    ('match = { ReferencedImageSequence = "x" }', "VR SQ"),
    ('match = { SeriesDescription = { regex = "(unclosed" } }', "invalid regex"),
    ('match = { SeriesDescription = { regex = "x", min = 1 } }', "regex"),
    ("match = { SliceThickness = { min = 5, max = 1 } }", "min 5 is greater than max 1"),
    ('match = { SliceThickness = { min = "thin" } }', "min and max are numbers"),
    ("match = { Modality = [] }", "empty list"),
    ("match = { Modality = true }", "a condition is"),
    ('match = { Modality = { exact = "CT" } }', "a condition table is"),
    ('destinations = ["nowhere"]', "destination 'nowhere' is not defined"),
    ("params = { kmeans = { k = 3 } }", "params for 'kmeans', which is not a step"),
    ('calling_ae_titles = ["THIS_TITLE_IS_TOO_LONG"]', "calling_ae_titles"),
    ("calling_ae_titles = []", "calling_ae_titles"),
    ('orientation = "oblique"', "orientation"),
    ("min_instances = 0", "min_instances"),
    ("quiet_seconds = 0", "quiet_seconds"),
    ('priority = "high"', "priority"),
    ("pipeline = []", "pipeline"),
    ('pipeline = [" "]', "pipeline step"),
    ('surprise = "x"', "surprise"),
]


@pytest.mark.parametrize(("line", "problem"), RULE_ERRORS)
def test_invalid_rule_is_refused_naming_it(tmp_path: Path, line: str, problem: str) -> None:
    body = {"pipeline": 'pipeline = ["gaussian"]'}
    key = line.split(" ", 1)[0]
    body[key] = line
    config = tmp_path / "node.toml"
    config.write_text(
        PACS_TOML
        + '\n[[rules]]\nname = "fine"\npipeline = ["gaussian"]\n'
        + '\n[[rules]]\nname = "chest-ct"\n'
        + "\n".join(body.values())
        + "\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    message = str(caught.value)
    assert "rule 'chest-ct'" in message
    assert problem in message
    assert "'fine'" not in message


@pytest.mark.parametrize(
    ("toml", "problem"),
    [
        (
            '[[rules]]\nname = "a"\npipeline = ["x"]\n[[rules]]\nname = "a"\npipeline = ["y"]\n',
            "rule 'a' is defined twice",
        ),
        (PACS_TOML + PACS_TOML, "destination 'pacs' is defined twice"),
        (PACS_TOML.replace("port = 104", "port = 0"), "destination 'pacs'"),
        (PACS_TOML.replace('"PACS"', '""'), "destination 'pacs'"),
        ('[[rules]]\nname = "has space"\npipeline = ["x"]\n', "rule 'has space'"),
    ],
)
def test_duplicate_and_invalid_entries_name_them(tmp_path: Path, toml: str, problem: str) -> None:
    config = tmp_path / "node.toml"
    config.write_text(toml)
    with pytest.raises(ConfigError, match=problem):
        load_settings(config)


def test_rule_errors_name_the_rule_without_a_file() -> None:
    with pytest.raises(ConfigError, match=r"rule 'r'.*unknown DICOM keyword 'Nope'"):
        load_settings(None, rules=[{"name": "r", "match": {"Nope": "x"}, "pipeline": ["a"]}])


def test_rule_with_undefined_destination_when_none_defined() -> None:
    with pytest.raises(ConfigError, match=r"rule 'r': destination 'pacs' is not defined"):
        load_settings(None, rules=[{"name": "r", "pipeline": ["a"], "destinations": ["pacs"]}])


def test_check_rules_against_plugins() -> None:
    from dicom_node.config import check_rules_against_plugins

    settings = load_settings(
        None,
        rules=[
            {"name": "good", "pipeline": ["gaussian", "kmeans"]},
            {"name": "typo", "pipeline": ["gausian"], "enabled": False},
        ],
    )
    with pytest.raises(ConfigError, match=r"rule 'typo': unknown processor 'gausian'") as caught:
        check_rules_against_plugins(settings, ["gaussian", "kmeans"])
    assert "'good'" not in str(caught.value)
    good = load_settings(
        None,
        rules=[
            {
                "name": "good",
                "pipeline": ["gaussian"],
                "params": {"gaussian": {"sigma_mm": -1}},
            }
        ],
    )
    check_rules_against_plugins(good, ["gaussian"])  # names only: fine
    params = builtin_processors()
    with pytest.raises(ConfigError, match=r"rule 'good': params for 'gaussian': sigma_mm"):
        check_rules_against_plugins(good, params, params)


def builtin_accepts() -> dict[str, Accepts]:
    from processors.registry import discover

    return {info.name: info.accepts for info in discover(autoload=False) if info.processor}


def test_shipped_rules_example_is_valid_with_builtin_processors() -> None:
    from dicom_node.config import check_rules_against_plugins

    settings = load_settings(REPO / "config" / "rules.example.toml")
    names = {rule.name for rule in settings.rules}
    assert {"ct-chest", "mr-brain", "research-scanner"} <= names
    assert any(rule.calling_ae_titles for rule in settings.rules)
    params = builtin_processors()
    check_rules_against_plugins(settings, params, params, builtin_accepts())


def test_the_rules_example_has_a_rule_per_2d_modality_through_every_family() -> None:
    """Issue 19: CR, DX, MG, US, XA, SM and OT/SC each have an enabled rule whose pipeline
    enhances or denoises, segments, clusters and measures, with processors taking 2-D."""
    from dicom_node.modalities import planar_only_modalities
    from processors.registry import discover

    families = {info.name: info.family for info in discover(autoload=False)}
    accepts = builtin_accepts()
    settings = load_settings(REPO / "config" / "rules.example.toml")
    covered: set[str] = set()
    for rule in settings.rules:
        modalities = planar_only_modalities(rule.match)
        if modalities is None:
            continue
        assert rule.enabled and rule.min_instances == 1, rule.name  # one image is a study
        steps = {families[step] for step in rule.pipeline}
        assert {"segment", "cluster", "features"} <= steps, rule.name
        assert steps & {"enhance", "denoise"}, rule.name
        assert all(accepts[step].planar for step in rule.pipeline), rule.name
        covered.update(modalities)
    assert {"CR", "DX", "MG", "US", "XA", "SM", "OT", "SC"} <= covered


@pytest.mark.parametrize(
    ("match", "refused"),
    [
        ({"Modality": "MG"}, True),
        ({"Modality": ["CR", "DX"]}, True),
        ({"Modality": "MG", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.13.1.3"}, False),
        ({"Modality": "CT"}, False),
        ({"Modality": ["US", "CT"]}, False),
        ({}, False),
    ],
)
def test_a_rule_matching_only_2d_modalities_may_not_name_a_volume_only_processor(
    match: dict[str, Any], refused: bool
) -> None:
    from dicom_node.config import check_rules_against_plugins

    settings = load_settings(
        None,
        rules=[
            {"name": "model", "match": match, "pipeline": ["gaussian", "unet"]},
            {"name": "fine", "match": match, "pipeline": ["gaussian", "kmeans"]},
        ],
    )
    params = builtin_processors()
    if not refused:
        check_rules_against_plugins(settings, params, params, builtin_accepts())
        return
    with pytest.raises(ConfigError) as caught:
        check_rules_against_plugins(settings, params, params, builtin_accepts())
    message = str(caught.value)
    assert message.startswith("rule 'model': processor 'unet' takes no 2-D images")
    assert "3-D:grey" in message and "2-D modalities" in message and "\n" not in message
    assert "'fine'" not in message and "installed processors" not in message
    check_rules_against_plugins(settings, params, params)  # without accepts: not checked


def test_commented_routing_examples_in_node_toml_are_valid(tmp_path: Path) -> None:
    """Uncommenting the examples in config/node.toml gives a valid configuration."""
    blocks: list[str] = []
    lines = (REPO / "config" / "node.toml").read_text().splitlines()
    for index, line in enumerate(lines):
        if line in ("# [[destinations]]", "# [[rules]]"):
            block = []
            for follower in lines[index:]:
                if not follower.startswith("# "):
                    break
                block.append(follower[2:])
            blocks.append("\n".join(block))
    assert len(blocks) == 3  # a C-STORE destination, a STOW-RS one, a rule
    config = tmp_path / "node.toml"
    config.write_text("\n\n".join(blocks) + "\n")
    settings = load_settings(config)
    assert [rule.name for rule in settings.rules] == ["ct-default"]
    assert [destination.name for destination in settings.destinations] == ["pacs", "archive-web"]
    assert settings.destinations[1].url == "http://pacs.example.org:8042/dicom-web"


# -- de-identifying destinations (issue 16 part 2) -------------------------------------------

OUTSIDE = {"name": "ai", "host": "ai.example.com", "port": 104, "deidentify": "basic"}
PACS = {"name": "pacs", "host": "pacs", "port": 104}


def test_a_deidentifying_destination_needs_the_key_file() -> None:
    with pytest.raises(ConfigError, match=r"deidentify.*'ai'.*needs spool_encryption_key_file"):
        load_settings(destinations=[OUTSIDE])
    settings = load_settings(
        destinations=[PACS, {**OUTSIDE, "results_to": ["pacs"]}],
        spool_encryption_key_file="node.key",
    )
    assert settings.destination("ai").results_to == ("pacs",)


@pytest.mark.parametrize(
    ("destination", "problem"),
    [
        ({**OUTSIDE, "results_to": ["nowhere"]}, "results_to names 'nowhere'"),
        ({**OUTSIDE, "results_to": ["ai"]}, "results_to names 'ai'"),
        ({**PACS, "name": "p2", "results_to": ["pacs"]}, 'need deidentify = "basic"'),
        ({**OUTSIDE, "deidentify_options": ["retain-nothing"]}, "deidentify_options"),
        (
            {
                **OUTSIDE,
                "deidentify_options": [
                    "retain-longitudinal-dates",
                    "retain-longitudinal-full-dates",
                ],
            },
            "exclude each other",
        ),
        ({**OUTSIDE, "deidentify": "full"}, "deidentify"),
    ],
)
def test_invalid_deidentification_settings_are_refused(
    destination: dict[str, object], problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem):
        load_settings(destinations=[PACS, destination], spool_encryption_key_file="node.key")
