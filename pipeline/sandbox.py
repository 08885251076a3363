"""Run untrusted candidate programs against their assert tests, one hardened subprocess each, on Linux, macOS and
Windows.

Used by evaluate.py, prepare_data.py's test check and train.py --score-checkpoints (and bench/generation.py).
Needs: pipeline/platforms.py (what each system can enforce) and pipeline/sandbox_runner.py (the trusted part,
copied beside each candidate).

Every candidate runs in its own process, in a fresh temporary directory (also its HOME and TMPDIR), with no stdin
and a minimal environment (no inherited tokens, keys or proxies); its captured output is capped, and at the
wall-clock timeout it is killed with everything it started. The rest depends on what the system offers:

    limit                        Linux                  macOS                  Windows
    CPU time                     RLIMIT_CPU             RLIMIT_CPU             the wall clock only
    memory                       RLIMIT_AS              watched (resident)     Job Object, and watched
    size of a file it writes     RLIMIT_FSIZE           RLIMIT_FSIZE           watched (in its directory)
    number of processes          RLIMIT_NPROC           RLIMIT_NPROC           Job Object, and watched
    what it started, killed      its process group      its process group      its Job Object, else its tree
    core dumps                   none (RLIMIT_CORE)     none (RLIMIT_CORE)     none (no error dialogs either)
    another user id              as root                as root                no

"Watched": the harness looks at the candidate's processes every 50 ms and kills them all when one is over the
limit (a verdict of error naming the limit), so a limit can be overshot for that long. As root on Linux or macOS
each worker slot runs candidates as an unprivileged user id of its own, so a candidate cannot touch files outside
its directory and anything it leaves running is found and killed by that id.

A candidate passes only when every assert ran and held: the runner prints a random token, which it received on
stdin and which is never written to disk, after the last assert. A program that exits early (exit(0),
sys.exit(), os._exit(0), SystemExit) never prints it. Limits of this design: code that searches the
interpreter's memory for the token, or returns objects whose __eq__ is always true, can still fake a pass; model
output does not do that, and this is not a security boundary against a determined attacker.
"""

from __future__ import annotations

import os
import queue
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import platforms
from pipeline.sandbox_runner import MARKER  # the runner's line that says how a candidate ended

STATUSES = ("passed", "failed", "timeout", "error")
RUNNER = Path(__file__).with_name("sandbox_runner.py")
SLOT_UID_BASE = 0x7F000000  # unprivileged ids far above any real user, one per worker slot (root only)
MAX_SLOTS = 256  # per harness process; each process has its own block of ids (see Sandbox.uid_base)
OUTPUT_CAP = 64 * 1024  # bytes of stdout/stderr kept from the start of each stream
TAIL_CAP = 4 * 1024  # and from the end, where the token and the verdict are
WATCH_INTERVAL = 0.05  # seconds between two looks at a watched candidate


@dataclass
class Limits:
    timeout: float = 5.0  # wall-clock seconds
    memory_mb: int = 1024  # address space (Linux), resident memory where watched, committed memory (Windows job)
    file_size_mb: int = 16  # largest file it may write
    processes: int = 16  # processes of its own


@dataclass
class Verdict:
    status: str  # passed, failed, timeout or error
    message: str
    seconds: float


def build_program(code: str, tests: list[str], setup: str = "") -> str:
    """The candidate's source file: setup, solution, then every assert."""
    return "\n".join(part for part in (setup, code, "\n".join(tests)) if part) + "\n"


class Sandbox:
    """Runs programs in parallel, each in its own hardened subprocess. Create once, then `run_many`.

    `support` says what the system can enforce (platforms.sandbox_support() by default); the tests pass a
    narrower one to check the verdicts of a system that lacks resource limits or process groups."""

    def __init__(self, limits: Limits | None = None, workers: int | None = None,
                 support: platforms.SandboxSupport | None = None):
        self.limits = limits or Limits()
        self.support = support or platforms.sandbox_support()
        self.workers = min(MAX_SLOTS, max(1, workers or os.cpu_count() or 1))
        self.runner = RUNNER.read_text(encoding="utf-8")
        # Two harnesses at once (evaluate.py beside prepare_data.py's check, two evaluations): each kills every
        # process of its slot ids and deletes their files, so each process gets ids of its own.
        self.uid_base = SLOT_UID_BASE + (os.getpid() % 0x10000) * MAX_SLOTS
        self.slots: queue.Queue = queue.Queue()
        for slot in range(self.workers):
            self.slots.put(slot)
        self.python, self.drop_privileges = self._choose_interpreter()
        self.workdir_root = self._reachable_root() if self.drop_privileges else tempfile.gettempdir()
        if self.drop_privileges:
            platforms.become_subreaper()

    def _choose_interpreter(self) -> tuple[str, bool]:
        """As root, run candidates as an unprivileged uid, with an interpreter that uid can execute."""
        if not self.support.separate_user:
            return sys.executable, False
        for python in (sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")):
            if python and self._probe(python):
                return python, True
        print("warning: no Python interpreter runs as an unprivileged user here; candidates run as root",
              file=sys.stderr)
        return sys.executable, False

    def _reachable_root(self) -> str | None:
        """Where candidates' folders go when they run as other users: the temporary folder, unless those users
        cannot reach it (TMPDIR under a private home, say), then a shared one. None of them: candidates run as
        this user, said once."""
        for root in dict.fromkeys([tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm"]):
            if os.path.isdir(root) and platforms.others_can_enter(root):
                return root
        print(f"warning: no temporary folder here can be entered by other users ({tempfile.gettempdir()} is private):"
              f" candidates run as this user", file=sys.stderr)
        self.drop_privileges = False
        return tempfile.gettempdir()

    def self_test(self) -> str | None:
        """Why this sandbox cannot run even a one-line program that passes, or None. Without this check a broken
        sandbox (limits too tight for Python itself, a folder its users cannot enter, no interpreter) would score
        every answer, right or wrong, as an error: 0 % that says nothing of the model."""
        verdict = self.run(build_program("x = 1", ["assert x == 1"]))
        if verdict.status == "passed":
            return None
        who = "unprivileged user ids" if self.drop_privileges else "this user"
        return (f"the sandbox cannot run a one-line program ({verdict.status}: {verdict.message[:160]}; candidates "
                f"run as {who} with {self.python} in {self.workdir_root}, under --timeout {self.limits.timeout:g} "
                f"and --memory-mb {self.limits.memory_mb})")

    def _probe(self, python: str) -> bool:
        uid = self.uid_base
        try:
            result = subprocess.run([python, "-I", "-c", "import resource"], user=uid, group=uid, extra_groups=[],
                                    capture_output=True, timeout=20, cwd="/", env={"PATH": "/usr/bin:/bin"})
        except (OSError, subprocess.SubprocessError):
            return False
        return result.returncode == 0

    def run(self, program: str) -> Verdict:
        slot = self.slots.get()
        try:
            return self._run_in_slot(program, slot)
        finally:
            self.slots.put(slot)

    def run_many(self, programs: list[str], progress=None) -> list[Verdict]:
        """Run every program, `workers` at a time; the verdicts come back in order."""
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            futures = [pool.submit(self.run, program) for program in programs]
            verdicts = []
            for future in futures:
                verdicts.append(future.result())
                if progress is not None:
                    progress(1)
        return verdicts

    def _rlimits(self, dedicated_uid: bool) -> list[str]:
        """The runner's NAME=VALUE arguments: the resource limits this system lets it set on itself."""
        limits = self.limits
        processes = limits.processes
        if not dedicated_uid and "NPROC" in self.support.rlimits:
            processes += platforms.own_process_count()  # shared with the user's own processes: a few more than now
        values = {"CPU": int(limits.timeout) + 1, "AS": limits.memory_mb * 2**20,
                  "FSIZE": limits.file_size_mb * 2**20, "NPROC": processes, "CORE": 0}
        return [f"{name}={values[name]}" for name in self.support.rlimits]

    def _run_in_slot(self, program: str, slot: int) -> Verdict:
        limits = self.limits
        uid = self.uid_base + slot if self.drop_privileges else None
        workdir = tempfile.mkdtemp(prefix="sandbox-", dir=self.workdir_root)
        started = time.monotonic()
        job = watch = None
        try:
            with open(os.path.join(workdir, "runner.py"), "w", encoding="utf-8") as f:
                f.write(self.runner)
            with open(os.path.join(workdir, "candidate.py"), "w", encoding="utf-8") as f:
                f.write(program)
            ids: dict[str, Any] = {}
            if uid is not None:
                platforms.give_to_user(workdir, uid)
                ids = {"user": uid, "group": uid, "extra_groups": []}
            argv = [self.python, "-I", "-B", "runner.py", *self._rlimits(uid is not None)]
            token = secrets.token_hex(16)
            try:
                process = subprocess.Popen(argv, cwd=workdir, env=platforms.sandbox_env(workdir),
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           close_fds=True, **platforms.isolated_start(self.support), **ids)
            except OSError as error:  # no interpreter there, a folder it may not enter
                return Verdict("error", f"could not start {self.python}: {error.strerror or error}",
                               time.monotonic() - started)
            # The runner waits for its token before running anything of the candidate's: the job and the watch
            # hold it from its first statement.
            if self.support.job_object:
                job = platforms.JobObject(limits.memory_mb * 2**20, limits.processes)
                job.add(process)
            if self.support.watched():
                watch = _Watch(process.pid, limits, self.support.watched(), workdir)
                watch.start()
            readers = [_CappedReader(process.stdout), _CappedReader(process.stderr)]
            for reader in readers:
                reader.start()
            try:
                process.stdin.write((token + "\n").encode())
                process.stdin.close()
            except OSError:
                pass  # it exited before reading: judged below
            timed_out = False
            try:
                process.wait(timeout=limits.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            over = watch.stop() if watch is not None else None
            self._kill_all(process.pid, uid, job, watch)
            process.wait()
            for reader in readers:
                reader.join(timeout=2)
            return self._judge(process.returncode, timed_out, over, token, readers[0].text(), readers[1].text(),
                               time.monotonic() - started)
        finally:
            if job is not None:
                job.close()
            if uid is not None:
                _clear_uid(uid)  # before the slot is reused: leftovers would count against its process limit
                _remove_owned(uid)
            shutil.rmtree(workdir, ignore_errors=True)

    def _kill_all(self, pid: int, uid: int | None, job, watch) -> None:
        """The candidate and everything it started: its process group, its tree (and any descendant seen earlier),
        its job, and as root every process of its uid (any that moved to a session of their own)."""
        if self.support.process_group:
            platforms.kill_group(pid)
        platforms.kill_tree(pid, watch.seen if watch is not None else None)
        if job is not None:
            job.close()
        if uid is not None:
            _clear_uid(uid)

    def _judge(self, returncode: int, timed_out: bool, over: str | None, token: str, stdout: str, stderr: str,
               seconds: float) -> Verdict:
        killed_by = platforms.signal_name(returncode)
        if timed_out or killed_by == "SIGXCPU":
            return Verdict("timeout", f"no result within {self.limits.timeout:g}s", seconds)
        if over is not None:
            return Verdict("error", over, seconds)
        if returncode == 0 and stdout.rstrip().endswith(token):
            return Verdict("passed", "", seconds)
        for line in reversed(stderr.splitlines()):
            if line.startswith(MARKER + " "):
                status, _, message = line[len(MARKER) + 1:].partition(" ")
                return Verdict(status if status in ("failed", "error") else "error", message.strip(), seconds)
        if killed_by is not None:
            reason = {"SIGXFSZ": "file size limit exceeded", "SIGSEGV": "crashed (stack overflow?)"}.get(killed_by,
                                                                                                         "killed")
            return Verdict("error", f"{reason} ({killed_by})", seconds)
        said = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")
        return Verdict("error", f"exited with code {returncode} before the tests finished"
                                + (f": {said[:200]}" if said else ""), seconds)


class _CappedReader(threading.Thread):
    """Drains a pipe so the candidate never blocks on it, keeping its head and tail only."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream, self.head, self.tail = stream, bytearray(), bytearray()

    def run(self):
        try:
            while chunk := self.stream.read1(65536) if hasattr(self.stream, "read1") else self.stream.read(65536):
                if len(self.head) < OUTPUT_CAP:
                    self.head += chunk[: OUTPUT_CAP - len(self.head)]
                self.tail = (self.tail + chunk)[-TAIL_CAP:]
        except (OSError, ValueError):
            pass

    def text(self) -> str:
        return self.tail.decode("utf-8", "replace")


class _Watch(threading.Thread):
    """Enforces the limits this system sets no resource limit for: every WATCH_INTERVAL it looks at the candidate's
    processes (memory, their number) and at the files in its directory, and kills them all at the first one over.
    Every descendant it sees is remembered, to be killed at the end even if it left the tree."""

    def __init__(self, pid: int, limits: Limits, watched: list[str], workdir: str):
        super().__init__(daemon=True)
        self.pid, self.limits, self.watched, self.workdir = pid, limits, watched, workdir
        self.seen: list = []
        self.over: str | None = None
        self.done = threading.Event()

    def run(self):
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.done.is_set() and self.over is None:
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            self.seen.extend(p for p in tree[1:] if p not in self.seen)
            self.over = self.check(tree)
            if self.over is not None:
                platforms.kill_tree(self.pid, self.seen)
                return
            self.done.wait(WATCH_INTERVAL)

    def check(self, tree: list) -> str | None:
        import psutil

        limits = self.limits
        if "NPROC" in self.watched and len(tree) > limits.processes:
            return f"process limit exceeded (more than {limits.processes} processes)"
        if "AS" in self.watched:
            resident = 0
            for process in tree:
                try:
                    memory = process.memory_info()
                except psutil.Error:
                    continue
                resident += getattr(memory, "peak_wset", memory.rss)  # Windows keeps the peak: nothing slips by
            if resident > limits.memory_mb * 2**20:
                return f"memory limit exceeded ({resident / 2**20:.0f} MB > {limits.memory_mb} MB)"
        return self.file_size_problem()

    def file_size_problem(self) -> str | None:
        if "FSIZE" not in self.watched:
            return None
        largest = max((size for size in _file_sizes(self.workdir)), default=0)
        if largest > self.limits.file_size_mb * 2**20:
            return f"file size limit exceeded ({largest / 2**20:.0f} MB > {self.limits.file_size_mb} MB)"
        return None

    def stop(self) -> str | None:
        """Stop watching; the limit that was exceeded, if one was (files are looked at once more: a candidate
        that wrote a large file and ended between two looks is caught here)."""
        self.done.set()
        self.join(timeout=5)
        return self.over or self.file_size_problem()


def _file_sizes(folder: str):
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                yield from _file_sizes(entry.path)
            elif entry.is_file(follow_symlinks=False):
                yield entry.stat(follow_symlinks=False).st_size
        except OSError:
            continue


def _clear_uid(uid: int, patience: float = 5.0) -> None:
    """Kill every process of a sandbox uid, including any that left the process group, and reap them.

    Repeated, because a fork bomb forks while it is being killed (its process limit bounds how often)."""
    import psutil

    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        processes = platforms.user_processes(uid)
        if not processes:
            return
        for process in processes:
            try:
                if process.status() != psutil.STATUS_ZOMBIE:
                    process.kill()
                elif process.ppid() == os.getpid():
                    platforms.reap(process.pid)
            except psutil.Error:
                pass
        time.sleep(0.005)


def _remove_owned(uid: int) -> None:
    """Remove what a sandbox uid created in the world-writable temporary folders."""
    for folder in {tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm"}:
        try:
            entries = os.scandir(folder)
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid == uid:
                    shutil.rmtree(entry.path) if entry.is_dir(follow_symlinks=False) else os.unlink(entry.path)
            except OSError:
                pass
