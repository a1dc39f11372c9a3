"""The suite leaves the checkout as it found it: conftest.py's session hook fails a run that wrote into it."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO


def test_a_run_that_writes_into_the_checkout_fails_naming_the_file(tmp_path):
    written = REPO / "zz-written-by-a-test.txt"
    inner = tmp_path / "test_writes.py"
    inner.write_text(f"def test_writes():\n    open({str(written)!r}, 'w').write('x')\n", encoding="utf-8")
    try:
        # tests/conftest.py as a plugin: the hook under test, on a test file outside the suite
        result = subprocess.run([sys.executable, "-m", "pytest", str(inner), "-p", "conftest", "-p", "no:xdist",
                                 "-p", "no:cacheprovider", "-o", "addopts=", "-q"], cwd=tmp_path, capture_output=True,
                                text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO / "tests")})
    finally:
        written.unlink(missing_ok=True)
    assert result.returncode == 1, result.stdout[-2000:]
    assert "1 passed" in result.stdout and "the tests changed the checkout" in result.stdout
    assert "zz-written-by-a-test.txt" in result.stdout
