"""Entry point of an installed Covey: ``/usr/bin/covey``, ``Covey.app``, ``Covey.exe``.

Briefcase's launcher binary runs this module with the command's arguments. That binary is
also ``sys.executable``, and Covey starts its node, engine and RPC worker processes as
``sys.executable -m MODULE ...`` (and Python's own multiprocessing would use ``-c``). So,
like ``python``, this accepts ``-m MODULE [ARG...]`` and ``-c CODE [ARG...]``; anything
else is the ``covey`` command line.
"""

from __future__ import annotations

import runpy
import sys


def run_module(module: str, args: list[str]) -> None:
    """``python -m MODULE ARGS``: run MODULE as ``__main__`` with ``sys.argv`` set."""
    sys.argv = [module, *args]  # runpy replaces argv[0] with the module's file
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def run_code(code: str, args: list[str]) -> None:
    """``python -c CODE ARGS``: run CODE in a fresh ``__main__`` namespace."""
    sys.argv = ["-c", *args]
    exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})


def main(argv: list[str]) -> int:
    """Dispatch ``argv`` (without the program name); returns the exit status."""
    if len(argv) >= 2 and argv[0] == "-m":
        run_module(argv[1], argv[2:])
        return 0
    if len(argv) >= 2 and argv[0] == "-c":
        run_code(argv[1], argv[2:])
        return 0
    # Imported here, not at the top: a child started with -m must not pay for the CLI.
    from app.cli import main as covey_main

    return covey_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
