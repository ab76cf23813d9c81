"""``python -m server`` is the same as ``llm-server``."""

from server.cli import main

if __name__ == "__main__":
    main()
