"""`pgfeed demo` through the real command: a writer and two reader processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

PGFEED = Path(sys.executable).with_name("pgfeed")


def demo_command(dsn: str, *args: str) -> list[str]:
    assert PGFEED.exists(), f"the pgfeed console script is missing next to {sys.executable}"
    return [str(PGFEED), "--dsn", dsn, "demo", *args]


def read_log(path: Path) -> dict[str, list[dict[str, object]]]:
    by_process: dict[str, list[dict[str, object]]] = {"writer": [], "a": [], "b": []}
    for line in path.read_text().splitlines():
        message = json.loads(line)
        by_process[message["from"]].append(message)
    return by_process


def test_demo_readers_deliver_every_row_in_the_same_order(pgfeed_dsn, tmp_path):
    log = tmp_path / "demo.jsonl"
    done = subprocess.run(
        demo_command(pgfeed_dsn, "--duration", "4", "--log", str(log)), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "order: identical in both readers" in done.stdout

    reports = read_log(log)
    written = [m["seq"] for m in reports["writer"] if m["type"] == "wrote"]
    assert len(written) >= 20, done.stdout  # 4 s at 20 rows/s, allowing for a slow machine
    delivered = {name: [(m["seq"], m["position"]) for m in reports[name] if m["type"] == "row"] for name in "ab"}
    assert delivered["a"], "reader a delivered nothing"
    assert delivered["a"] == delivered["b"]
    # One writer, one row per transaction: commit order is append order, and
    # each reader delivered exactly the committed rows, once each.
    assert [seq for seq, _ in delivered["a"]] == written
    last_token = next(m["token"] for m in reports["writer"] if m["type"] == "done")
    for name in "ab":
        assert any(m["type"] == "caught_up" for m in reports[name]), f"reader {name} did not confirm {last_token}"


def demo_children(proc: subprocess.Popen[str], timeout: float = 60.0) -> list[psutil.Process]:
    """Wait until the demo runs its three children and has printed live lines."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        children = psutil.Process(proc.pid).children(recursive=True)
        if len(children) == 3:
            return children
        time.sleep(0.1)
    raise AssertionError("the demo did not start its three processes")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_demo_stops_cleanly_on_signal(pgfeed_dsn, sig):
    proc = subprocess.Popen(demo_command(pgfeed_dsn), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        children = demo_children(proc)
        time.sleep(2.5)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "summary: the writer committed" in out
    assert "Traceback" not in err
    _, alive = psutil.wait_procs(children, timeout=1)
    assert not alive, f"children left behind: {alive}"


def test_demo_children_stop_when_the_parent_is_killed(pgfeed_dsn):
    proc = subprocess.Popen(demo_command(pgfeed_dsn), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    children = demo_children(proc)
    time.sleep(1.0)
    proc.kill()
    proc.wait()
    _, alive = psutil.wait_procs(children, timeout=10)
    for child in alive:
        child.kill()
    assert not alive, "children outlived a killed parent"


def test_demo_unreachable_server_is_one_line_error(pgfeed_server):
    dsn = pgfeed_server.dsn_for("pgfeed_no_such_database")
    done = subprocess.run(demo_command(dsn, "--duration", "1"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith("pgfeed: error: ")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
