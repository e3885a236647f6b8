"""``transmural-admin`` as an operator meets it: help, usage errors, ingest reports."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from node.config import NodeConfig
from tests.test_ingest import bundle_of, dutch_patient
from tools import admin
from tools.synthetic import generate
from transmural.pseudonym import new_network_key, write_network_key


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


def test_every_flag_and_argument_has_help() -> None:
    for name, command in subcommands(admin._parser()).items():
        for action in command._actions:
            assert action.help, f"{name} {action.dest} has no help text"


def test_help_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        admin.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "Exit codes:" in out
    for code in ("0", "1", "2", "130"):
        assert f"\n  {code} " in out


@pytest.mark.parametrize("nodes", ["0", "51", "-3", "three", "2.5"])
def test_devnet_nodes_out_of_range_is_one_line(
    nodes: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        admin.main(["devnet", "--nodes", nodes])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "--nodes" in err and "1 to 50" in err and repr(nodes) in err


def node_config(tmp_path: Path) -> Path:
    key = tmp_path / "network.key"
    write_network_key(key, new_network_key())
    config = NodeConfig(
        node_id="node-1",
        organisation_name="Test",
        registry="127.0.0.1:1",
        database=tmp_path / "node.db",
        network_key_file=key,
        insecure_dev=True,  # ingest needs no certificates; it never talks to the network
    )
    path = tmp_path / "node.toml"
    path.write_text(config.to_toml(tmp_path))
    return path


def test_ingest_folder_reports_skipped_and_refused_with_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = node_config(tmp_path)
    folder = tmp_path / "bundles"
    generate(folder, patients=2)
    (folder / "README.txt").write_text("not a bundle")
    (folder / "notes.md").write_text("not a bundle")
    (folder / "older").mkdir()
    (folder / "zz-broken.json").write_text('{"resourceType": "Patient"}')

    assert admin.main(["ingest", "--config", str(config), str(folder)]) == 1
    captured = capsys.readouterr()
    assert f"refused: {folder / 'zz-broken.json'}: resourceType" in captured.err
    summary = captured.out.strip().splitlines()[-1]
    assert "1 refused" in summary
    assert summary.endswith("; skipped 2 files not *.json or hidden and 1 sub-folder"), summary


def test_ingest_file_refused_names_the_path_as_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = node_config(tmp_path)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.json").write_text(json.dumps({"resourceType": "Patient"}))
    monkeypatch.chdir(tmp_path)

    given = os.path.join("in", "broken.json")
    assert admin.main(["ingest", "--config", str(config), given]) == 1
    err = capsys.readouterr().err
    assert f"refused: {given}: resourceType" in err
    # The refused ingest is audited too (its start, then its end), naming the folder only.
    with sqlite3.connect(tmp_path / "node.db") as db:
        rows = db.execute(
            "SELECT action, outcome, outcome_reason FROM audit_log ORDER BY seq"
        ).fetchall()
    assert [(action, outcome) for action, outcome, _ in rows] == [
        ("ingest-start", "granted"), ("ingest", "error"),
    ]  # fmt: skip
    assert "1 bundle file from in" in rows[0][2] and "1 refused" in rows[1][2]
    assert all("broken.json" not in reason for _, _, reason in rows)


def test_ingest_of_many_files_given_is_one_batch_audited_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``ingest data/*.json``: one summary, one audit pair, files refused by their own path."""
    config = node_config(tmp_path)
    folder = tmp_path / "bundles"
    generate(folder, patients=3)
    broken = folder / "zz-broken.json"
    broken.write_text("not json")
    given = sorted(str(f) for f in folder.glob("*.json"))

    assert admin.main(["ingest", "--config", str(config), *given]) == 1
    captured = capsys.readouterr()
    assert f"refused: {broken}: " in captured.err
    (summary,) = captured.out.strip().splitlines()
    assert summary.startswith(f"3 bundles from {len(given)} files: 3 patients, "), summary
    assert summary.endswith("; 1 refused")
    with sqlite3.connect(tmp_path / "node.db") as db:
        rows = db.execute("SELECT action, outcome_reason FROM audit_log ORDER BY seq").fetchall()
    assert [action for action, _ in rows] == ["ingest-start", "ingest"]
    assert rows[0][1] == f"{len(given)} bundle files from {folder}"


def test_ingest_again_says_no_patient_is_new(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = node_config(tmp_path)
    folder = tmp_path / "bundles"
    generate(folder, patients=2)
    assert admin.main(["ingest", "--config", str(config), str(folder)]) == 0
    first = capsys.readouterr().out
    assert ": 2 patients, " in first and "new to this node" not in first
    assert admin.main(["ingest", "--config", str(config), str(folder), str(folder)]) == 0
    # The folder given twice is loaded once; its two patients are not new.
    (summary,) = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(
        rf"2 bundles from {re.escape(str(folder))}: 2 patients \(0 new to this node\), "
        r"[1-9]\d* resources, \d+ documents",
        summary,
    ), summary


def test_ingest_names_patients_no_other_facility_can_find(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = node_config(tmp_path)
    bundle = tmp_path / "no-bsn.json"
    bundle.write_text(json.dumps({"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": {"resourceType": "Patient", "id": "p1"}},
    ]}))  # fmt: skip
    assert admin.main(["ingest", "--config", str(config), str(bundle)]) == 0
    summary = capsys.readouterr().out.strip()
    assert summary.endswith("; 1 patient without a national identifier: not indexed, "
                            "no other facility can find them"), summary  # fmt: skip


def test_an_empty_path_is_refused_not_read_as_the_current_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ingest "$DATA"`` with DATA unset must not load whatever *.json is lying here."""
    config = node_config(tmp_path)
    generate(tmp_path / "here", patients=1)
    monkeypatch.chdir(tmp_path / "here")
    with pytest.raises(SystemExit) as exit_:
        admin.main(["ingest", "--config", str(config), ""])
    assert exit_.value.code == 2
    assert "the path is empty" in capsys.readouterr().err
    assert not (tmp_path / "node.db").exists()


def test_a_folder_without_bundles_is_refused_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = node_config(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "inner.json").mkdir()  # a folder, whatever its name
    generate(tmp_path / "bundles", patients=2)
    paths = [str(tmp_path / "empty"), str(tmp_path / "bundles")]

    assert admin.main(["ingest", "--config", str(config), *paths]) == 1
    captured = capsys.readouterr()
    assert f"refused: {tmp_path / 'empty'} holds no *.json bundles" in captured.err
    assert "Is a directory" not in captured.err
    lines = captured.out.strip().splitlines()
    assert lines[0].endswith("; 1 refused; skipped 1 sub-folder"), lines
    assert lines[1].startswith(f"2 bundles from {tmp_path / 'bundles'}: 2 patients, "), lines


def test_a_file_name_cannot_fake_a_line_or_drive_the_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = node_config(tmp_path)
    folder = tmp_path / "weird"
    folder.mkdir()
    (folder / "a\nrefused: nothing, all good\n\x1b[32mOK.json").write_text("not json")

    assert admin.main(["ingest", "--config", str(config), str(folder)]) == 1
    err = capsys.readouterr().err
    assert "a\\nrefused: nothing, all good\\n\\x1b[32mOK.json" in err
    assert "\x1b" not in err and not any(
        line.startswith("refused: nothing") for line in err.splitlines()
    )


def test_a_bundle_refused_when_written_is_named_and_the_rest_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused against what is stored (a BSN another patient has): exit 1, not an abort."""
    config = node_config(tmp_path)
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (first / "a.json").write_text(json.dumps(bundle_of(dutch_patient("p1", "111222333"))))
    (first / "b.json").write_text(json.dumps(bundle_of(dutch_patient("p2", "123456782"))))
    assert admin.main(["ingest", "--config", str(config), str(first)]) == 0
    capsys.readouterr()
    # p2 now claims p1's BSN; d.json is a new patient.
    (second / "c.json").write_text(json.dumps(bundle_of(dutch_patient("p2", "111222333"))))
    (second / "d.json").write_text(json.dumps(bundle_of(dutch_patient("p3", "999990019"))))

    assert admin.main(["ingest", "--config", str(config), str(second)]) == 1
    captured = capsys.readouterr()
    assert f"refused: {second / 'c.json'}: " in captured.err
    assert "belongs to another patient" in captured.err
    assert captured.out.strip().startswith(f"1 bundle from {second}: 1 patient, ")
    assert captured.out.strip().endswith("; 1 refused")


def test_a_config_naming_another_node_changes_nothing_in_its_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """node-2's config pointed at node-1's database: every command refuses, none writes."""
    first = node_config(tmp_path)
    generate(tmp_path / "bundles", patients=1)
    assert admin.main(["ingest", "--config", str(first), str(tmp_path / "bundles")]) == 0
    config = NodeConfig.load(first)
    borrowed = tmp_path / "node-2.toml"
    borrowed.write_text(
        dataclasses.replace(config, node_id="node-2", organisation_id="URA-2").to_toml(tmp_path)
    )
    with sqlite3.connect(config.database) as db:
        (identifier,) = db.execute("SELECT value FROM patient_identifiers LIMIT 1").fetchone()
    counted = (
        "SELECT (SELECT count(*) FROM consents), (SELECT count(*) FROM users),"
        " (SELECT count(*) FROM audit_log)"
    )
    with sqlite3.connect(config.database) as db:
        before = db.execute(counted).fetchone()
    capsys.readouterr()
    for command in (
        ["consent", "add", identifier, "--permit", "--recorded-by", "desk"],
        ["consent", "list", identifier],
        ["user", "add", "--id", "evil", "--name", "Evil", "--role", "nurse"],
        ["user", "list"],
        ["audit", "export", "--patient", identifier],
        ["ingest", str(tmp_path / "bundles")],
    ):
        verb = command[:1] if command[0] == "ingest" else command[:2]
        argv = [*verb, "--config", str(borrowed), *command[len(verb) :]]
        assert admin.main(argv) == 2, command
        assert "belongs to node node-1" in capsys.readouterr().err, command
    with sqlite3.connect(config.database) as db:
        assert db.execute(counted).fetchone() == before


def readme_admin_commands(markdown: Path) -> list[str]:
    """Every ``transmural-admin`` command in the file's sh blocks, continuation lines joined."""
    commands, block, pending = [], False, ""
    for line in markdown.read_text().splitlines():
        if line.startswith("```"):
            block = line.strip() == "```sh"
            continue
        if not block:
            continue
        line = re.sub(r"\s+#\s.*$", "", pending + line.strip())
        pending = line[:-1] + " " if line.endswith("\\") else ""
        if not pending and "transmural-admin " in line:
            commands.append(line[line.index("transmural-admin ") + len("transmural-admin ") :])
    return commands


@pytest.mark.parametrize("markdown", ["README.md", "compose/README.md"])
def test_every_admin_command_in_the_readmes_parses(markdown: str) -> None:
    """A renamed subcommand or flag must not leave the instructions behind."""
    commands = readme_admin_commands(Path(__file__).resolve().parents[1] / markdown)
    assert len(commands) >= 3
    for command in commands:
        command = re.sub(r"\[[^\]]*\]", "", command).replace("<token>", "tmi1.x.y")
        try:
            admin._parser().parse_args(shlex.split(command))
        except SystemExit:
            pytest.fail(f"{markdown}: transmural-admin {command}")


def test_a_joined_nodes_config_with_a_wrong_database_path_makes_no_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """join made the database; a misspelt path must not start an empty one beside it."""
    config = NodeConfig.load(node_config(tmp_path))
    joined = dataclasses.replace(
        config, insecure_dev=False, database=tmp_path / "nodee.db",
        certificate=tmp_path / "node.crt", private_key=tmp_path / "node.key",
        ca_certificate=tmp_path / "ca.crt",
    )  # fmt: skip
    path = tmp_path / "joined.toml"
    path.write_text(joined.to_toml(tmp_path))
    generate(tmp_path / "bundles", patients=1)
    for argv in (
        ["user", "add", "--config", str(path), "--id", "dr.a", "--name", "Dr A", "--role", "nurse"],
        ["ingest", "--config", str(path), str(tmp_path / "bundles")],
    ):
        assert admin.main(argv) == 2, argv
        assert f"no node database at {tmp_path / 'nodee.db'}" in capsys.readouterr().err
    assert not (tmp_path / "nodee.db").exists()


def test_a_reader_that_leaves_early_is_no_error(tmp_path: Path) -> None:
    """`... | head -0`: the reader closed the pipe before anything was written."""
    config = node_config(tmp_path)
    generate(tmp_path / "bundles", patients=1)
    assert admin.main(["ingest", "--config", str(config), str(tmp_path / "bundles")]) == 0
    process = subprocess.Popen(
        [sys.executable, "-m", "tools.admin", "audit", "verify", "--db", str(tmp_path / "node.db")],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    process.stdout.close()  # long before the command has started
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0 and b"BrokenPipeError" not in stderr, stderr
