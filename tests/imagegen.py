"""Synthetic portraits and broken files for the tests (no binary fixtures needed)."""

from __future__ import annotations

import io
import random
from pathlib import Path

from PIL import Image, ImageDraw

SKIN = [(224, 172, 140), (198, 134, 96), (141, 85, 54), (241, 194, 160)]


def portrait(width: int = 160, height: int = 200, seed: int = 0, grain: int = 0) -> Image.Image:
    """A face-like picture: background, a skin-toned oval with blemishes, eyes and a mouth.
    ``grain`` adds sensor-like noise (which makes files realistically incompressible)."""
    rng = random.Random(seed)
    background = (rng.randrange(40, 90), rng.randrange(60, 120), rng.randrange(90, 160))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    skin = SKIN[seed % len(SKIN)]
    w, h = width, height
    draw.ellipse((w * 0.2, h * 0.15, w * 0.8, h * 0.9), fill=skin)
    for _ in range(12):
        x, y = rng.uniform(w * 0.3, w * 0.7), rng.uniform(h * 0.3, h * 0.8)
        r = max(1.0, w / 80)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(skin[0] - 40, skin[1] - 50, skin[2] - 40))
    for ex in (0.38, 0.62):
        draw.ellipse((w * ex - w * 0.05, h * 0.42, w * ex + w * 0.05, h * 0.48), fill=(30, 30, 30))
    draw.line((w * 0.4, h * 0.7, w * 0.6, h * 0.7), fill=(150, 60, 60), width=max(1, w // 50))
    if grain:
        noise = Image.frombytes("RGB", image.size, rng.randbytes(width * height * 3))
        image = Image.blend(image, noise, grain / 100)
    return image


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def write_portrait(path: Path, fmt: str = "JPEG", seed: int = 0,
                   size: tuple[int, int] = (160, 200), grain: int = 0, **kwargs: object) -> bytes:
    data = encode(portrait(*size, seed=seed, grain=grain), fmt, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def mixed_tree(root: Path, count: int = 32) -> dict[str, bytes]:
    """``count`` distinct portraits in nested folders with spaces and non-ASCII names."""
    folders = ["", "Session A", "Session A/Ünïcödé — близко", "2024/12/ブライド", "deep/er/still"]
    formats = [("JPEG", ".jpg"), ("PNG", ".png"), ("WEBP", ".webp"), ("JPEG", ".JPEG"),
               ("JPEG", ".jfif")]  # as browsers on Windows save a JPEG
    written: dict[str, bytes] = {}
    for i in range(count):
        fmt, ext = formats[i % len(formats)]
        folder = folders[i % len(folders)]
        rel = f"{folder}/portrait {i:02d} é{ext}" if folder else f"portrait {i:02d}{ext}"
        written[rel] = write_portrait(root / rel, fmt, seed=i)
    return written
