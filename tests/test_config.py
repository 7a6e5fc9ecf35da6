from pathlib import Path

import pytest

from gateway.config import default_config, load_config
from gateway.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


GOOD = """
[server]
host = "127.0.0.1"
port = 9000
[registry]
url = "sqlite:///db/registry.db"
[auth]
open = true
[[sources]]
name = "pacs"
kind = "filesystem"
path = "archive"
interval = 60
"""


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    config = load_config(write(tmp_path, GOOD), env={})
    assert config.server.port == 9000
    assert config.registry_path == tmp_path / "db" / "registry.db"
    assert config.sources[0].path == tmp_path / "archive"
    assert config.sources[0].interval == 60


def test_environment_overrides_the_file(tmp_path):
    config = load_config(write(tmp_path, GOOD), env={"GATEWAY_PORT": "9100", "GATEWAY_HOST": "::1"})
    assert (config.server.host, config.server.port) == ("::1", 9100)


def test_embedded_default_serves_the_fixtures_on_loopback(tmp_path):
    config = default_config({"GATEWAY_DATA_DIR": str(tmp_path)})
    assert config.embedded
    assert config.server.host == "127.0.0.1" and config.server.port == 8080
    assert config.registry_path == tmp_path / "registry.db"
    assert config.sources[0].path.name == "dicom"


@pytest.mark.parametrize(
    "text,words",
    [
        ("[server]\nport = 'x'\n", "server.port: expected int"),
        ("[server]\nport = 70000\n[registry]\nurl='sqlite:///a.db'\n", "server.port: 70000"),
        ("[server]\nhots = 'x'\n", "server.hots: unknown key"),
        ("[registry]\nurl = 'mysql://x'\n", "registry.url"),
        (
            "[registry]\nurl='sqlite:///a.db'\n[[sources]]\nname='a'\nkind='ftp'\npath='x'\n",
            "sources[0].kind",
        ),
        (
            "[registry]\nurl='sqlite:///a.db'\n[[sources]]\nname='a'\nkind='filesystem'\n",
            "sources[0].path: missing",
        ),
        (
            "[registry]\nurl='sqlite:///a.db'\n[[sources]]\nname='a'\nkind='filesystem'\npath='x'\n"
            "[[sources]]\nname='a'\nkind='filesystem'\npath='y'\n",
            "used twice",
        ),
        ("[registry\n", "not valid TOML"),
        ("[registry]\n", "registry.url: missing"),
        (
            "[registry]\nurl='sqlite:///a.db'\n[[sources]]\nname='a'\nkind='dicomweb'\n"
            "url='https://user:pw@pacs.example/dicom-web'\n",
            "sources[0].url: credentials in the URL",
        ),
        ("[server]\npublic_url = 'ftp://x'\n", "server.public_url"),
        ("[server]\ntrusted_proxies = ['not-an-address']\n", "server.trusted_proxies"),
        ("[server]\nhsts_seconds = -1\n", "server.hsts_seconds"),
        (
            "[registry]\nurl='sqlite:///a.db'\n[auth]\nopen = true\nopen_beyond_loopback = 'yes'\n",
            "auth.open_beyond_loopback",
        ),
    ],
    ids=[
        "port-type",
        "port-range",
        "unknown-key",
        "registry-scheme",
        "source-kind",
        "source-path",
        "duplicate-name",
        "toml-syntax",
        "registry-missing",
        "url-credentials",
        "public-url",
        "trusted-proxies",
        "hsts",
        "open-beyond-loopback",
    ],
)
def test_bad_config_gets_one_line_naming_the_key(tmp_path, text, words):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text), env={})
    assert words in error.value.message
    assert "\n" not in error.value.message


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml", env={})


REGISTRY = "[registry]\nurl='sqlite:///a.db'\n"


@pytest.mark.parametrize(
    "auth,words",
    [
        ("", "auth: no issuer configured"),
        ("[auth]\nopen = 'yes'\n", "auth.open: expected true or false"),
        ("[[auth.issuers]]\nissuer='https://i'\njwks_file='k.json'\n", "issuer and audience"),
        ("[[auth.issuers]]\nissuer='https://i'\naudience='gw'\n", "one of jwks_url"),
        (
            "[[auth.issuers]]\nissuer='https://i'\naudience='gw'\njwks_file='k'\nrole='admin'\n",
            "auth.issuers[0].role",
        ),
        (
            "[[auth.issuers]]\nissuer='https://i'\naudience='gw'\njwks_file='k'\norganizations_of='https://i'\n",
            "only for a system issuer",
        ),
        (
            "[[auth.issuers]]\nissuer='https://c'\naudience='gw'\njwks_file='k'\nrole='system'\n"
            "organizations_of='https://psc'\n",
            "'https://psc' is not a configured professional issuer",
        ),
    ],
    ids=[
        "no-auth",
        "open-type",
        "no-audience",
        "no-keys",
        "bad-role",
        "namespace-of-a-professional",
        "namespace-unknown",
    ],
)
def test_access_control_must_be_configured_or_explicitly_open(tmp_path, auth, words):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, REGISTRY + auth), env={})
    assert words in error.value.message


def test_open_access_off_loopback_is_noted(tmp_path):
    config = load_config(
        write(tmp_path, "[server]\nhost='0.0.0.0'\n" + REGISTRY + "[auth]\nopen=true\n"), env={}
    )
    assert config.auth.open and "anyone who can reach" in config.notes[0]


def test_the_access_database_sits_beside_the_registry_by_default(tmp_path):
    config = load_config(write(tmp_path, REGISTRY + "[auth]\nopen=true\n"), env={})
    assert config.access_database == f"sqlite:///{tmp_path / 'access.db'}"


def test_a_postgresql_registry_keeps_its_files_in_a_data_directory(tmp_path):
    text = "[registry]\nurl='postgresql://gw:secret@db.example/gateway'\n[auth]\nopen=true\n"
    config = load_config(write(tmp_path, text), env={})
    assert config.registry_url.startswith("postgresql://")
    assert "secret" not in str(config.registry_path)  # messages never show the password
    assert config.data_dir == tmp_path / "data"
    assert config.access_database == config.registry_url  # every node sees the same decisions


DIMSE = "[[sources]]\nname = 'pacs'\nkind = 'dimse'\nhost = '10.0.0.5'\n"


def test_a_dimse_source_opts_in_to_prefetch_and_the_section_bounds_it(tmp_path):
    text = REGISTRY + "[auth]\nopen=true\n" + DIMSE + "prefetch = true\n"
    text += "[prefetch]\npriors = 3\nmax_instances = 200\nwithin_days = 0\ntimeout = 60\n"
    config = load_config(write(tmp_path, text), env={})
    assert config.sources[0].prefetch
    assert (config.prefetch.priors, config.prefetch.max_instances) == (3, 200)
    assert (config.prefetch.within_days, config.prefetch.timeout) == (0, 60.0)


def test_prefetch_is_off_by_default_and_bounded_like_invoke_image_display(tmp_path):
    config = load_config(write(tmp_path, REGISTRY + "[auth]\nopen=true\n" + DIMSE), env={})
    assert not config.sources[0].prefetch
    bounds = config.prefetch
    assert (bounds.priors, bounds.max_instances, bounds.within_days, bounds.timeout) == (2, 1000, 7, 300.0)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (
            "[[sources]]\nname='a'\nkind='filesystem'\npath='x'\nprefetch=true\n",
            "sources[0].prefetch: only a dimse source prefetches",
        ),
        (DIMSE + "prefetch = 'yes'\n", "sources[0].prefetch: expected true or false"),
        ("[prefetch]\npriors = 6\n", "prefetch.priors: an integer from 1 to 5"),
        ("[prefetch]\npriors = 0\n", "prefetch.priors"),
        ("[prefetch]\nmax_instances = 0\n", "prefetch.max_instances"),
        ("[prefetch]\nwithin_days = -1\n", "prefetch.within_days"),
        ("[prefetch]\ntimeout = 0\n", "prefetch.timeout"),
        ("[prefetch]\nmax_bytes = 10\n", "prefetch.max_bytes: unknown key"),
    ],
    ids=["folder", "type", "too-many", "none", "instances", "days", "timeout", "unknown"],
)
def test_a_bad_prefetch_key_is_named(tmp_path, text, words):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, REGISTRY + "[auth]\nopen=true\n" + text), env={})
    assert words in error.value.message


def test_the_change_feed_is_kept_30_days_by_default_0_keeping_it_forever(tmp_path):
    base = REGISTRY + "[auth]\nopen=true\n"
    assert load_config(write(tmp_path, base), env={}).changes_keep_days == 30.0
    config = load_config(write(tmp_path, base + "[changes]\nkeep_days = 0\n"), env={})
    assert config.changes_keep_days == 0.0
    for wrong in ("keep_days = -1", "keep_days = 1e6", "keep_days = true"):
        with pytest.raises(ConfigError, match="changes.keep_days"):
            load_config(write(tmp_path, base + f"[changes]\n{wrong}\n"), env={})


def test_a_dimse_source_takes_instance_availability_notifications_on_ian_port(tmp_path):
    base = REGISTRY + "[auth]\nopen=true\n" + DIMSE
    assert load_config(write(tmp_path, base), env={}).sources[0].ian_port is None
    assert load_config(write(tmp_path, base + "ian_port = 11113\n"), env={}).sources[0].ian_port == 11113


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (DIMSE + "ian_port = '11113'\n", "sources[0].ian_port: expected int"),
        (DIMSE + "ian_port = 0\n", "sources[0].ian_port: 0 is outside 1-65535"),
        (DIMSE + "ian_port = 70000\n", "sources[0].ian_port: 70000 is outside 1-65535"),
        (
            DIMSE + "retrieve = 'c-move'\nmove_destination_port = 11112\nian_port = 11112\n",
            "sources[0].ian_port: 11112 is move_destination_port too",
        ),
        (
            "[[sources]]\nname='a'\nkind='filesystem'\npath='x'\nian_port=11113\n",
            "sources[0].ian_port: unknown",
        ),
    ],
    ids=["type", "zero", "range", "move-port", "folder"],
)
def test_a_bad_ian_port_is_named(tmp_path, text, words):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, REGISTRY + "[auth]\nopen=true\n" + text), env={})
    assert words in error.value.message
