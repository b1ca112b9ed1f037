"""Send a task to the example app and print its result: `scripts/example.sh send` (or `python -m examples.send`).

Reads the project's .env first, as tlrun does, so that it talks to the broker the worker uses.
"""

from __future__ import annotations

import sys

from dotenv import load_dotenv


def main() -> int:
    load_dotenv(".env")  # the environment wins over .env, as in tlrun
    from examples.app import add

    result = add.delay(2, 3)
    try:
        value = result.get(timeout=20)
    except Exception as exc:  # no worker, wrong broker: say it in one line
        print(f"add(2, 3) got no result within 20 s ({type(exc).__name__}): is `scripts/example.sh` running?")
        return 1
    print(f"add(2, 3) = {value} (task {result.id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
