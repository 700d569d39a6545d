"""`python -m qwen_fast [COMMAND ...]`: the `qwen-fast` command line (qwen_fast/cli). With no command: the
environment, and which backends are built and usable for each op."""

import sys

from qwen_fast.cli import main

if __name__ == "__main__":
    sys.exit(main())
