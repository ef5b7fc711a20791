"""A real ``personatune serve`` process on 127.0.0.1 for tests (port chosen by the OS)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


@contextlib.contextmanager
def serve_process(
    dirs: list[Path], *args: str, env: dict | None = None, timeout: float = 120
) -> Iterator[tuple[subprocess.Popen, str]]:
    """Start ``personatune serve DIRS... ARGS`` and yield ``(process, base URL)`` once
    ``/health`` answers; the process is killed on exit if still running.

    Raises:
        AssertionError: the server exited or did not answer within ``timeout`` seconds.
    """
    cmd = [
        sys.executable,
        "-m",
        "personatune",
        "serve",
        *map(str, dirs),
        "--port",
        "0",
        "--host",
        "127.0.0.1",
        *args,
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    try:
        line = proc.stdout.readline()  # "serving ... on http://127.0.0.1:PORT ..."
        assert " on http" in line, proc.stderr.read() if proc.poll() is not None else line
        url = line.split(" on ")[1].split()[0]
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.1)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
