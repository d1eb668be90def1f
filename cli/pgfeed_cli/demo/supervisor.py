"""The demo's child processes: started in their own session (Ctrl-C reaches
only the parent), read on a thread each into one event queue, and never left
behind (close stdin, then SIGTERM, then SIGKILL)."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

from pgfeed_cli.demo.protocol import CONNINFO_ENV, Message

EXIT_TIMEOUT = 5.0  # seconds for a child to exit once told to, before SIGTERM/SIGKILL


class StopSignals:
    """SIGINT/SIGTERM ask the demo to stop; a second one asks it to hurry."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.hurry = threading.Event()
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested.is_set():
            self.hurry.set()
        self.requested.set()

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class Child:
    """One child process and what it reported."""

    name: str
    proc: subprocess.Popen[str]
    ready: Message | None = None
    exited: bool = False

    def send(self, message: Message | str) -> None:
        """Write one command line to the child's stdin (ignored if it is gone)."""
        assert self.proc.stdin is not None
        text = message if isinstance(message, str) else json.dumps(message)
        with contextlib.suppress(OSError):
            self.proc.stdin.write(text + "\n")
            self.proc.stdin.flush()

    def close_stdin(self) -> None:
        """Tell the child to stop."""
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.close()


class Supervisor:
    """The demo's children, and the messages they sent, as ``(name, message)``
    events (``None``: the child closed its stdout)."""

    def __init__(self, conninfo: str, stop: StopSignals) -> None:
        self.conninfo = conninfo
        self.stop = stop
        self.events: queue.Queue[tuple[str, Message | None]] = queue.Queue()
        self.children: dict[str, Child] = {}

    def spawn(self, name: str, *args: str) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env[CONNINFO_ENV] = self.conninfo
        proc = subprocess.Popen(
            [sys.executable, "-m", "pgfeed_cli.demo", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,  # Ctrl-C reaches only the parent, which stops the children in order
        )
        child = Child(name, proc)
        self.children[name] = child
        threading.Thread(target=self._pump, args=(child,), name=f"demo-{name}", daemon=True).start()

    def _pump(self, child: Child) -> None:
        assert child.proc.stdout is not None
        for line in child.proc.stdout:
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                print(f"pgfeed demo: {child.name}: {line.rstrip()}", file=sys.stderr)
                continue
            if isinstance(message, dict):
                self.events.put((child.name, message))
        self.events.put((child.name, None))

    def kill_all(self) -> None:
        """Make sure no child outlives the demo: close stdin, then SIGTERM, then SIGKILL."""
        for child in self.children.values():
            child.close_stdin()
        deadline = time.monotonic() + (0.5 if self.stop.hurry.is_set() else EXIT_TIMEOUT)
        for child in self.children.values():
            _wait(child.proc, deadline)
        for child in self.children.values():
            if child.proc.poll() is None:
                child.proc.terminate()
        deadline = time.monotonic() + 2.0
        for child in self.children.values():
            _wait(child.proc, deadline)
            if child.proc.poll() is None:
                child.proc.kill()
                child.proc.wait()
            if child.proc.stdout is not None:
                child.proc.stdout.close()

    def next_event(self, timeout: float) -> tuple[str, Message | None] | None:
        try:
            return self.events.get(timeout=max(0.0, min(timeout, 0.1)))
        except queue.Empty:
            return None


def _wait(proc: subprocess.Popen[str], deadline: float) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
