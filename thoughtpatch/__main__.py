"""``python -m thoughtpatch``: the same as the ``thoughtpatch`` command."""

from .cli import main

if __name__ == "__main__":
    main()
