"""What a node sends the coordinator about itself is text the coordinator prints (its terminal,
its reports, its console): a malicious node's name, code or refusal text must not carry
terminal control sequences or bidirectional overrides into them (issue 19/20 review)."""

from __future__ import annotations

import pytest

from fedgov import protocol as P

NASTY = "Utrecht\x1b]8;;http://evil.example\x1b\\click\x1b]8;;\x1b\\\x1b[2J\u202egnp.exe\r\x07"


@pytest.mark.parametrize("model", [P.NodeHello, P.StatsAnswer])
def test_control_and_format_characters_never_reach_the_coordinator(model: type[P.NodeHello] | type[P.StatsAnswer]) -> None:
    raw = model(node="GM0344\x1b[31m", node_name=NASTY, accepted=False, code="x\x1b[0m", reason="no\x1b[2K")
    again = model.model_validate_json(raw.model_dump_json())
    for m in (raw, again):
        for text in (m.node, m.node_name, m.code or "", m.reason):
            assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or c in "\u202e\u200b" for c in text), repr(text)
        assert m.node == "GM0344[31m" and m.node_name.startswith("Utrecht]8;;http://evil.example")


def test_an_honest_name_is_kept_as_it_is_and_a_long_one_is_cut() -> None:
    name = "Gemeente 's-Hertogenbosch – Zuid (Noord-Brabant) ä"
    assert P.NodeHello(node="GM0796", node_name=name, accepted=True).node_name == name
    assert len(P.StatsAnswer(node="GM0796", node_name="x" * 10_000, accepted=True).node_name) == 200


def test_the_node_audit_log_shows_what_the_coordinator_sent_as_plain_text(node_home) -> None:  # type: ignore[no-untyped-def]
    """A message kind (or error text) the coordinator chose is in the node's audit log; printing
    it for the privacy officer must neither run it as Rich markup nor send its escape sequences
    to the terminal (they could hide or forge lines)."""
    from typer.testing import CliRunner

    from fedgov.cli import app

    home = node_home()
    home.audit.append("received", task_id="t-1", payload={"kind": "[red]forged[/red]\x1b[2J\x1b[1A", "error": {"reason": "\x1b]0;x\x07"}})
    out = CliRunner().invoke(app, ["node", "audit", "show", "--node-dir", str(home.path)])
    assert out.exit_code == 0, out.output
    assert "\x1b" not in out.output and "\x07" not in out.output
    assert "[red]forged[/red]" in out.output.replace("\n", "").replace("│", "").replace(" ", "")
