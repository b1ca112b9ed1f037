import os
import sys

# `python -m tlrun` puts the current directory first on sys.path: a project module named like one of tlrun's
# dependencies (a celery.py at the project's top) would be imported instead of it. tlrun adds the project's
# folder itself, after its own imports, where it imports the app.
sys.path[:] = [p for p in sys.path if p not in ("", os.getcwd())]

from tlrun.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
