"""Checks in fresh interpreters (8 simulated devices, x64), one per script, started early.

JAX fixes its device count when it starts, and this test process has one CPU device, so
the multi-device checks run in subprocesses: ``python tests/<script> SECTION...``. A
script runs each section it is given (`main`), prints the section's output between
``=== section NAME`` and ``=== ok NAME`` (or ``=== FAILED NAME`` and the traceback), goes
on with the next section, and exits non-zero if any failed.

A test names its script and section with the ``checks`` marker and reads the section's
output from the ``section_output`` fixture (tests/conftest.py):

    @pytest.mark.checks("ring_checks.py", "correctness")
    def test_eight_devices(section_output): ...

Each script runs once per session, with the sections of every selected test that uses
it. The checks are mostly single-threaded, so on CI's 2 cores the session starts the
scripts in the background as soon as collection knows which tests run (one script at a
time, in the order the tests will need them), and the other tests use the second core
meanwhile; a test then waits for its script. Under pytest-xdist (one process per core
already) nothing starts early: the first test that needs a script runs it, so a script's
tests must share a worker: keep them in one file and run with ``--dist loadfile`` (the
README's command). ``xdist_group`` marks would not do: pytest 9.2 ignores the group
suffix that pytest-xdist 3.8 writes into the test ids, and a script ran once per worker.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

TESTS = Path(__file__).resolve().parent
#: Generous: a script runs all its sections, and CI's machine may be shared.
TIMEOUT = 1800


# --- in the subprocess -----------------------------------------------------------------


def main(sections: dict[str, Callable[[], None]], names: list[str]) -> None:
    """Runs the named sections, each once, in the order of `sections`; exits 1 if any failed."""
    if not names or any(n not in sections for n in names):
        sys.exit(f"sections should be some of {list(sections)}, but got {names}")
    failed = []
    for name in (n for n in sections if n in names):
        print(f"=== section {name}", flush=True)
        t = time.perf_counter()
        try:
            sections[name]()
        except BaseException:  # noqa: BLE001 - report it, then run the other sections
            traceback.print_exc(file=sys.stdout)
            print(f"=== FAILED {name}", flush=True)
            failed.append(name)
        else:
            print(f"=== ok {name} ({time.perf_counter() - t:.1f} s)", flush=True)
    sys.exit(1 if failed else 0)


# --- in the test session ---------------------------------------------------------------


def split_sections(stdout: str) -> dict[str, tuple[bool, str]]:
    """{section: (passed, its output)} from a script's stdout."""
    out: dict[str, tuple[bool, str]] = {}
    name, lines = None, []
    for line in stdout.splitlines():
        if line.startswith("=== section "):
            name, lines = line.removeprefix("=== section "), []
        elif name is not None and line.startswith((f"=== ok {name}", f"=== FAILED {name}")):
            out[name] = (line.startswith("=== ok"), "\n".join(lines))
            name = None
        elif name is not None:
            lines.append(line)
    return out


@dataclasses.dataclass
class Job:
    """One script run: the sections it was asked for and, when done, what it printed."""

    script: str
    sections: list[str]
    env: dict[str, str]
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: subprocess.CompletedProcess | None = None
    error: str = ""
    seconds: float = 0.0
    proc: subprocess.Popen | None = None
    started: bool = False
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def claim(self) -> bool:
        """True for the one caller that should run this job."""
        with self._lock:
            first, self.started = not self.started, True
            return first

    def run(self) -> None:
        t = time.perf_counter()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, str(TESTS / self.script), *self.sections],
                env=os.environ | self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, cwd=TESTS.parent,
            )  # fmt: skip
            stdout, stderr = self.proc.communicate(timeout=TIMEOUT)
            self.result = subprocess.CompletedProcess(
                self.proc.args, self.proc.returncode, stdout, stderr
            )
        except subprocess.TimeoutExpired:
            self.proc.kill()
            stdout, stderr = self.proc.communicate()
            self.result = subprocess.CompletedProcess(self.proc.args, -9, stdout, stderr)
            self.error = f"timed out after {TIMEOUT} s"
        except Exception:  # noqa: BLE001 - reported by every test that needs this job
            self.error = traceback.format_exc()
        finally:
            self.seconds = time.perf_counter() - t
            self.done.set()

    def output(self, section: str) -> tuple[bool, str]:
        """(passed, output) of one section; a crash or timeout fails every section."""
        self.done.wait()
        stdout = "" if self.result is None else self.result.stdout
        stderr = "" if self.result is None else self.result.stderr
        parsed = split_sections(stdout).get(section)
        if parsed is None or self.error:
            rc = None if self.result is None else self.result.returncode
            return False, (
                f"{self.script} {' '.join(self.sections)}: section {section!r} did not finish "
                f"(rc {rc}) {self.error}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
            )
        passed, text = parsed
        if not passed:
            text += f"\n--- stderr of {self.script} ---\n{stderr[-5000:]}"
        return passed, text


class Runner:
    """The session's jobs, one per script; runs them one at a time in a background thread."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self._thread: threading.Thread | None = None
        self._closed = False

    def plan(self, wanted: list[tuple[str, str, dict[str, str]]]) -> None:
        """Sections wanted by the selected tests: (script, section, env), in test order."""
        for script, section, env in wanted:
            job = self.jobs.setdefault(script, Job(script, [], dict(env)))
            if job.env != env:
                raise ValueError(f"{script}: every section should run with the same env, "
                                 f"but got {job.env} and {env}")  # fmt: skip
            if section not in job.sections:
                job.sections.append(section)

    def start_in_background(self) -> None:
        def work():
            for job in list(self.jobs.values()):
                if self._closed:
                    return
                if job.claim():
                    job.run()

        self._thread = threading.Thread(target=work, name="multidevice", daemon=True)
        self._thread.start()

    def output(self, script: str, section: str, env: dict[str, str]) -> tuple[bool, str]:
        job = self.jobs.get(script)
        if job is None or section not in job.sections:  # not planned: run it now, alone
            job = Job(script, [section], dict(env))
            self.jobs[f"{script} {section}"] = job
            job.run()
            return job.output(section)
        if job.claim():  # nobody has started it (no background thread, or not yet there)
            job.run()
        return job.output(section)

    def close(self) -> None:
        """Stops what is still running (an interrupted session) and starts nothing more."""
        self._closed = True
        for job in self.jobs.values():
            if job.proc is not None and not job.done.is_set():
                job.proc.kill()

    def report(self) -> list[str]:
        return [f"{job.script} {' '.join(job.sections)}: {job.seconds:.1f} s"
                for job in self.jobs.values() if job.done.is_set()]  # fmt: skip
