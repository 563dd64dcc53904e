"""``python -m align2.server [flags]`` is ``align2 serve [flags]``."""

import sys

from align2.server.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
