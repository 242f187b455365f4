from pathlib import Path

import pytest

from meshllm.config import ConfigError, default_config_text, load_config, parse_config
from meshllm.mesh.identity import (
    IdentityError,
    JoinToken,
    MeshSecret,
    create_identity,
    load_identity,
)

REPO = Path(__file__).resolve().parents[2]


def test_default_config_round_trips():
    cfg = parse_config(default_config_text("p1"))
    assert cfg.peer.name == "p1" and cfg.mesh.transport == "libp2p"
    assert cfg.peer.listen == ("/ip4/127.0.0.1/tcp/0",)
    # The HTTP API is opt-in, and on this machine only.
    assert (cfg.api.enabled, cfg.api.host, cfg.api.port) == (False, "127.0.0.1", 8080)
    assert "[api]" in default_config_text("p1")


def test_api_section_accepts_addresses_and_port_zero():
    cfg = parse_config('[api]\nenabled = true\nhost = "::1"\nport = 0')
    assert (cfg.api.enabled, cfg.api.host, cfg.api.port) == (True, "::1", 0)
    assert parse_config('[api]\nhost = "my-box.local"').api.host == "my-box.local"


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.toml")), ids=str)
def test_every_shipped_config_is_valid(path):
    if path.parent.name == "testbed":  # device-class profiles for `testbed up --profile`
        from meshllm.testbed_profile import load_profile

        assert load_profile(path).peers
        return
    load_config(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[mesh]\nhearbeat_interval_s = 1", "unknown key 'hearbeat_interval_s'"),
        ("[phone]\nx = 1", "unknown key 'phone'"),
        ('[peer]\nlisten = "/ip4/1.2.3.4/tcp/1"', "expected a list"),
        ('[mesh]\ndead_after_s = "soon"', "expected a number"),
        ("[limits]\nmax_new_tokens = 0", "max_new_tokens must be >= 1"),
        ('[plan]\nobjective = "fastest"', "objective must be one of"),
        ("[peer]\nmemory_limit_mb = -5", "memory_limit_mb must be >= 0"),
        ("[mesh]\ndead_after_s = 0.1", "dead_after_s must be longer"),
        ("[mesh]\nelection_timeout_min_s = 3.0", "election_timeout_min_s"),
        ('[log]\nlevel = "chatty"', "level must be"),
        ("[peer\nname=1", "not valid TOML"),
        ("[api]\nenabled = 1", "api.enabled: expected bool"),
        ("[api]\nport = 65536", "port must be 0-65535"),
        ("[api]\nport = -1", "port must be 0-65535"),
        ('[api]\nhost = "http://localhost"', "host must be an IP address or a host name"),
        ('[api]\nhost = ""', "host must be an IP address or a host name"),
        ("[api]\nkey = 1", "unknown key 'key'"),
    ],
)
def test_bad_configs_name_the_problem(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(text)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


def test_identity_and_secret_files_are_private(tmp_path):
    seed = create_identity(tmp_path)
    assert load_identity(tmp_path) == seed
    secret = MeshSecret.generate()
    secret.save(tmp_path)
    assert MeshSecret.load(tmp_path) == secret
    for name in ("identity.key", "secret"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600


def test_damaged_or_missing_identity(tmp_path):
    with pytest.raises(IdentityError, match="meshllm init"):
        load_identity(tmp_path)
    (tmp_path / "secret").write_text("zz")
    with pytest.raises(IdentityError, match="damaged"):
        MeshSecret.load(tmp_path)


def test_derived_keys_differ_by_purpose_and_secret():
    a, b = MeshSecret(b"a" * 32), MeshSecret(b"b" * 32)
    assert a.pnet_key != a.auth_key and a.pnet_key != b.pnet_key
    assert len(a.pnet_key) == 32 and len(a.mesh_id) == 12


def test_join_token_round_trip_and_damage():
    tok = JoinToken(MeshSecret(b"k" * 32), ("/ip4/127.0.0.1/tcp/1/p2p/Qm",))
    text = tok.encode()
    assert text.startswith("meshllm1-") and JoinToken.decode(text) == tok
    assert JoinToken.decode("  " + text + "\n") == tok
    with pytest.raises(IdentityError, match="not a meshllm join token"):
        JoinToken.decode("hello")
    with pytest.raises(IdentityError, match="damaged"):
        JoinToken.decode(text[:-10])
