"""Drawing toy-world scenes with Pillow.

Scenes are drawn on a 128 px canvas and box-filtered down to the requested size: shapes keep smooth edges
at 32 px, which a VQGAN with a small codebook reconstructs far better than aliased pixels.
"""

from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw

from .world import COLORS, Instance, Scene

CANVAS = 128
HAT_COLOR = (55, 60, 80)  # not in COLORS, so an accessory never reads as the object's color
SCARF_COLOR = (0, 160, 160)
EYE = (20, 20, 20)

POSITION_X = {"left": 0.27, "center": 0.5, "right": 0.73}
SIZE_H = {"small": 0.36, "large": 0.56}
PROPORTION_W = (0.75, 0.95, 1.2)  # width / height of the object's box


# --- backgrounds --------------------------------------------------------------------------------------

def _sky_and_ground(d, sky, ground, horizon):
    d.rectangle([0, 0, CANVAS, horizon], fill=sky)
    d.rectangle([0, horizon, CANVAS, CANVAS], fill=ground)


def _speckle(d, rng, color, n, box, r=1):
    x0, y0, x1, y1 = box
    for _ in range(n):
        x, y = rng.uniform(x0, x1), rng.uniform(y0, y1)
        d.ellipse([x - r, y - r, x + r, y + r], fill=color)


def draw_background(name: str, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (CANVAS, CANVAS))
    d = ImageDraw.Draw(img)
    h = int(CANVAS * rng.uniform(0.42, 0.5))  # horizon
    if name == "beach":
        _sky_and_ground(d, (135, 200, 245), (235, 210, 150), h)
        d.rectangle([0, h - 12, CANVAS, h], fill=(30, 110, 200))
        _speckle(d, rng, (205, 180, 120), 25, (0, h + 4, CANVAS, CANVAS))
    elif name == "snow":
        _sky_and_ground(d, (190, 205, 225), (250, 250, 252), h)
        _speckle(d, rng, (255, 255, 255), 30, (0, 0, CANVAS, h), r=2)
        _speckle(d, rng, (215, 225, 240), 15, (0, h + 4, CANVAS, CANVAS), r=3)
    elif name == "grass":
        _sky_and_ground(d, (140, 200, 250), (70, 160, 60), h)
        for _ in range(60):
            x, y = rng.uniform(0, CANVAS), rng.uniform(h, CANVAS)
            d.line([x, y, x + rng.uniform(-2, 2), y - 6], fill=(45, 120, 40), width=2)
    elif name == "night":
        d.rectangle([0, 0, CANVAS, CANVAS], fill=(15, 20, 60))
        _speckle(d, rng, (250, 250, 210), 40, (0, 0, CANVAS, CANVAS), r=1)
        mx = rng.uniform(10, CANVAS - 25)
        d.ellipse([mx, 6, mx + 14, 20], fill=(245, 240, 200))
    elif name == "wood":
        d.rectangle([0, 0, CANVAS, CANVAS], fill=(170, 115, 65))
        for x in range(0, CANVAS, 16):
            tone = rng.randint(-15, 15)
            d.rectangle([x, 0, x + 15, CANVAS], fill=(170 + tone, 115 + tone, 65 + tone // 2))
            d.line([x, 0, x, CANVAS], fill=(110, 70, 35), width=2)
    elif name == "brick":
        d.rectangle([0, 0, CANVAS, CANVAS], fill=(225, 215, 200))
        for row, y in enumerate(range(0, CANVAS, 12)):
            off = 12 if row % 2 else 0
            for x in range(-off, CANVAS, 24):
                tone = rng.randint(-12, 12)
                d.rectangle([x + 1, y + 1, x + 22, y + 10], fill=(175 + tone, 60 + tone // 2, 45))
    elif name == "water":
        d.rectangle([0, 0, CANVAS, CANVAS], fill=(40, 120, 200))
        for _ in range(18):
            x, y = rng.uniform(-10, CANVAS), rng.uniform(0, CANVAS)
            d.arc([x, y, x + 20, y + 8], 200, 340, fill=(150, 200, 240), width=2)
    elif name == "forest":
        d.rectangle([0, 0, CANVAS, CANVAS], fill=(30, 80, 40))
        for _ in range(6):
            x = rng.uniform(0, CANVAS)
            d.rectangle([x, 0, x + 7, CANVAS], fill=(85, 55, 30))
        _speckle(d, rng, (55, 120, 50), 12, (0, 0, CANVAS, h), r=8)
    elif name == "white":
        d.rectangle([0, 0, CANVAS, CANVAS], fill=(250, 250, 250))
    elif name == "pink":
        d.rectangle([0, 0, CANVAS, CANVAS], fill=(250, 200, 222))
    else:
        raise ValueError(f"unknown background {name!r}")
    return img


# --- objects ------------------------------------------------------------------------------------------

def _texture(inst: Instance) -> Image.Image:
    """The instance's body surface: its color with its pattern in the accent color."""
    main, accent = COLORS[inst.color], COLORS[inst.accent]
    tex = Image.new("RGB", (CANVAS, CANVAS), main)
    d = ImageDraw.Draw(tex)
    if inst.pattern == "striped":
        for y in range(0, CANVAS, 16):
            d.rectangle([0, y, CANVAS, y + 3], fill=accent)
    elif inst.pattern == "dotted":
        for y in range(4, CANVAS, 16):
            for x in range(4 + (y // 16 % 2) * 8, CANVAS, 16):
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=accent)
    elif inst.pattern == "checkered":
        # staggered squares on a quarter of the surface: the body color stays the one most pixels show
        for y in range(0, CANVAS, 12):
            for x in range((y // 12 % 2) * 6, CANVAS, 12):
                d.rectangle([x, y, x + 5, y + 5], fill=accent)
    return tex


class _Painter:
    """Draws shapes given in the object's unit box (0..1 on both axes) onto the canvas."""

    def __init__(self, canvas: Image.Image, box, inst: Instance):
        self.canvas, self.inst = canvas, inst
        self.x0, self.y0, self.w, self.h = box
        self.texture = _texture(inst)
        self.draw = ImageDraw.Draw(canvas)

    def pt(self, u, v):
        return (self.x0 + u * self.w, self.y0 + v * self.h)

    def rect(self, u0, v0, u1, v1):
        return [*self.pt(u0, v0), *self.pt(u1, v1)]

    def body(self, kind: str, *coords):
        """A textured part: the surface that carries the instance's color and pattern."""
        mask = Image.new("L", (CANVAS, CANVAS), 0)
        getattr(ImageDraw.Draw(mask), kind)(self._resolve(kind, coords), fill=255)
        self.canvas.paste(self.texture, (0, 0), mask)

    def solid(self, kind: str, color, *coords, **kw):
        getattr(self.draw, kind)(self._resolve(kind, coords), fill=color, **kw)

    def _resolve(self, kind, coords):
        if kind == "polygon" or kind == "line":
            return [self.pt(u, v) for u, v in coords]
        return self.rect(*coords)

    @property
    def accent(self):
        return COLORS[self.inst.accent]


def _robot(p: _Painter):
    p.body("rectangle", 0.12, 0.42, 0.88, 1.0)
    p.solid("rectangle", p.accent, 0.25, 0.08, 0.75, 0.42)  # head
    p.solid("rectangle", EYE, 0.33, 0.18, 0.45, 0.28)
    p.solid("rectangle", EYE, 0.55, 0.18, 0.67, 0.28)
    for u in ((), (0.5,), (0.35, 0.65))[p.inst.variant]:
        p.solid("line", p.accent, (u, 0.08), (u, -0.06), width=3)
        p.solid("ellipse", EYE, u - 0.05, -0.1, u + 0.05, -0.02)
    return (0.25, 0.08, 0.75, 0.42)  # head box, for accessories


def _teddy(p: _Painter):
    ear = (0.09, 0.13, 0.17)[p.inst.variant]
    p.solid("ellipse", p.accent, 0.22 - ear / 2, 0.05, 0.22 + ear * 1.5, 0.05 + ear * 2)
    p.solid("ellipse", p.accent, 0.78 - ear * 1.5, 0.05, 0.78 + ear / 2, 0.05 + ear * 2)
    p.body("ellipse", 0.1, 0.42, 0.9, 1.0)
    p.body("ellipse", 0.22, 0.08, 0.78, 0.55)
    p.solid("ellipse", p.accent, 0.4, 0.32, 0.6, 0.48)  # muzzle
    p.solid("ellipse", EYE, 0.34, 0.22, 0.42, 0.3)
    p.solid("ellipse", EYE, 0.58, 0.22, 0.66, 0.3)
    return (0.22, 0.08, 0.78, 0.55)


def _cup(p: _Painter):
    sides = ((1,), (-1,), (1, -1))[p.inst.variant]
    for s in sides:
        u = 0.92 if s > 0 else -0.12
        p.solid("ellipse", None, u - 0.0, 0.3, u + 0.2, 0.7, outline=p.accent, width=5)
    p.body("polygon", (0.05, 0.15), (0.95, 0.15), (0.82, 1.0), (0.18, 1.0))
    p.solid("rectangle", p.accent, 0.05, 0.12, 0.95, 0.22)  # rim


def _ball(p: _Painter):
    p.body("ellipse", 0.0, 0.0, 1.0, 1.0)
    if p.inst.variant == 1:
        p.solid("rectangle", p.accent, 0.02, 0.42, 0.98, 0.58)
    elif p.inst.variant == 2:
        p.solid("ellipse", None, 0.0, 0.0, 1.0, 1.0, outline=p.accent, width=5)


def _flower(p: _Painter):
    p.solid("line", (30, 110, 40), (0.5, 0.45), (0.5, 1.0), width=5)
    p.solid("ellipse", (30, 110, 40), 0.5, 0.65, 0.8, 0.78)
    n = (4, 5, 6)[p.inst.variant]
    for k in range(n):
        a = 2 * math.pi * k / n
        cu, cv = 0.5 + 0.24 * math.cos(a), 0.3 + 0.2 * math.sin(a)
        p.body("ellipse", cu - 0.2, cv - 0.16, cu + 0.2, cv + 0.16)
    p.solid("ellipse", p.accent, 0.38, 0.2, 0.62, 0.4)


def _house(p: _Painter):
    p.body("rectangle", 0.1, 0.42, 0.9, 1.0)
    p.solid("polygon", p.accent, (0.0, 0.45), (0.5, 0.0), (1.0, 0.45))
    door_u = (0.42, 0.2, 0.62)[p.inst.variant]
    p.solid("rectangle", (70, 45, 25), door_u, 0.68, door_u + 0.18, 1.0)
    win_u = 0.62 if door_u < 0.5 else 0.22
    p.solid("rectangle", (200, 230, 250), win_u, 0.55, win_u + 0.16, 0.7)


def _car(p: _Painter):
    cab = (0.2, 0.3, 0.4)[p.inst.variant]
    p.body("polygon", (cab, 0.6), (cab + 0.1, 0.2), (cab + 0.45, 0.2), (cab + 0.55, 0.6))
    p.solid("rectangle", (200, 230, 250), cab + 0.15, 0.28, cab + 0.42, 0.55)
    p.body("rectangle", 0.0, 0.55, 1.0, 0.88)
    for u in (0.22, 0.78):
        p.solid("ellipse", EYE, u - 0.13, 0.72, u + 0.13, 1.0)
        p.solid("ellipse", p.accent, u - 0.05, 0.81, u + 0.05, 0.91)


def _duck(p: _Painter):
    p.body("ellipse", 0.0, 0.45, 0.9, 1.0)
    p.body("ellipse", 0.45, 0.05, 0.9, 0.5)
    beak = (0.2, 0.28, 0.36)[p.inst.variant]
    p.solid("polygon", p.accent, (0.86, 0.22), (0.86 + beak, 0.3), (0.86, 0.38))
    p.solid("ellipse", EYE, 0.66, 0.17, 0.74, 0.25)
    p.solid("ellipse", p.accent, 0.2, 0.6, 0.55, 0.8)  # wing
    return (0.45, 0.05, 0.9, 0.5)


def _vase(p: _Painter):
    neck = (0.14, 0.2, 0.28)[p.inst.variant]
    p.body("rectangle", 0.5 - neck, 0.02, 0.5 + neck, 0.45)
    p.body("ellipse", 0.02, 0.3, 0.98, 1.0)
    p.solid("rectangle", p.accent, 0.5 - neck - 0.06, 0.0, 0.5 + neck + 0.06, 0.1)


def _cat(p: _Painter):
    p.solid("line", p.accent, (0.85, 0.8), (1.02, 0.45), width=5)  # tail
    p.body("ellipse", 0.1, 0.45, 0.9, 1.0)
    p.body("polygon", (0.2, 0.2), (0.28, -0.05), (0.42, 0.14))
    p.body("polygon", (0.58, 0.14), (0.72, -0.05), (0.8, 0.2))
    p.body("ellipse", 0.18, 0.05, 0.82, 0.55)
    eye = (EYE, (60, 170, 60), (230, 200, 40))[p.inst.variant]
    p.solid("ellipse", eye, 0.32, 0.22, 0.42, 0.32)
    p.solid("ellipse", eye, 0.58, 0.22, 0.68, 0.32)
    p.solid("polygon", p.accent, (0.45, 0.38), (0.55, 0.38), (0.5, 0.45))
    return (0.18, 0.05, 0.82, 0.55)


def _fish(p: _Painter):
    p.solid("polygon", p.accent, (0.25, 0.55), (0.0, 0.3), (0.0, 0.8))
    p.body("ellipse", 0.15, 0.3, 1.0, 0.8)
    fin = (0.15, 0.22, 0.3)[p.inst.variant]
    p.solid("polygon", p.accent, (0.45, 0.33), (0.6, 0.33 - fin), (0.72, 0.35))
    p.solid("ellipse", EYE, 0.78, 0.45, 0.86, 0.53)


def _backpack(p: _Painter):
    p.solid("ellipse", None, 0.3, 0.0, 0.7, 0.3, outline=p.accent, width=5)
    p.body("rectangle", 0.1, 0.12, 0.9, 1.0)
    pocket = (0.55, 0.45, 0.65)[p.inst.variant]
    p.solid("rectangle", p.accent, 0.22, pocket, 0.78, 0.92)


DRAWERS = {
    "robot": _robot, "teddy": _teddy, "cup": _cup, "ball": _ball, "flower": _flower, "house": _house,
    "car": _car, "duck": _duck, "vase": _vase, "cat": _cat, "fish": _fish, "backpack": _backpack,
}


def _accessory(p: _Painter, head, kind: str):
    u0, v0, u1, v1 = head
    if kind == "hat":
        p.solid("rectangle", HAT_COLOR, u0 - 0.08, v0 - 0.04, u1 + 0.08, v0 + 0.03)  # brim
        p.solid("rectangle", HAT_COLOR, u0 + 0.1, v0 - 0.28, u1 - 0.1, v0 - 0.02)
    elif kind == "scarf":
        p.solid("rectangle", SCARF_COLOR, u0 - 0.04, v1 - 0.06, u1 + 0.04, v1 + 0.06)
        p.solid("rectangle", SCARF_COLOR, u1 - 0.16, v1, u1 - 0.04, v1 + 0.3)


def object_box(scene: Scene, rng: random.Random):
    """(x0, y0, w, h) of the object on the canvas: position and size words decide it, with a little jitter."""
    h = SIZE_H[scene.size] * CANVAS * rng.uniform(0.93, 1.07)
    w = h * PROPORTION_W[scene.instance.proportion]
    cx = POSITION_X[scene.position] * CANVAS + rng.uniform(-3, 3)
    bottom = CANVAS * rng.uniform(0.84, 0.9)
    return (cx - w / 2, bottom - h, w, h)


def render(scene: Scene, size: int = 32) -> Image.Image:
    """The scene as an RGB image of size x size pixels."""
    rng = random.Random(scene.seed)
    canvas = draw_background(scene.background, rng)
    painter = _Painter(canvas, object_box(scene, rng), scene.instance)
    head = DRAWERS[scene.instance.cls](painter)
    if scene.accessory and head is not None:
        _accessory(painter, head, scene.accessory)
    return canvas if size == CANVAS else canvas.resize((size, size), Image.BOX)


def render_background(name: str, seed: int, size: int = 32) -> Image.Image:
    img = draw_background(name, random.Random(seed))
    return img if size == CANVAS else img.resize((size, size), Image.BOX)
