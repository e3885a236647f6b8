"""``transmural report`` and ``transmural login``: messages and exit codes; search filters.

Most of these run without a network (the mistakes a clinician makes before
any call); ``login`` is also checked against one real node, since its
check is the gateway's standard health service.
"""

from __future__ import annotations

import io
import json
import os
import stat
from datetime import date
from pathlib import Path

import pytest
from fhir.resources.R4B.bundle import Bundle

from tests.conftest import NetworkFactory
from tests.test_clinician_cli import signed_in, transmural
from tests.test_search import at_least, bsn_of
from tools import clinician
from tools.gateway_client import Document, FacilityItems, FacilityResult, Holders
from tools.render import DocumentFilter, FetchProgress, LiveStatus


@pytest.fixture(autouse=True)
def no_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No client file, no TRANSMURAL_* from the machine running the tests."""
    for name in list(os.environ):
        if name.startswith("TRANSMURAL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = clinician.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_documents_every_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        clinician.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "Exit codes:" in out
    for code in ("0", "1", "2", "3", "4", "5"):
        assert f"\n  {code}  " in out
    exit_5 = out.split("\n  5  ")[1]
    assert "the network could not answer" in exit_5 and "registry" in exit_5
    exit_3 = " ".join(out.split("\n  3  ")[1].split("\n  4  ")[0].split())
    assert "your node is not reachable" in exit_3
    assert "busy (too many requests at once, or you already have 16 running there)" in exit_3
    for command in ("login", "search", "report", "fetch"):
        assert f"transmural {command}" in out


@pytest.mark.parametrize(
    ("identifier", "says"),
    [
        ("bsn|111222334", "fails the 11-check"),
        ("http://fhir.nl/fhir/NamingSystem/bsn|12345", "9 digits"),
        ("|111222333", "empty system"),
        ("  ", "empty"),
    ],
)
def test_report_bad_identifier_exit_2_before_any_call(
    capsys: pytest.CaptureFixture[str], identifier: str, says: str
) -> None:
    code, out, err = run(capsys, "report", identifier)  # no node given: never asked
    assert code == 2 and says in err and out == ""
    assert err.startswith("transmural: ") and err.count("\n") == 1


@pytest.mark.parametrize(
    "args",
    [
        ["--config", "/no/such/client\x1b[31m.json", "search", "111222333"],  # ClientError
        ["report", "111222333", "--fhir\x1b[2J"],  # argparse, in a command's own parser
    ],
)
def test_every_error_line_escapes_control_characters(
    capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    """What the clinician typed is quoted escaped: a raw ESC would drive the terminal."""
    try:
        code = clinician.main(args)
    except SystemExit as exit_:
        code = exit_.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    assert code == 2, err
    assert "\x1b" not in err and "\\x1b[" in err, err
    assert err.count("\n") == 1


def test_report_without_node_or_token_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "report", "111222333")
    assert code == 2 and "no node given" in err
    code, _, err = run(capsys, "report", "111222333", "--node", "127.0.0.1:1")
    assert code == 2 and "no clinician token" in err


def test_report_node_not_reachable_exit_3(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(
        capsys, "--node", "127.0.0.1:1", "--token", "t", "--insecure-dev", "report", "111222333"
    )
    assert code == 3 and "cannot reach your node at 127.0.0.1:1" in err


def test_report_json_and_fhir_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        clinician.main(["report", "111222333", "--json", "--fhir"])
    assert exit_.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


def test_search_bad_date_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        clinician.main(["search", "111222333", "--since", "23-11-2023"])
    assert exit_.value.code == 2
    assert "YYYY-MM-DD" in capsys.readouterr().err


def test_search_reversed_dates_exit_2_before_any_call(capsys: pytest.CaptureFixture[str]) -> None:
    """A reversed range matches nothing: saying "0 of 8 documents match" hides the typo."""
    node = ["--node", "127.0.0.1:1", "--token", "t", "--insecure-dev"]
    code, out, err = run(
        capsys, *node, "search", "111222333", "--since", "2024-01-01", "--until", "2023-01-01"
    )
    assert code == 2 and out == "", err
    assert "2024-01-01" in err and "2023-01-01" in err and "--since" in err
    code, _, err = run(
        capsys, *node, "search", "111222333", "--since", "2024-01-01", "--until", "2024-01-01"
    )
    assert code == 3, "one day (both inclusive) is a range: the node is asked"


@pytest.mark.parametrize("text", ["", "  "])
def test_search_empty_type_exit_2(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        clinician.main(["search", "111222333", "--type", text])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--type" in err and "empty" in err and err.count("\n") == 1


def test_login_refuses_incomplete_or_broken_settings(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "client.json"
    not_pem = tmp_path / "ca.crt"
    not_pem.write_text("hello")
    base = ["login", "--config", str(config), "--node", "127.0.0.1:1"]
    for extra, says in [
        ([], "no clinician token"),
        (["--token", "t"], "no network CA"),
        (["--token", "t", "--ca", str(not_pem)], "no node id"),
        (["--token", "t", "--ca", str(not_pem), "--node-id", "n1"], "not a PEM certificate"),
        (["--token", "tmu1_a b", "--insecure-dev"], "spaces"),
    ]:
        code, _, err = run(capsys, *base, *extra)
        assert code == 2 and says in err, (extra, err)
    assert not config.exists()


def test_login_node_not_reachable_exit_3_writes_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "client.json"
    code, _, err = run(capsys, "login", "--config", str(config), "--node", "127.0.0.1:1",
                       "--token", "tmu1_x", "--insecure-dev")  # fmt: skip
    assert code == 3 and "cannot reach your node" in err
    assert not config.exists()


def test_login_no_check_writes_owner_only_even_over_a_loose_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "conf" / "client.json"
    config.parent.mkdir()
    config.write_text("{}")
    config.chmod(0o644)
    monkeypatch.setenv("TRANSMURAL_CONFIG", str(config))
    monkeypatch.setenv("TRANSMURAL_TOKEN", "tmu1_from_env")
    code, _, err = run(capsys, "login", "--node", "127.0.0.1:1", "--insecure-dev", "--no-check")
    assert code == 0 and "not asked" in err
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert json.loads(config.read_text()) == {"node": "127.0.0.1:1", "token": "tmu1_from_env"}


async def test_login_checks_the_node_then_commands_use_the_file(
    network: NetworkFactory, tmp_path: Path
) -> None:
    net = await network(n=1)
    flags = signed_in(net)
    config = tmp_path / "client.json"
    code, _, err = await transmural("login", "--config", str(config), *flags)
    assert code == 0, err
    assert f"node {net.nodes[0].config.node_id} answers" in err and "first search" in err
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    saved = json.loads(config.read_text())
    assert Path(saved["ca_certificate"]).is_absolute()
    # An unknown (valid) patient: the file carried node, CA, node id and token.
    code, out, err = await transmural("--config", str(config), "search", "111222333")
    assert code == 1, err
    assert "No facility" in out

    wrong_id = [*flags[:-1], "node-9"]
    code, _, err = await transmural("login", "--config", str(tmp_path / "other.json"), *wrong_id)
    assert code == 3 and not (tmp_path / "other.json").exists()


def document(created: str, display: str = "Discharge summary", code: str = "18842-5") -> Document:
    return Document("d", "title", code, display, "text/plain", 10, "", created, "")


def test_document_filter_type_and_inclusive_dates() -> None:
    docs = [
        document("2023-01-01T10:00:00Z"),
        document("2023-06-30", "Lab report", "11502-2"),
        document("2024-02-02T00:00:00+01:00"),
        document(""),
    ]
    results = [FacilityResult("n1", "Org", "ok", 5, documents=docs)]
    only = DocumentFilter(since=date(2023, 6, 30), until=date(2024, 2, 2))
    assert [d.created[:10] for d in only.apply(results)[0].documents] == [
        "2023-06-30",
        "2024-02-02",
    ]
    assert len(DocumentFilter("DISCHARGE").apply(results)[0].documents) == 3
    assert len(DocumentFilter("11502").apply(results)[0].documents) == 1
    assert not DocumentFilter().active and DocumentFilter("x").active


def test_live_status_without_a_terminal_prints_plain_lines() -> None:
    out = io.StringIO()
    with LiveStatus(out) as status:
        status.located(Holders(["n1", "n2"], ["One", "Two"], "c"))
        status.answered(FacilityItems("n1", "One", "ok", 7, items=[]))
        status.answered(FacilityItems("n2", "Two", "timeout", 3000, "no answer"))
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("2 facilities hold data")
    assert "0 entries" in lines[1] and "no answer" in lines[2]
    assert "\x1b[" not in out.getvalue()


def test_fetch_progress_is_silent_off_a_terminal() -> None:
    err = io.StringIO()
    progress = FetchProgress("doc", err, threshold=1)
    progress(10, 100)
    progress.close()
    assert err.getvalue() == ""


async def test_report_end_to_end_tables_json_and_fhir(
    network: NetworkFactory, synthetic_bundles: Path
) -> None:
    """A patient seen at several facilities: one report, every facility's entries in it."""
    net = await network(n=3)
    plan = await net.load(synthetic_bundles)
    await net.consent_all(True)
    bsn = bsn_of(plan, at_least(plan, 2)[0])
    node = signed_in(net)

    code, out, err = await transmural(*node, "report", bsn, "--json")
    assert code == 0, err
    answer = json.loads(out)
    answered = {f["node_id"] for f in answer["facilities"] if f["status"] == "ok"}
    assert len(answered) >= 2
    encounters = answer["sections"]["encounters"]["rows"]
    assert answer["sections"]["encounters"]["omitted"] == 0, "--json holds every row"
    assert {s["node_id"] for r in encounters for s in r["sources"]} == answered
    assert answer["sections"]["problems"]["rows"]

    code, out, err = await transmural(*node, "report", bsn, "--fhir")
    assert code == 0, err
    bundle = Bundle.model_validate_json(out)
    assert bundle.type == "collection" and bundle.entry

    code, out, err = await transmural(*node, "report", bsn)
    assert code == 0, err
    assert "Live report for" in out and "Encounters" in out
    assert all(node_id in out for node_id in answered)


def test_an_empty_option_is_an_error_not_the_files_value(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``--token "$TOKEN"`` with TOKEN unset must not quietly send the saved token."""
    config = tmp_path / "client.json"
    code, _, _ = run(capsys, "login", "--config", str(config), "--node", "127.0.0.1:1",
                     "--token", "tmu1_saved", "--insecure-dev", "--no-check")  # fmt: skip
    assert code == 0 and "tmu1_saved" in config.read_text()
    for option in ("--token", "--node"):
        code, _, err = run(capsys, "--config", str(config), option, "", "search", "111222333")
        assert code == 2 and f"{option} is empty" in err, err
        code, _, err = run(capsys, "--config", str(config), option, " ", "search", "111222333")
        assert code == 2 and f"{option} is blank" in err, err
    # Path("") is the current folder: it must not be read (or blamed) as the client file.
    for command in (["search", "111222333"], ["login", "--token", "t", "--no-check"]):
        code, _, err = run(capsys, "--config", "", "--node", "127.0.0.1:1", "--insecure-dev",
                           *command)  # fmt: skip
        assert code == 2 and "--config is empty" in err, (command, err)


@pytest.mark.parametrize(
    "address", ["node.example", "node.example:http", ":7200", "node.example:0", "a b:7200"]
)
def test_a_node_address_must_be_host_port(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, address: str
) -> None:
    """Bad input (exit 2) from a flag or the environment, not an unreachable node (exit 3)."""
    code, _, err = run(capsys, "--node", address, "--token", "t", "--insecure-dev",
                       "search", "111222333")  # fmt: skip
    assert code == 2 and "is not HOST:PORT" in err, err
    monkeypatch.setenv("TRANSMURAL_NODE", address)
    code, _, err = run(capsys, "--token", "t", "--insecure-dev", "report", "111222333")
    assert code == 2 and "is not HOST:PORT" in err, err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [False, True])
def test_live_status_shows_what_the_network_sent_as_text(terminal: bool) -> None:
    """A facility's name or message, or the node's incomplete reason, holding rich markup
    or a terminal escape is shown as text: never parsed (``[/x]`` would raise), never obeyed."""
    odd = "[/x] \x1b[2J"
    out = _Terminal() if terminal else io.StringIO()
    with LiveStatus(out) as status:
        status.located(Holders(["n1", "n2"], [odd, "Two"], "c", f"registry down {odd}"))
        status.answered(FacilityItems("n1", odd, "timeout", 3000, f"no answer {odd}"))
        status.answered(FacilityItems("n2", "Two", "error", 5, odd))
    text = out.getvalue()
    assert "\x1b[2J" not in text and "[/x] \\x1b[2J" in text
    assert "registry down [/x]" in text and "no answer [/x]" in text


def test_login_token_dash_reads_it_from_standard_input(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token never on the command line, where `ps` shows it to everyone."""
    config = tmp_path / "client.json"
    base = ["login", "--config", str(config), "--node", "127.0.0.1:1", "--insecure-dev",
            "--no-check", "--token", "-"]  # fmt: skip
    monkeypatch.setattr("sys.stdin", io.StringIO("tmu1_from_stdin\n"))
    code, _, err = run(capsys, *base)
    assert code == 0, err
    assert json.loads(config.read_text())["token"] == "tmu1_from_stdin"
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    code, _, err = run(capsys, *base)
    assert code == 2 and "no token on standard input" in err
