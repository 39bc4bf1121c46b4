"""`python -m latentctl` and the `latentctl` command. The signal handlers come first, before anything heavy is
imported (latentctl/__init__.py imports nothing at import time): a Ctrl-C or SIGTERM at any moment of start-up
ends the process cleanly (exit 130/143, no traceback)."""

from latentctl import interrupts

interrupts.install()


def main() -> None:
    interrupts.install()
    from latentctl.cli.app import main as app_main

    app_main()


if __name__ == "__main__":
    main()
