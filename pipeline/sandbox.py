"""Run untrusted candidate programs against their assert tests, one hardened subprocess each.

Used by evaluate.py (and bench/generation.py). Needs: nothing else from this project; only the standard library.
Each candidate runs:
  * in its own process and session (process group), in a fresh temporary directory (also its HOME and TMPDIR),
    with no stdin and a minimal environment (no inherited tokens, keys or proxies);
  * under limits on CPU time, address space, file size, core dumps and number of processes; the whole process
    group is killed with SIGKILL (which cannot be caught) at the wall-clock timeout; captured output is capped;
  * when this harness runs as root: as an unprivileged user id of its own (one per worker slot), so it cannot
    touch files outside its directory, its process limit is enforced, and anything it leaves running is killed.

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
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

STATUSES = ("passed", "failed", "timeout", "error")
MARKER = "__SANDBOX_VERDICT__"
SLOT_UID_BASE = 0x7F000000  # unprivileged ids far above any real user, one per worker slot (root only)
MAX_SLOTS = 256  # per harness process; each process has its own block of ids (see Sandbox.uid_base)
OUTPUT_CAP = 64 * 1024  # bytes of stdout/stderr kept from the start of each stream
TAIL_CAP = 4 * 1024  # and from the end, where the token and the verdict are

# The trusted part that runs inside the sandbox: reads the token, drops stdin, sets its own limits, then runs the
# candidate. It lives in a function so that the token is not a module global the candidate could import.
RUNNER = r'''
import os, resource, sys

def count_own_processes():
    uid, count = os.getuid(), 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                count += os.stat("/proc/" + name).st_uid == uid
            except OSError:
                pass
    return count

def main():
    cpu, memory, file_size, processes, dedicated_uid = (int(v) for v in sys.argv[1:6])
    token = sys.stdin.readline().strip()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    if not dedicated_uid:  # shared with the user's own processes: allow a few more than exist now
        processes += count_own_processes()
    for limit, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, memory), (resource.RLIMIT_FSIZE, file_size),
                         (resource.RLIMIT_NPROC, processes), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    with open("candidate.py", encoding="utf-8") as f:
        source = f.read()
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(source, "candidate.py", "exec"), namespace)
    except AssertionError as error:
        verdict = "failed AssertionError: " + str(error)
    except SystemExit as error:
        verdict = "error exited before the tests finished (SystemExit %r)" % (error.code,)
    except BaseException as error:
        verdict = "error " + type(error).__name__ + ": " + str(error)
    else:
        try:
            sys.stdout.flush()
        except BaseException:
            pass
        os.write(1, ("\n" + token + "\n").encode())
        os._exit(0)  # skip atexit handlers and finalizers the candidate may have registered
    os.write(2, ("\n%s %s\n" % ("__SANDBOX_VERDICT__", verdict.replace("\n", " ")[:300])).encode())
    os._exit(1)

main()
'''


@dataclass
class Limits:
    timeout: float = 5.0  # wall-clock seconds
    memory_mb: int = 1024  # address space
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


def _minimal_env(workdir: str) -> dict:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}


def processes_of(uid: int) -> list[tuple[int, int, bytes]]:
    """(pid, parent pid, state) of every process of a uid, zombies included: they still count against its
    process limit until someone reaps them."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid != uid:
                    continue
                with open(f"/proc/{name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                found.append((int(name), int(fields[1]), fields[0]))
            except (OSError, IndexError, ValueError):
                continue
    return found


def _become_subreaper() -> None:
    """Orphans of sandboxed programs are re-parented to this process (not to PID 1), so we can reap them."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def _clear_uid(uid: int, patience: float = 5.0) -> None:
    """Kill every process of a sandbox uid, including any that left the process group, and reap them.

    Repeated, because a fork bomb forks while it is being killed (its process limit bounds how often)."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        processes = processes_of(uid)
        if not processes:
            return
        for pid, parent, state in processes:
            try:
                if state != b"Z":
                    os.kill(pid, signal.SIGKILL)
                elif parent == os.getpid():
                    os.waitpid(pid, os.WNOHANG)
            except (OSError, ChildProcessError):
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


class Sandbox:
    """Runs programs in parallel, each in its own hardened subprocess. Create once, then `run_many`."""

    def __init__(self, limits: Limits | None = None, workers: int | None = None):
        self.limits = limits or Limits()
        self.workers = min(MAX_SLOTS, max(1, workers or os.cpu_count() or 1))
        # Two harnesses at once (evaluate.py beside prepare_data.py's check, two evaluations): each kills every
        # process of its slot ids and deletes their files, so each process gets ids of its own.
        self.uid_base = SLOT_UID_BASE + (os.getpid() % 0x10000) * MAX_SLOTS
        self.slots: queue.Queue = queue.Queue()
        for slot in range(self.workers):
            self.slots.put(slot)
        self.python, self.drop_privileges = self._choose_interpreter()
        if self.drop_privileges:
            _become_subreaper()

    def _choose_interpreter(self) -> tuple[str, bool]:
        """As root, run candidates as an unprivileged uid, with an interpreter that uid can execute."""
        if os.name != "posix" or os.geteuid() != 0:
            return sys.executable, False
        for python in (sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")):
            if python and self._probe(python):
                return python, True
        print("warning: no Python interpreter runs as an unprivileged user here; candidates run as root",
              file=sys.stderr)
        return sys.executable, False

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

    def _run_in_slot(self, program: str, slot: int) -> Verdict:
        limits = self.limits
        uid = self.uid_base + slot if self.drop_privileges else None
        workdir = tempfile.mkdtemp(prefix="sandbox-")
        started = time.monotonic()
        try:
            with open(os.path.join(workdir, "runner.py"), "w", encoding="utf-8") as f:
                f.write(RUNNER)
            with open(os.path.join(workdir, "candidate.py"), "w", encoding="utf-8") as f:
                f.write(program)
            ids = {}
            if uid is not None:
                os.chown(workdir, uid, uid)
                ids = {"user": uid, "group": uid, "extra_groups": []}
            argv = [self.python, "-I", "-B", "runner.py", str(int(limits.timeout) + 1), str(limits.memory_mb * 2**20),
                    str(limits.file_size_mb * 2**20), str(limits.processes), "1" if uid is not None else "0"]
            token = secrets.token_hex(16)
            process = subprocess.Popen(argv, cwd=workdir, env=_minimal_env(workdir), stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                       close_fds=True, **ids)
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
            self._kill_group(process.pid, uid)
            process.wait()
            for reader in readers:
                reader.join(timeout=2)
            return self._judge(process.returncode, timed_out, token, readers[0].text(), readers[1].text(),
                               time.monotonic() - started)
        finally:
            if uid is not None:
                _clear_uid(uid)  # before the slot is reused: leftovers would count against its process limit
                _remove_owned(uid)
            shutil.rmtree(workdir, ignore_errors=True)

    @staticmethod
    def _kill_group(pid: int, uid: int | None) -> None:
        try:
            os.killpg(pid, signal.SIGKILL)  # the candidate and every child still in its group
        except (ProcessLookupError, PermissionError):
            pass
        if uid is not None:
            _clear_uid(uid)  # and any that moved to a session of their own

    def _judge(self, returncode: int, timed_out: bool, token: str, stdout: str, stderr: str, seconds: float) -> Verdict:
        if timed_out or returncode == -signal.SIGXCPU:
            return Verdict("timeout", f"no result within {self.limits.timeout:g}s", seconds)
        if returncode == 0 and stdout.rstrip().endswith(token):
            return Verdict("passed", "", seconds)
        for line in reversed(stderr.splitlines()):
            if line.startswith(MARKER + " "):
                status, _, message = line[len(MARKER) + 1:].partition(" ")
                return Verdict(status if status in ("failed", "error") else "error", message.strip(), seconds)
        if returncode < 0:
            known = -returncode in signal.Signals._value2member_map_
            name = signal.Signals(-returncode).name if known else str(-returncode)
            reason = {"SIGXFSZ": "file size limit exceeded", "SIGSEGV": "crashed (stack overflow?)"}.get(name, "killed")
            return Verdict("error", f"{reason} ({name})", seconds)
        return Verdict("error", f"exited with code {returncode} before the tests finished", seconds)


