"""Runs the moed package's pytest suite for ctest (tests/CMakeLists.txt):
    PYTHON client/python/tests/run.py BUILD_DIR [pytest args]
Exit 0 pass, 1 fail, 77 skip (pytest or numpy missing from this Python)."""
import os
import sys

try:
    import numpy  # noqa: F401
    import pytest
except ImportError as e:
    print(f"SKIP: {sys.executable}: {e} (scripts/deps.sh installs python3-pytest "
          "and python3-numpy)")
    sys.exit(77)

if len(sys.argv) < 2:
    print(__doc__)
    sys.exit(2)
os.environ["MOED_BUILD"] = os.path.abspath(sys.argv[1])
os.environ["MOED_CLIENT_LIB"] = os.path.join(os.environ["MOED_BUILD"], "client",
                                             "libmoe-client.so.1")
sys.dont_write_bytecode = True
here = os.path.dirname(os.path.abspath(__file__))
sys.exit(pytest.main(["-q", "-rs", "-p", "no:cacheprovider", here] + sys.argv[2:]))
