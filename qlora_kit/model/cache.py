"""Where qlora_kit keeps what it makes once and reuses: 16-bit folders made from GGUF bases, the SmolLM2 GGUF.

`$QLORA_KIT_CACHE`, else ~/.cache/qlora_kit.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "QLORA_KIT_CACHE"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "qlora_kit").expanduser()
