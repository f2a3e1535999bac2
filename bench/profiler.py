"""py-spy on the operator, one recording at a time (`make bench BENCH_ARGS=--profile`);
bench/flame.py summarises what it records."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
from pathlib import Path


class Profiler:
    """Records into `folder`, one text file a recording; does nothing when `folder` is None."""

    def __init__(self, folder: Path | None, *, native: bool = False) -> None:
        self.folder = folder
        self.native = native
        self.outputs: dict[str, Path] = {}
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def enabled(self) -> bool:
        return self.folder is not None

    def start(self, name: str, pid: int, *, seconds: float | None = None) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        output = self.folder / f"{name}.txt"
        argv = [
            str(Path(sys.executable).with_name("py-spy")),
            "record",
            "--pid",
            str(pid),
            "--rate",
            "100",
            "--nolineno",
            # By default only the thread holding the GIL: CPU spent in Python. Without it,
            # threads parked in a queue or select() (thread pools, the metrics server) show
            # up as busy on this kernel. Native: every thread, named, with C frames (TLS,
            # the HTTP parser, pydantic_core), which run partly without the GIL; read the
            # main thread's stacks and leave out those ending in select().
            *(["--native", "--threads"] if self.native else ["--gil"]),
            "--format",
            "raw",
            "--output",
            str(output),
        ]
        if seconds is not None:
            argv += ["--duration", str(max(1, math.ceil(seconds)))]
        with (self.folder / f"{name}.py-spy.log").open("wb") as out:
            self._process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        self.outputs[name] = output

    def finish(self) -> None:
        """Stop the recording (SIGINT makes py-spy write its output) and wait for it."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
