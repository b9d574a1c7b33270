"""The ``kpac`` command (and ``python -m kpac_cli``).

The command line is imported inside :func:`main`: importing it imports torch, which takes
seconds, and a Ctrl-C meanwhile ends the command as a Ctrl-C later does (status 130, no
traceback) rather than with a traceback of whatever was being imported.
"""

import sys

EXIT_INTERRUPTED = 128 + 2  # 128 + SIGINT, as the shell reports a command stopped by Ctrl-C


def main() -> None:
    try:
        from kpac_cli.cli import main as command_line
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    command_line()


if __name__ == "__main__":
    main()
