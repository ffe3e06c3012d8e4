"""``python -m bench``: conveyor's whole performance picture from one run (see bench.suite)."""

import sys

if __name__ == "__main__":  # not when a spawned child process imports this module
    from bench.suite import main

    sys.exit(main())
