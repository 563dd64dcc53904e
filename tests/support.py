"""Test helpers: test images, and the real-server runners of align2.server.testing."""

from __future__ import annotations

import io

from PIL import Image

from align2.server.testing import ServerProcess, ServerThread

__all__ = ["ServerProcess", "ServerThread", "jpeg", "png"]


def png(width: int = 40, height: int = 30, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(width: int = 40, height: int = 30, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    image = Image.effect_noise((width, height), 40 + seed).convert("RGB")
    image.save(buffer, format="JPEG")
    return buffer.getvalue()
