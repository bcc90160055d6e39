"""Settings: precedence, validation messages naming the key, and docs that match."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from boldstream.config import Settings, load_settings
from boldstream.errors import ConfigError

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_precedence_defaults_toml_env_overrides(tmp_path: Path) -> None:
    toml = tmp_path / "site.toml"
    toml.write_text('[receiver]\nport = 104\nae_title = "FROMTOML"\nbind = "0.0.0.0"\n')
    s = load_settings(
        toml,
        overrides=["receiver.ae_title=FROMCLI"],
        environ={"BOLDSTREAM_RECEIVER__PORT": "2000", "BOLDSTREAM_RECEIVER__AE_TITLE": "FROMENV"},
    )
    assert s.receiver.port == 2000  # env beats TOML
    assert s.receiver.ae_title == "FROMCLI"  # CLI beats env
    assert s.receiver.bind == "0.0.0.0"  # TOML beats default
    assert s.assembly.volume_timeout_s == 10.0  # default


def test_env_values_parse_as_toml() -> None:
    s = load_settings(
        environ={
            "BOLDSTREAM_RECEIVER__ALLOWED_CALLING_AETS": '["A", "B"]',
            "BOLDSTREAM_RECEIVER__FSYNC": "false",
        }
    )
    assert s.receiver.allowed_calling_aets == ("A", "B")
    assert s.receiver.fsync is False


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("receiver.prot=1", "receiver.prot: unknown setting"),
        ("receiver.port=70000", "receiver.port:"),
        ("receiver.ae_title='A\\\\B'", "receiver.ae_title:"),
        ("assembly.volume_timeout_s=0", "assembly.volume_timeout_s:"),
        (
            "selector.include_description='('",
            "selector.include_description: Value error, not a valid regular expression",
        ),
        ("assembly.temporal_key='Nope'", "assembly.temporal_key:"),
        ("nosection.key=1", "nosection: unknown setting"),
        # 19 surrogates cannot give p <= 0.01 (the smallest p is 1/20)
        ("target.null_surrogates=19", "null_surrogates = 19 cannot give p <= 0.01 (stable_p)"),
    ],
)
def test_errors_name_the_bad_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(overrides=[override], environ={})
    assert key in str(info.value)


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[receiver\nport = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad, environ={})
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.toml", environ={})


def test_override_syntax_errors() -> None:
    with pytest.raises(ConfigError, match=r"<section>\.<key>=<value>"):
        load_settings(overrides=["receiver.port"], environ={})
    with pytest.raises(ConfigError, match=r"<section>\.<key>"):
        load_settings(overrides=["port=1"], environ={})


def test_settings_are_frozen() -> None:
    s = load_settings(environ={})
    with pytest.raises(Exception, match="frozen"):
        s.receiver.port = 1  # type: ignore[misc]


def test_every_setting_is_documented() -> None:
    text = DOCS.read_text()
    for section, model in Settings.model_fields.items():
        assert f"`[{section}]`" in text, f"docs/configuration.md lacks section [{section}]"
        sub = model.annotation
        assert sub is not None
        for name, field in sub.model_fields.items():  # type: ignore[union-attr]
            key = field.alias or name
            assert re.search(rf"\| `{key}` \|", text), (
                f"docs/configuration.md lacks {section}.{key}"
            )


def test_settings_survive_json_for_a_child_process() -> None:
    """The receiver's ingest process gets its settings as JSON (aliases included)."""
    settings = load_settings(
        overrides=["logging.json=true", "receiver.port=0", "selector.exclude_image_types=['P']"],
        environ={},
    )
    again = Settings.model_validate_json(settings.model_dump_json(by_alias=True))
    assert again == settings
