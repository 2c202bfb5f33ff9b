"""Prediction images: each mask alone, and over the photograph with its score and the prompts drawn."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from sam2_layerwise.inputs import Prompts

MASK_RGB = (30, 144, 255)
FG_RGB, BG_RGB, BOX_RGB = (0, 220, 0), (230, 30, 30), (255, 200, 0)


def draw_prompts(img: Image.Image, prompts: Prompts, radius: int | None = None) -> Image.Image:
    """Clicks as filled circles (green foreground, red background, white rim) and the box, in original pixels."""
    draw = ImageDraw.Draw(img)
    r = radius or max(4, round(min(img.size) / 80))
    for p in prompts.points:
        color = FG_RGB if p.label == 1 else BG_RGB
        draw.ellipse([p.x - r, p.y - r, p.x + r, p.y + r], fill=color, outline=(255, 255, 255), width=max(1, r // 3))
    if prompts.box:
        draw.rectangle(list(prompts.box), outline=BOX_RGB, width=max(2, r // 2))
    return img


def mask_overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """HWC uint8 photo + [H, W] bool mask -> RGB image with the mask tinted and outlined."""
    out = image.astype(np.float32).copy()
    tint = np.array(MASK_RGB, dtype=np.float32)
    out[mask] = out[mask] * (1 - alpha) + tint * alpha
    edge = mask ^ np.pad(mask, 1, mode="edge")[1:-1, 2:] | mask ^ np.pad(mask, 1, mode="edge")[2:, 1:-1]
    out[edge] = tint
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def label(img: Image.Image, text: str) -> Image.Image:
    """`text` in white on a black box at the top-left, in a font that grows with the photograph."""
    from sam2_layerwise.render.colors import font

    draw = ImageDraw.Draw(img)
    fnt = font(max(12, min(48, min(img.size) // 28)))
    pad = max(4, fnt.size // 3)
    x0, y0, x1, y1 = draw.textbbox((pad + 2, pad + 2), text, font=fnt)
    draw.rectangle([x0 - pad, y0 - pad, x1 + pad, y1 + pad], fill=(0, 0, 0))
    draw.text((pad + 2, pad + 2), text, fill=(255, 255, 255), font=fnt)
    return img


def prediction_images(image: np.ndarray, masks: np.ndarray, ious: np.ndarray, prompts: Prompts) -> dict[str, Image.Image]:
    """name -> image: `mask_<i>.png` (white on black) and `overlay_<i>.png` for every mask."""
    best = int(np.argmax(ious)) if len(ious) else -1
    out = {}
    for i, m in enumerate(masks):
        out[f"mask_{i}.png"] = Image.fromarray((m.astype(np.uint8) * 255), "L")
        ov = draw_prompts(mask_overlay(image, m), prompts)
        tag = " (best)" if i == best else ""
        out[f"overlay_{i}.png"] = label(ov, f"mask {i}  predicted IoU {ious[i]:.3f}{tag}  area {m.mean() * 100:.1f}%")
    return out
