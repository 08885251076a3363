"""Command-line conventions of every stage: a user's mistake gets one clear line and a non-zero exit, never a
traceback; flags are checked where they are parsed.

Standard library, and pipeline/platforms.py for what differs between systems.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading

from pipeline import platforms

EXIT_FAILED = 1  # the run failed (network, training error)
EXIT_USAGE = 2  # bad flags, missing or wrong input folders


class StageError(Exception):
    """A problem the user can fix; its message is printed as one line."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(KeyboardInterrupt):
    """SIGTERM (a `kill`, a scheduler's time limit) or, on Windows, Ctrl-Break, handled as Ctrl-C is: on the way
    out, what is half-written is removed and a run folder's lock released."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.signum = signum


def raise_terminated(signum, frame):
    raise Terminated(signum)


class Parser(argparse.ArgumentParser):
    """argparse as the stages use it: the script's docstring as its help, kept as written, and a mistake reported
    as one `error:` line that points to --help, with exit code 2, instead of the usage block."""

    def __init__(self, description: str | None = None, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(description=description, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {message}; see {self.prog} --help\n")

    def add_demo_preset(self, preset: dict[str, str], why: str) -> None:
        """--demo: the offline demo's settings for this stage, {flag: value as typed}; a flag the user gives wins.
        The demo's settings live in the stage they are for, so that the stages run one by one reproduce
        run_pipeline.py --demo."""
        destinations = {option: action.dest for action in self._actions for option in action.option_strings}
        self._demo = {destinations[flag]: value for flag, value in preset.items()}  # a KeyError: no such flag
        shown = " ".join(f"{flag} {value}" for flag, value in preset.items())
        self.add_argument("--demo", action="store_true", help=f"the offline demo's settings: {shown} ({why}; a flag "
                                                              f"you give wins)")

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        if getattr(self, "_demo", None) and "--demo" in args:
            self.set_defaults(**self._demo)  # strings, typed by each flag's type= as a typed flag would be
        return super().parse_known_args(args, namespace)


def command(script: str, *flags: tuple[str, object, object]) -> str:
    """`python SCRIPT` and each (flag, value, default) whose value is not the default: a "next:" line that reads
    what this stage wrote, where the user put it."""
    given = [f"{flag} {platforms.shell_quote(str(value))}" for flag, value, default in flags
             if str(value) != str(default)]
    return " ".join([f"python {script}", *given])


def report_errors(stage_main):
    """Decorator for `main`: turns StageError, Ctrl-C and the other stop signals into one line on stderr and an
    exit code; output on a console that cannot show ✓ gets ASCII instead of a UnicodeEncodeError."""

    def wrapper(argv=None) -> int:
        platforms.make_output_safe()
        in_main_thread = threading.current_thread() is threading.main_thread()
        stops = [sig for sig in platforms.stop_signals() if sig != signal.SIGINT] if in_main_thread else []
        previous = {sig: signal.signal(sig, raise_terminated) for sig in stops}
        try:
            return stage_main(argv)
        except StageError as error:
            print(f"error: {error}", file=sys.stderr)
            return error.exit_code
        except KeyboardInterrupt as stop:
            print("interrupted: anything half-written was discarded; earlier complete output is kept", file=sys.stderr)
            return platforms.exit_code_for(stop.signum if isinstance(stop, Terminated) else signal.SIGINT)
        except BrokenPipeError:
            # Output piped into `head` or a closed pager: stop quietly, as command-line tools do.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_FAILED
        except PermissionError as error:
            print(f"error: permission denied: {error.filename}: choose a folder you can write to (--out), or fix "
                  f"its permissions; earlier complete output is kept", file=sys.stderr)
            return EXIT_FAILED
        except OSError as error:  # a full disk, a vanished folder: the system's own words, on one line
            print(f"error: {error.strerror or short_error(error)}: {error.filename or ''}; earlier complete output "
                  f"is kept", file=sys.stderr)
            return EXIT_FAILED
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    wrapper.__name__ = stage_main.__name__
    wrapper.__doc__ = stage_main.__doc__
    return wrapper


def short_error(error: BaseException, limit: int = 200) -> str:
    """First line of an exception's message (or its type name when it has none), for one-line reports."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:limit]


def fail_on_problems(problems: list[str]) -> None:
    """Report every problem at once (one line each) rather than the first only."""
    if problems:
        for problem in problems[:-1]:
            print(f"error: {problem}", file=sys.stderr)
        raise StageError(problems[-1])


def number(kind, low=None, high=None, low_open: bool = False, high_open: bool = False):
    """argparse type: a finite number of `kind` within [low, high] (an open end excludes its bound), checked
    where it is parsed, so that a mistake ends before anything is loaded."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") \
                from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if below or above:
            raise argparse.ArgumentTypeError(f"must be {describe_range(low, high, low_open, high_open)}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def describe_range(low, high, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"greater than {low}" if low_open else f"{low} or more"
    if low is None:
        return f"less than {high}" if high_open else f"{high} or less"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def positive(kind, high=None):
    """argparse type: a finite number > 0 (batch sizes, learning rates, steps), at most `high`."""
    return number(kind, 0, high, low_open=True)


def non_negative(kind, high=None):
    """argparse type: a finite number >= 0 (a temperature, checkpoints to keep)."""
    return number(kind, 0, high)


def fraction(low_open: bool = False):
    """argparse type: a share in [0, 1) (warm-up, dropout), or (0, 1) with low_open (a held-out fraction)."""
    return number(float, 0, 1, low_open=low_open, high_open=True)


SEED = number(int, 0, 2**32 - 1)  # what numpy's and torch's seeding accept


def hub_error_message(error: Exception, what: str) -> str:
    """One line for a failed Hugging Face Hub request: gated, unknown, or unreachable."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(error, GatedRepoError):
        return f"{what} is gated: accept its licence on huggingface.co and run `hf auth login`"
    if isinstance(error, RepositoryNotFoundError):
        return f"{what} was not found on the Hugging Face Hub: check the spelling (for example Qwen/Qwen2.5-Coder-0.5B)"
    if isinstance(error, RevisionNotFoundError):
        return f"{what}: revision not found; check --revision"
    return (
        f"cannot reach the Hugging Face Hub for {what} ({type(error).__name__}): check your internet connection "
        f"or proxy, pass a local folder instead, or use --demo to run offline"
    )
