"""Peer commands that need no running daemon."""

from __future__ import annotations

import re
import stat

import click
import pytest

from meshllm.commands.peer import ApiAddress
from meshllm.config import ApiSection, PeerSection, load_config
from meshllm.mesh.identity import JoinToken, MeshSecret
from meshllm.mesh.peerstore import bootstrap_addrs
from tests.integration.mesh_helpers import cli


def test_init_creates_a_private_home_and_is_idempotent(tmp_path):
    home = tmp_path / "p"
    out = cli(None, "init", "--home", str(home), "--name", "alpha")
    assert "initialised" in out.stdout
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert load_config(home / "config.toml").peer.name == "alpha"
    secret = MeshSecret.load(home)
    again = cli(None, "init", "--home", str(home))
    assert "already initialised" in again.stderr and MeshSecret.load(home) == secret


def test_init_no_stages_makes_a_peer_that_runs_no_layers(tmp_path):
    assert PeerSection().stages  # the default: it runs layers
    home = tmp_path / "laptop"
    cli(None, "init", "--home", str(home), "--no-stages")
    assert load_config(home / "config.toml").peer.stages is False
    cli(None, "init", "--home", str(tmp_path / "phone"))
    assert load_config(tmp_path / "phone" / "config.toml").peer.stages is True


def test_join_stores_secret_and_bootstrap(tmp_path):
    tok = JoinToken(MeshSecret(b"j" * 32), ("/ip4/127.0.0.1/tcp/9/p2p/12D3KooWabc",))
    home = tmp_path / "q"
    out = cli(home, "join", tok.encode())
    assert "joined mesh" in out.stdout
    assert MeshSecret.load(home) == tok.secret
    assert bootstrap_addrs(home) == list(tok.addrs)


def test_clear_errors_without_a_daemon_or_with_bad_input(tmp_path):
    home = tmp_path / "r"
    cli(home, "init")
    for args, message in (
        (["status"], "no daemon is running"),
        (["stop"], "no daemon is running"),
        (["invite"], "no daemon is running"),
        (["join", "garbage"], "not a meshllm join token"),
    ):
        res = cli(home, *args, check=False)
        assert res.returncode == 1 and message in res.stderr, (args, res.stderr)
        assert "Traceback" not in res.stderr
    res = cli(tmp_path / "empty", "daemon", check=False)
    assert res.returncode == 1 and "not initialised" in res.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[mesh]\nheartbeat = 1\n")
    res = cli(None, "config", "check", str(bad), check=False)
    assert res.returncode == 1 and "unknown key 'heartbeat'" in res.stderr


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("8080", "127.0.0.1", 8080),
        ("0", "127.0.0.1", 0),
        ("0.0.0.0:9000", "0.0.0.0", 9000),
        ("localhost:0", "localhost", 0),
        ("[::1]:8081", "::1", 8081),
    ],
)
def test_daemon_api_option_enables_the_api_for_one_run(text, host, port):
    section = ApiAddress().convert(text, None, None)
    assert section == ApiSection(enabled=True, host=host, port=port)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("http", "is not [HOST:]PORT"),
        ("127.0.0.1:", "is not [HOST:]PORT"),
        ("::1:8080", "IPv6 address in brackets"),
        ("70000", "port must be 0-65535"),
        ("bad host:80", "host must be an IP address or a host name"),
    ],
)
def test_daemon_api_option_rejects_bad_addresses(text, message):
    with pytest.raises(click.BadParameter, match=re.escape(message)):
        ApiAddress().convert(text, None, None)
