"""``python -m kvbench ARGS`` is ``kvbench ARGS``."""
from harness.cli import main

if __name__ == "__main__":
    main()
