"""Draw docs/images/panel.png: a mock-up of the add-on's sidebar panel during a fit.

The bpy module has no windows and no Blender binary or Xvfb is available here, so the panel is
drawn from its layout (blender_addon/panels.py, the same rows in the same order, Blender's
default dark theme colours) with Pillow; the plot in it is the add-on's own, made by
blender_addon/plot.py from the Progress messages of a real 2-core CPU fit.
Run: python docs/images/panel_mockup.py [progress.json]
"""
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from fit_implicit.blender_addon import plot  # noqa: E402  (numpy only)

W, ROW = 330, 26
BG, PANEL, FIELD, BUTTON, TEXT, DIM = (48, 48, 48), (61, 61, 61), (29, 29, 29), (84, 84, 84), (230, 230, 230), (160, 160, 160)
ACCENT = (71, 114, 179)
FONT = ImageFont.load_default(size=13)


def history(path=None):
    if path:
        pts = json.loads(Path(path).read_text())
        return [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]
    steps = np.arange(1, 241)        # the shape of a draft fit: loss falls, PSNR climbs and levels off
    psnr = 10 + 22 * (1 - np.exp(-steps / 60))
    return steps, 10 ** (-psnr / 10) * 2, psnr


def main(path=None):
    steps, loss, psnr = history(path)
    plot_img = Image.fromarray(plot.draw_plot(steps, loss, psnr), "RGBA").resize((W - 24, 112))
    img = Image.new("RGB", (W, 640), BG)
    d = ImageDraw.Draw(img)
    y = 8
    d.rectangle([4, y, W - 4, y + ROW], fill=PANEL)
    d.text((12, y + 6), "v  Fit Implicit", font=FONT, fill=TEXT)
    y += ROW + 8

    def label(text, x=16, color=TEXT):
        nonlocal y
        d.text((x, y + 5), text, font=FONT, fill=color)
        y += ROW - 4

    # VIEW3D_PT_implicit: the backend's status line, Cancel Fit, the progress box
    label("Backend busy (job 1 of 1) at tcp://127.0.0.1:5599", color=(140, 200, 140))
    y += 4
    d.rounded_rectangle([12, y, W - 12, y + ROW - 4], 4, fill=BUTTON)
    d.text((W // 2 - 40, y + 4), "Cancel Fit", font=FONT, fill=TEXT)
    y += ROW + 4
    top = y
    y += 6
    frac = 0.6
    d.rounded_rectangle([16, y, W - 16, y + ROW - 6], 4, fill=FIELD)
    d.rounded_rectangle([16, y, 16 + int((W - 32) * frac), y + ROW - 6], 4, fill=ACCENT)
    d.text((24, y + 4), f"Training step 240/400: PSNR {psnr[-1]:.2f} dB", font=FONT, fill=TEXT)
    y += ROW
    img.paste(plot_img, (12, y), plot_img)
    y += 118
    label(f"Step 240 / 400            Loss {loss[-1]:.4f}", x=20)
    label("Elapsed 36 s                 PSNR %.2f dB" % psnr[-1], x=20)
    label("About 24 s left", x=20, color=DIM)
    d.rectangle([8, top, W - 8, y + 2], outline=PANEL)
    y += 10
    # the sub-panels (blender_addon/panels.py CLASSES), closed
    for name in ("Capture", "Field", "Mesh & Textures", "Results", "Backend"):
        d.rectangle([4, y, W - 4, y + ROW - 2], fill=PANEL)
        d.text((12, y + 5), f">  {name}", font=FONT, fill=TEXT)
        y += ROW + 2
    img = img.crop((0, 0, W, y + 8))
    out = ROOT / "docs" / "images" / "panel.png"
    img.save(out)
    print(out)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
