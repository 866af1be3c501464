import sys
from pathlib import Path

# tests/ is on sys.path (tests/conftest.py), so this directory would be imported as a namespace
# package named `export`, shadowing the real package that the editable install only finds later;
# a regular package anywhere on sys.path wins over a namespace one, so put the repo root there.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
