"""Deployment pieces that need no running process: PKI, coordinator directory, node command line."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from typer.testing import CliRunner

from fedgov.cli import app
from fedgov.deploy.superlink import CONFIG_FILE, init_coordinator, load_coordinator
from fedgov.deploy.supernode import node_args
from fedgov.deploy.pki import create_dev_pki
from fedgov.errors import ConfigError

runner = CliRunner()


def test_dev_pki_server_certificate_is_signed_by_the_ca_for_loopback(tmp_path: Path) -> None:
    pki = create_dev_pki(tmp_path, hosts=["coordinator.example.nl", "10.0.0.5"])
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    srv = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    srv.verify_directly_issued_by(ca)
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "coordinator.example.nl"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.0.0.5")}
    for key in (pki.server_key, tmp_path / "ca.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_init_coordinator_writes_config_and_refuses_to_overwrite(tmp_path: Path) -> None:
    d = tmp_path / "coord"
    init_coordinator(d, port=9555)
    base, cfg = load_coordinator(d)
    assert cfg.port == 9555 and cfg.address == "127.0.0.1:9555"
    # The SuperLink (and its Control API) on its own loopback port; flwr and fedgov task use it.
    assert cfg.superlink_port == 9556 and cfg.control_address == "127.0.0.1:9556"
    assert cfg.path(base, cfg.ca_cert).is_file()
    flwr_cfg = (base / "flwr-home" / "config.toml").read_text()
    assert "root-certificates" in flwr_cfg and "insecure" not in flwr_cfg
    assert '"127.0.0.1:9556"' in flwr_cfg
    with pytest.raises(ConfigError):
        init_coordinator(d)
    (d / CONFIG_FILE).write_text("port = 'x'\n")
    with pytest.raises(ConfigError):
        load_coordinator(d)


def test_public_host_never_reaches_the_superlink(tmp_path: Path) -> None:
    init_coordinator(tmp_path / "c", host="0.0.0.0", port=9092, superlink_port=9300)
    base, cfg = load_coordinator(tmp_path / "c")
    from fedgov.deploy.superlink import gateway_args, superlink_args

    link = superlink_args(base, cfg)
    assert link[link.index("--host") + 1] == "127.0.0.1" and link[link.index("--port") + 1] == "9300"
    assert "--enable-supernode-auth" in link and "--insecure" not in link and "--ssl-certfile" in link
    gw = gateway_args(base, cfg)
    assert gw[gw.index("--host") + 1] == "0.0.0.0" and gw[gw.index("--port") + 1] == "9092"
    assert gw[gw.index("--upstream") + 1] == "https://127.0.0.1:9300"
    assert cfg.address == "127.0.0.1:9092"  # as seen from this host
    with pytest.raises(ConfigError):
        init_coordinator(tmp_path / "d", port=9400, superlink_port=9400)


def test_node_command_line_uses_tls_and_the_node_key(tmp_path: Path) -> None:
    args = node_args(tmp_path, "GM0363", "127.0.0.1:9092", tmp_path / "ca.crt", 9100)
    assert "--insecure" not in args
    assert args[args.index("--auth-supernode-private-key") + 1] == str(tmp_path / "node-key")
    assert args[args.index("--node-config") + 1] == f"node-name='GM0363' node-dir='{tmp_path}'"
    with pytest.raises(ConfigError):
        node_args(tmp_path / "it's", "GM0363", "127.0.0.1:9092", tmp_path / "ca.crt", 9100)


def test_cli_registers_deploy_commands(tmp_path: Path) -> None:
    for group in (["coordinator", "--help"], ["local-federation", "--help"], ["task", "list", "--help"],
                  ["task", "status", "--help"], ["task", "stop", "--help"], ["app", "hash", "--help"]):
        out = runner.invoke(app, group)
        assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["coordinator", "init", str(tmp_path / "c"), "--port", "9556"])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "c" / "pki" / "server.pem").is_file()
    out = runner.invoke(app, ["coordinator", "nodes", "--coordinator-dir", str(tmp_path / "missing")])
    assert out.exit_code == 10, out.output
