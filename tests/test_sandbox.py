"""The harness against hostile candidates: each gets the right status, in bounded time, harming nothing; on this
system, and on what macOS and Windows lack, simulated here (no RLIMIT_AS and no /proc; no resource module, no
process groups and no killpg)."""

import os
import time
from pathlib import Path

import pytest

from pipeline import platforms, sandbox

from conftest import demo_problems

# One test process runs every test of this file: a fork bomb here spins its 16 processes for the whole timeout, and a
# battery running beside it in the other test process got too little CPU to reach its memory limit in 2 s (a memory
# bomb judged "timeout", not "error").
pytestmark = pytest.mark.xdist_group("sandbox")

ADD = "def add(a, b):\n    return a + b"
TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]

HOSTILE = {
    "infinite loop": ("while True:\n    pass", {"timeout"}),
    "fork bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", {"timeout",
                                                                                                             "error"}),
    "memory bomb": ("x = bytearray(8 * 2**30)", {"error"}),
    "megabytes of output, then correct": ("import sys\nsys.stdout.write('x' * 20_000_000)\n" + ADD, {"passed"}),
    "exit(0) before the asserts": ("exit(0)\n" + ADD, {"error"}),
    "sys.exit() before the asserts": ("import sys\nsys.exit()\n" + ADD, {"error"}),
    "os._exit(0) before the asserts": ("import os\nos._exit(0)\n" + ADD, {"error"}),
    "raise SystemExit inside the function": (ADD.replace("return a + b", "raise SystemExit(0)"), {"error"}),
    "os._exit(0) inside the function": (ADD.replace("return a + b", "import os; os._exit(0)"), {"error"}),
    "catches SIGTERM and sleeps": ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile "
                                   "True:\n    time.sleep(0.1)", {"timeout"}),
    "deep recursion": ("def f(n):\n    return f(n + 1)\nf(0)", {"error"}),
    "huge file": ("open('big', 'wb').write(b'x' * (64 * 2**20))\n" + ADD, {"error"}),
    "daemon that leaves the process group": ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    "
                                             "time.sleep(60)\n    os._exit(0)\n" + ADD, {"passed"}),
    "process bomb": ("import subprocess, sys\nwhile True:\n    subprocess.Popen([sys.executable, '-c', 'import time; "
                     "time.sleep(30)'])", {"error"}),
    "wrong answer": ("def add(a, b):\n    return a - b", {"failed"}),
    "syntax error": ("def add(a, b) return", {"error"}),
}


# What the harness can use on each system. Windows has no os.fork (nor resource, process groups, killpg, /proc): its
# battery is the one above without the candidates that fork; the process bomb spawns children as it could there.
NATIVE = platforms.sandbox_support()
MACOS = platforms.SandboxSupport("macos", ("CPU", "FSIZE", "NPROC", "CORE"), process_group=True, job_object=False,
                                 separate_user=NATIVE.separate_user)
WINDOWS = platforms.SandboxSupport("windows", (), process_group=False, job_object=False, separate_user=False)
FORKS = {"fork bomb", "daemon that leaves the process group"}
SYSTEMS = {"this system": (NATIVE, set()), "macOS, simulated": (MACOS, set()), "Windows, simulated": (WINDOWS, FORKS)}
LIMITS = sandbox.Limits(timeout=2, memory_mb=512)


@pytest.fixture(scope="module")
def box():
    return sandbox.Sandbox(LIMITS, workers=os.cpu_count())


def test_every_reference_solution_passes_and_a_wrong_one_fails(box):
    problems = demo_problems()
    programs = [sandbox.build_program(p["code"], p["test_list"], p["test_setup_code"]) for p in problems]
    wrong = sandbox.build_program(problems[0]["code"].replace("total += n", "total -= n"), problems[0]["test_list"])
    verdicts = box.run_many(programs + [wrong])
    failed = [v.message for v in verdicts if v.status != "passed"]
    assert [v.status for v in verdicts[:-1]] == ["passed"] * len(problems), failed
    assert verdicts[-1].status == "failed"


@pytest.mark.slow  # 87 candidates twice
@pytest.mark.parametrize("system", ["macOS, simulated", "Windows, simulated"])
def test_every_reference_solution_passes_where_a_system_lacks_limits(system):
    support, _ = SYSTEMS[system]
    problems = demo_problems()
    programs = [sandbox.build_program(p["code"], p["test_list"], p["test_setup_code"]) for p in problems]
    wrong = sandbox.build_program(problems[0]["code"].replace("total += n", "total -= n"), problems[0]["test_list"])
    verdicts = sandbox.Sandbox(LIMITS, workers=os.cpu_count(), support=support).run_many(programs + [wrong])
    assert [v.status for v in verdicts] == ["passed"] * len(problems) + ["failed"], [v.message for v in verdicts]


@pytest.mark.slow
@pytest.mark.parametrize("system", SYSTEMS)
def test_hostile_battery_gets_the_right_status_in_bounded_time(system):
    support, lacks = SYSTEMS[system]
    battery = {name: case for name, case in HOSTILE.items() if name not in lacks}
    box = sandbox.Sandbox(LIMITS, workers=os.cpu_count(), support=support)
    started = time.monotonic()
    verdicts = box.run_many([sandbox.build_program(code, TESTS) for code, _ in battery.values()])
    elapsed = time.monotonic() - started
    for (name, (_, expected)), verdict in zip(battery.items(), verdicts):
        assert verdict.status in expected, f"{name}: {verdict}"
    # 4 candidates wait for their 2 s timeout; the rest end at once: bounded however the workers are scheduled.
    assert elapsed < 4 * 2 + 20
    assert all(verdict.seconds < 2 + 3 for verdict in verdicts)


def test_a_watched_limit_is_named_in_the_verdict():
    """Where no resource limit exists (Windows), the harness's watch ends a candidate over a limit and says which."""
    box = sandbox.Sandbox(LIMITS, workers=2, support=WINDOWS)
    memory, huge_file = (sandbox.build_program(HOSTILE[name][0], TESTS) for name in ("memory bomb", "huge file"))
    verdicts = box.run_many([memory, huge_file])
    assert verdicts[0].message.startswith("memory limit exceeded"), verdicts[0]
    assert verdicts[1].message.startswith("file size limit exceeded"), verdicts[1]
    assert [v.status for v in verdicts] == ["error", "error"]


def test_the_sandbox_reads_no_proc_and_asks_the_platform_module_for_what_differs():
    """/proc exists only on Linux; process groups, signals, user ids and resource limits are asked of platforms.py,
    where mypy checks them per system (tests/test_platforms.py)."""
    for module in ("sandbox.py", "sandbox_runner.py"):
        source = (Path(sandbox.__file__).parent / module).read_text(encoding="utf-8")
        assert "/proc" not in source and "killpg" not in source and "geteuid" not in source, module


def test_secrets_in_the_environment_are_not_inherited(box, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_for_candidates")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "also-secret")
    probe = "import os\nassert 'HF_TOKEN' not in os.environ and 'AWS_SECRET_ACCESS_KEY' not in os.environ\n" + ADD
    assert box.run(sandbox.build_program(probe, TESTS)).status == "passed"


def test_stdin_is_empty(box):
    assert box.run(sandbox.build_program("import sys\nassert sys.stdin.read() == ''\n" + ADD, TESTS)).status == "passed"


@pytest.mark.skipif(not platforms.running_as_root(),
                    reason="files of the user running the harness are protected only when it "
                                              "runs as root")
def test_files_outside_the_sandbox_are_untouched(box, tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep", encoding="utf-8")
    tmp_path.chmod(0o755)
    attacks = [f"import os\nos.remove({str(precious)!r})\n" + ADD,
               f"open({str(precious)!r}, 'w').write('overwritten')\n" + ADD,
               f"open({str(tmp_path / 'new.txt')!r}, 'w').write('x')\n" + ADD]
    verdicts = box.run_many([sandbox.build_program(code, TESTS) for code in attacks])
    assert [v.status for v in verdicts] == ["error"] * 3
    assert precious.read_text(encoding="utf-8") == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]


@pytest.mark.skipif(not platforms.running_as_root(),
                    reason="leftovers are found and killed by their worker uid, which needs root")
def test_nothing_is_left_running(box):
    assert box.drop_privileges
    box.run(sandbox.build_program(HOSTILE["daemon that leaves the process group"][0], TESTS))
    box.run(sandbox.build_program(HOSTILE["fork bomb"][0], TESTS))
    assert [pid for slot in range(box.workers) for pid in platforms.user_processes(box.uid_base + slot)] == []


def test_two_harnesses_at_once_leave_each_other_alone(tmp_path):
    """evaluate.py beside prepare_data.py's test check: as root, each cleans up after its own slot ids only."""
    import subprocess
    import sys

    slow = "import time\ntime.sleep(2)\n" + ADD
    script = ("import sys; sys.path.insert(0, {root!r}); from pipeline import sandbox\n"
              "box = sandbox.Sandbox(workers=1)\n"
              "print([v.status for v in box.run_many([sandbox.build_program(c, {tests!r}) for c in {programs!r}])])")
    root = str(Path(__file__).resolve().parent.parent)
    first = subprocess.Popen([sys.executable, "-c", script.format(root=root, tests=TESTS, programs=[slow])],
                             stdout=subprocess.PIPE, text=True, encoding="utf-8")
    second = subprocess.run([sys.executable, "-c", script.format(root=root, tests=TESTS, programs=[ADD] * 6)],
                            capture_output=True, text=True, encoding="utf-8")
    assert second.stdout.strip() == str(["passed"] * 6)
    assert first.communicate(timeout=30)[0].strip() == "['passed']"
