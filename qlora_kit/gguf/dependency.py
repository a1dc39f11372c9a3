"""The optional `gguf` package (the `export` extra): one check, with one message naming the install, for both
GGUF writers (export.py, adapter.py)."""

from __future__ import annotations

from qlora_kit.errors import UserError


def require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ModuleNotFoundError:
        raise UserError("GGUF export needs the `gguf` package (llama.cpp's own Python writer)",
                        hint="pip install 'qlora_kit[export]'   (or: pip install gguf)") from None
