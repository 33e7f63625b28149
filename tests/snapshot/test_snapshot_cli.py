"""The snapshot verbs through the real `boite` command."""

from __future__ import annotations

import json

from boite.box import Box


def test_snapshot_verbs(tmp_path, boite_cli) -> None:
    box = tmp_path / "vm"
    assert boite_cli("create", box, "--disk", "4M").returncode == 0
    r = boite_cli("snapshot", box, "clean", "--description", "fresh", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"uid": 1, "name": "clean"}
    assert boite_cli("snapshot", box, "second").returncode == 0
    assert boite_cli("revert", box, "clean").returncode == 0
    assert boite_cli("snapshot", box, "branch").returncode == 0
    r = boite_cli("snapshots", box)
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[0] == "vm" and "clean (#1" in lines[1] and "fresh" in lines[1]
    assert "you are here" in lines[-1] and "branch" in lines[-2]
    data = json.loads(boite_cli("snapshots", box, "--json").stdout)
    assert data["current"] == 3
    assert [c["name"] for c in data["snapshots"][0]["children"]] == ["second", "branch"]
    r = boite_cli("delete-snapshot", box, "clean")
    assert r.returncode == 0 and "deleted snapshot 'clean'" in r.stdout
    data = json.loads(boite_cli("snapshots", box, "--json").stdout)
    assert [s["name"] for s in data["snapshots"]] == ["second", "branch"]
    from boite.snapshot import check_snapshot_tree

    assert check_snapshot_tree(Box.open(box)) == []


def test_errors_are_one_line(tmp_path, boite_cli) -> None:
    box = tmp_path / "vm"
    boite_cli("create", box, "--disk", "4M", check=True)
    for args, words in [
        (("revert", box, "nope"), "no snapshot named 'nope'"),
        (("snapshot", box, "x", "--memory"), "--memory needs a running box"),
        (("suspend", box), "not running"),
        (("delete-snapshot", tmp_path / "missing", "x"), "no such box"),
    ]:
        r = boite_cli(*args)
        assert r.returncode == 1 and words in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
    (box / "vm.vmsd").write_text('snapshot.numSnapshots = "1"\nsnapshot0.uid = "one"\n')
    r = boite_cli("snapshots", box)
    assert r.returncode == 1 and "snapshot0.uid = 'one': expected a whole number" in r.stderr


def test_interrupted_operation_is_finished_by_the_next_command(tmp_path, boite_cli) -> None:
    box = tmp_path / "vm"
    boite_cli("create", box, "--disk", "4M", check=True)
    r = boite_cli("snapshot", box, "a")
    assert r.returncode == 0
    # A journal that committed but was not applied (as a SIGKILL at that point leaves it).
    import base64

    from boite.snapshot import journal_path

    b = Box.open(box)
    vmsd = b.vmsd_path.read_bytes().replace(b'displayName = "a"', b'displayName = "renamed"')
    record = {
        "op": "test",
        "phase": "commit",
        "created": [],
        "new": {
            "vmx": base64.b64encode(b.vmx_path.read_bytes()).decode(),
            "vmsd": base64.b64encode(vmsd).decode(),
        },
        "delete": [],
        "consolidate": [],
    }
    journal_path(b).write_text(json.dumps(record))
    r = boite_cli("snapshots", box)
    assert r.returncode == 0 and "finished an interrupted test" in r.stdout
    assert "renamed" in r.stdout and not journal_path(b).exists()


def test_boite_check_verifies_the_snapshot_tree(tmp_path, boite_cli) -> None:
    box = tmp_path / "vm"
    boite_cli("create", box, "--disk", "4M", check=True)
    boite_cli("snapshot", box, "base", check=True)
    r = boite_cli("check", box, "--json")
    # a sound tree; the one problem is that a blank disk and no kernel cannot boot
    assert [p["key"] for p in json.loads(r.stdout)] == ["boite.kernel"], r.stdout + r.stderr
    # A child that no longer chains to its parent's CID: `check` names it.
    from boite.disk import set_cid

    set_cid(box / "vm.vmdk")
    r = boite_cli("check", box, "--json")
    assert r.returncode == 1
    problems = json.loads(r.stdout)
    assert any("CID" in p["message"] or "cid" in p["message"].lower() for p in problems), problems
