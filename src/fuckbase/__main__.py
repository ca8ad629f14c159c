"""`fuckbase` and `python -m fuckbase`: the server and its commands, which need the server extra."""

import sys


def main() -> None:
    try:
        from fuckbase.cli import main as cli
    except ModuleNotFoundError as exc:
        sys.exit(f"fuckbase: the server and its commands need the server extra (missing: {exc.name}); "
                 "install it with: pip install 'fuckbase[server]'")
    cli()


if __name__ == "__main__":
    main()
