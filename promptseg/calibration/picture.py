"""``calibration_sensitivity.png``: the layer ranking of the report as bars (Pillow only, no matplotlib).

Per layer, most sensitive first: the quantisation noise of the float output when only that layer is
INT8 (red: what it breaks alone) and when only it is left float (blue: what remains with every other
layer INT8; short means keeping it float repairs a lot), as ``-SQNR`` in dB on one axis, and the
gate's drops for the short list. Kept-float and equalised layers are marked.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..io import write_bytes_atomic

ROWS = 30  # at most this many layers per panel
ROW_H, BAR_H = 26, 9
LABEL_W, BAR_W, NOTE_W, MARGIN = 260, 420, 300, 12
DB_SPAN = 80.0  # bar from -80 dB (nothing) to 0 dB (noise as large as the signal)
RED, BLUE, GREY, BLACK = (200, 60, 50), (60, 100, 200), (150, 150, 150), (20, 20, 20)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _bar(sqnr_db: float) -> int:
    noise_db = min(max(-sqnr_db, -DB_SPAN), 0.0)
    return int(round(BAR_W * (noise_db + DB_SPAN) / DB_SPAN))


def draw_sensitivity(sections: list[dict], marks: dict[str, str], path: Path, title: str) -> Path:
    """One panel per sensitivity section (``{"of", "all_quantised", "layers"}`` as in the report);
    ``marks``: layer -> short note (``float``, ``equalised``) printed beside it."""
    font, small = _font(13), _font(11)
    heights = [ROW_H * (min(len(s["layers"]), ROWS) + 3) for s in sections]
    width = LABEL_W + BAR_W + NOTE_W + 2 * MARGIN
    image = Image.new("RGB", (width, 40 + sum(heights)), "white")
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, 10), title, fill=BLACK, font=font)
    top = 40
    for section, height in zip(sections, heights, strict=True):
        everything = section["all_quantised"]["sqnr_db"]
        draw.text((MARGIN, top), f"{section['of']}: every layer INT8 -> SQNR {everything:.1f} dB; "
                  "red: only this layer INT8, blue: only this layer float (-SQNR, dB; longer = more noise)",
                  fill=BLACK, font=small)
        x0 = MARGIN + LABEL_W
        for tick in range(0, int(DB_SPAN) + 1, 20):
            x = x0 + int(BAR_W * (DB_SPAN - tick) / DB_SPAN)
            draw.line([(x, top + 18), (x, top + height - ROW_H)], fill=(225, 225, 225))
            draw.text((x - 10, top + height - ROW_H + 2), f"-{tick}", fill=GREY, font=small)
        x_all = x0 + _bar(everything)
        draw.line([(x_all, top + 18), (x_all, top + height - ROW_H)], fill=GREY, width=2)
        for i, row in enumerate(section["layers"][:ROWS]):
            y = top + 22 + i * ROW_H
            draw.text((MARGIN, y + 2), f"{row['rank']:>2} {row['layer'][:34]}", fill=BLACK, font=small)
            proxy = row["proxy"]
            draw.rectangle([x0, y, x0 + _bar(proxy["only_quantised"]["sqnr_db"]), y + BAR_H], fill=RED)
            draw.rectangle([x0, y + BAR_H + 2, x0 + _bar(proxy["only_float"]["sqnr_db"]), y + 2 * BAR_H + 2],
                           fill=BLUE)
            note = []
            if row.get("gate"):
                note.append(f"gate drop: INT8 alone {row['gate']['only_quantised_drop']:.2f}, "
                            f"float alone {row['gate']['only_float_drop']:.2f}")
            if row["layer"] in marks:
                note.append(marks[row["layer"]])
            draw.text((x0 + BAR_W + 8, y + 2), "; ".join(note), fill=BLACK, font=small)
        top += height
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())
    return path
