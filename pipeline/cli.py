"""Command-line conventions of every stage: a user's mistake gets one clear line and a non-zero exit, never a
traceback; flags are checked where they are parsed.

Standard library only.
"""

from __future__ import annotations

import argparse
import os
import sys

EXIT_FAILED = 1  # the run failed (network, training error)
EXIT_USAGE = 2  # bad flags, missing or wrong input folders


class StageError(Exception):
    """A problem the user can fix; its message is printed as one line."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code


def report_errors(stage_main):
    """Decorator for `main`: turns StageError and Ctrl-C into one line on stderr and an exit code."""

    def wrapper(argv=None) -> int:
        try:
            return stage_main(argv)
        except StageError as error:
            print(f"error: {error}", file=sys.stderr)
            return error.exit_code
        except KeyboardInterrupt:
            print("interrupted: anything half-written was discarded; earlier complete output is kept", file=sys.stderr)
            return 130
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


def positive(kind):
    """argparse type: a number > 0 (batch sizes, learning rates, steps)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


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
