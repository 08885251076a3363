"""The trusted part of a sandboxed run (see sandbox.py). The harness copies this file beside each candidate as
runner.py and runs it on its own: it reads the token from stdin, drops stdin, sets the resource limits the harness
asks for (none on Windows), then runs candidate.py and says how it ended.

Run:   python -I -B runner.py [NAME=VALUE ...]      (NAME one of CPU, AS, FSIZE, NPROC, CORE; the token on stdin)
Needs: only the standard library.

A candidate passes only when every assert ran and held: the runner prints the token, which is never written to
disk, after the last statement. The token lives in main(), not in a module global the candidate could import.
"""

import os
import sys

MARKER = "__SANDBOX_VERDICT__"


def set_limits(limits: list[str]) -> None:
    if not limits:
        return
    if sys.platform == "win32":
        raise SystemExit("resource limits do not exist on Windows")
    import resource

    for limit in limits:
        name, _, text = limit.partition("=")
        which, value = getattr(resource, "RLIMIT_" + name), int(text)
        hard = resource.getrlimit(which)[1]
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)  # a process may lower its hard limit, never raise it (macOS caps processes)
        resource.setrlimit(which, (value, value))


def main() -> None:
    token = sys.stdin.readline().strip()
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    set_limits(sys.argv[1:])
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
    os.write(2, ("\n%s %s\n" % (MARKER, verdict.replace("\n", " ")[:300])).encode())
    os._exit(1)


if __name__ == "__main__":
    main()
