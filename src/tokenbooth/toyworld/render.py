"""Drawing toy-world scenes with Pillow.

Scenes are drawn on a 128 px canvas and box-filtered down to the requested size (64 px for mini): edges
stay crisp, one blended pixel wide. The world is drawn for a VQGAN with 4x down-sampling: backgrounds are
flat regions and regular textures laid on an 8-canvas-pixel grid (one image token at 64 px), so the codes
go to the subject, where identity lives. Every identity attribute is drawn boldly enough to read at 64 px:
parts are discrete (no antenna / one / two), not small changes of size.
"""

from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw

from .world import COLORS, Instance, Scene

CANVAS = 128
GRID = 8  # canvas pixels per image token at 64 px with 4x down-sampling: background features snap to it
HAT_COLOR = (55, 60, 80)  # not in COLORS, so an accessory never reads as the object's color
SCARF_COLOR = (0, 160, 160)
EYE = (20, 20, 20)

POSITION_X = {"left": 0.3, "center": 0.5, "right": 0.7}
SIZE_H = {"small": 0.42, "large": 0.58}
PROPORTION_W = (0.72, 0.92, 1.15)  # width / height of the object's box


# --- backgrounds --------------------------------------------------------------------------------------

def _snap(v: float) -> int:
    return int(round(v / GRID)) * GRID


def _grid_dots(d, rng, color, n, box, r):
    """n dots of radius r, each centred on its own grid cell inside box: a texture that tokens can hold."""
    x0, y0, x1, y1 = box
    cells = [(x, y) for x in range(x0, x1, GRID) for y in range(y0, y1, GRID)]
    for x, y in rng.sample(cells, min(n, len(cells))):
        cx, cy = x + GRID / 2, y + GRID / 2
        d.rectangle([cx - r, cy - r, cx + r - 1, cy + r - 1], fill=color)


def draw_background(name: str, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (CANVAS, CANVAS))
    d = ImageDraw.Draw(img)
    h = _snap(CANVAS * rng.uniform(0.4, 0.5))  # horizon, on the token grid
    if name == "beach":
        d.rectangle([0, 0, CANVAS, h], fill=(135, 200, 245))
        d.rectangle([0, h - 2 * GRID, CANVAS, h], fill=(30, 110, 200))
        d.rectangle([0, h, CANVAS, CANVAS], fill=(235, 210, 150))
    elif name == "snow":
        d.rectangle([0, 0, CANVAS, h], fill=(190, 205, 225))
        d.rectangle([0, h, CANVAS, CANVAS], fill=(250, 250, 252))
        _grid_dots(d, rng, (255, 255, 255), 10, (0, 0, CANVAS, h - GRID), 2)
    elif name == "grass":
        d.rectangle([0, 0, CANVAS, h], fill=(140, 200, 250))
        d.rectangle([0, h, CANVAS, CANVAS], fill=(70, 160, 60))
        for y in range(h + GRID, CANVAS, 2 * GRID):  # mown stripes
            d.rectangle([0, y, CANVAS, y + GRID - 1], fill=(60, 140, 52))
    elif name == "night":
        d.rectangle([0, 0, CANVAS, CANVAS], fill=(15, 20, 60))
        _grid_dots(d, rng, (250, 250, 210), 12, (0, 0, CANVAS, CANVAS), 1)
        mx = _snap(rng.uniform(GRID, CANVAS - 3 * GRID))
        d.ellipse([mx, GRID, mx + 2 * GRID - 1, 3 * GRID - 1], fill=(245, 240, 200))
    elif name == "wood":
        for x in range(0, CANVAS, 2 * GRID):
            tone = rng.randint(-15, 15)
            d.rectangle([x, 0, x + 2 * GRID - 1, CANVAS], fill=(170 + tone, 115 + tone, 65 + tone // 2))
            d.rectangle([x, 0, x + 1, CANVAS], fill=(110, 70, 35))
    elif name == "brick":
        d.rectangle([0, 0, CANVAS, CANVAS], fill=(225, 215, 200))
        for row, y in enumerate(range(0, CANVAS, 2 * GRID)):
            off = 2 * GRID if row % 2 else 0
            for x in range(-off, CANVAS, 4 * GRID):
                tone = rng.randint(-12, 12)
                d.rectangle([x + 2, y + 2, x + 4 * GRID - 3, y + 2 * GRID - 3], fill=(175 + tone, 60 + tone // 2, 45))
    elif name == "water":
        d.rectangle([0, 0, CANVAS, CANVAS], fill=(40, 120, 200))
        for y in range(_snap(rng.uniform(0, 2 * GRID)), CANVAS, 3 * GRID):  # ripples
            d.rectangle([0, y, CANVAS, y + 2], fill=(150, 200, 240))
    elif name == "forest":
        d.rectangle([0, 0, CANVAS, CANVAS], fill=(30, 80, 40))
        d.rectangle([0, 0, CANVAS, h - 2 * GRID], fill=(55, 120, 50))  # canopy
        for x in rng.sample(range(0, CANVAS, 2 * GRID), 4):
            d.rectangle([x, h - 2 * GRID, x + GRID - 1, CANVAS], fill=(85, 55, 30))
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
            d.rectangle([0, y, CANVAS, y + 4], fill=accent)
    elif inst.pattern == "dotted":
        for y in range(6, CANVAS, 16):
            for x in range(6 + (y // 16 % 2) * 8, CANVAS, 16):
                d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=accent)
    elif inst.pattern == "checkered":
        # staggered squares on a quarter of the surface: the body color stays the one most pixels show
        for y in range(0, CANVAS, 16):
            for x in range((y // 16 % 2) * 8, CANVAS, 16):
                d.rectangle([x, y, x + 7, y + 7], fill=accent)
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

    @property
    def stroke(self) -> int:
        """A line width that stays at least two pixels at 64 px."""
        return max(5, round(self.h * 0.07))


# Each drawer takes variant 0, 1 or 2: three parts that differ in kind, not in degree, so that a picture
# shows which one an instance has. They return the head's box (for a hat or scarf) where there is a head.

def _robot(p: _Painter):  # antennae: none, one, two
    p.body("rectangle", 0.1, 0.42, 0.9, 1.0)
    p.solid("rectangle", p.accent, 0.22, 0.1, 0.78, 0.42)  # head
    p.solid("rectangle", EYE, 0.32, 0.19, 0.46, 0.31)
    p.solid("rectangle", EYE, 0.54, 0.19, 0.68, 0.31)
    for u in ((), (0.5,), (0.3, 0.7))[p.inst.variant]:
        p.solid("line", p.accent, (u, 0.1), (u, -0.06), width=p.stroke)
        p.solid("ellipse", EYE, u - 0.07, -0.12, u + 0.07, -0.02)
    return (0.22, 0.1, 0.78, 0.42)


def _teddy(p: _Painter):  # ears: none, round, tall
    if p.inst.variant == 1:
        for u in (0.24, 0.76):
            p.solid("ellipse", p.accent, u - 0.14, 0.0, u + 0.14, 0.24)
    elif p.inst.variant == 2:
        for u in (0.3, 0.7):
            p.solid("polygon", p.accent, (u - 0.11, 0.2), (u, -0.12), (u + 0.11, 0.2))
    p.body("ellipse", 0.08, 0.42, 0.92, 1.0)
    p.body("ellipse", 0.2, 0.08, 0.8, 0.56)
    p.solid("ellipse", p.accent, 0.38, 0.32, 0.62, 0.5)  # muzzle
    p.solid("ellipse", EYE, 0.32, 0.2, 0.43, 0.31)
    p.solid("ellipse", EYE, 0.57, 0.2, 0.68, 0.31)
    return (0.2, 0.08, 0.8, 0.56)


def _cup(p: _Painter):  # handle: right, left, both
    for s in ((1,), (-1,), (1, -1))[p.inst.variant]:
        u = 0.86 if s > 0 else -0.14
        p.solid("ellipse", None, u, 0.28, u + 0.28, 0.72, outline=p.accent, width=p.stroke)
    p.body("polygon", (0.05, 0.15), (0.95, 0.15), (0.82, 1.0), (0.18, 1.0))
    p.solid("rectangle", p.accent, 0.03, 0.1, 0.97, 0.24)  # rim


def _ball(p: _Painter):  # a spot, a band, a ring (each in the accent color, which a plain ball shows nowhere else)
    p.body("ellipse", 0.0, 0.0, 1.0, 1.0)
    if p.inst.variant == 0:
        p.solid("ellipse", p.accent, 0.18, 0.16, 0.44, 0.42)
    elif p.inst.variant == 1:
        p.solid("rectangle", p.accent, 0.02, 0.4, 0.98, 0.6)
    elif p.inst.variant == 2:
        p.solid("ellipse", None, 0.0, 0.0, 1.0, 1.0, outline=p.accent, width=p.stroke)


def _flower(p: _Painter):  # three, five or eight petals
    p.solid("line", (30, 110, 40), (0.5, 0.45), (0.5, 1.0), width=p.stroke)
    p.solid("ellipse", (30, 110, 40), 0.5, 0.66, 0.82, 0.8)
    n = (3, 5, 8)[p.inst.variant]
    for k in range(n):
        a = 2 * math.pi * k / n - math.pi / 2
        cu, cv = 0.5 + 0.27 * math.cos(a), 0.32 + 0.22 * math.sin(a)
        p.body("ellipse", cu - 0.19, cv - 0.15, cu + 0.19, cv + 0.15)
    p.solid("ellipse", p.accent, 0.37, 0.21, 0.63, 0.43)


def _house(p: _Painter):  # door left, middle or right (window on the other side)
    p.body("rectangle", 0.1, 0.42, 0.9, 1.0)
    p.solid("polygon", p.accent, (0.0, 0.45), (0.5, 0.0), (1.0, 0.45))
    door_u = (0.16, 0.41, 0.66)[p.inst.variant]
    p.solid("rectangle", (70, 45, 25), door_u, 0.62, door_u + 0.18, 1.0)
    win_u = 0.6 if door_u < 0.4 else 0.2
    p.solid("rectangle", (200, 230, 250), win_u, 0.54, win_u + 0.2, 0.74)


def _car(p: _Painter):  # cabin at the back, middle or front
    cab = (0.05, 0.25, 0.45)[p.inst.variant]
    p.body("polygon", (cab, 0.58), (cab + 0.1, 0.18), (cab + 0.4, 0.18), (cab + 0.5, 0.58))
    p.solid("rectangle", (200, 230, 250), cab + 0.14, 0.27, cab + 0.37, 0.52)
    p.body("rectangle", 0.0, 0.55, 1.0, 0.86)
    for u in (0.22, 0.78):
        p.solid("ellipse", EYE, u - 0.14, 0.7, u + 0.14, 1.0)
        p.solid("ellipse", p.accent, u - 0.06, 0.79, u + 0.06, 0.91)


def _duck(p: _Painter):  # short beak, long beak, short beak and a crest
    p.body("ellipse", 0.0, 0.45, 0.88, 1.0)
    p.body("ellipse", 0.42, 0.06, 0.88, 0.52)
    beak = (0.14, 0.34, 0.14)[p.inst.variant]
    p.solid("polygon", p.accent, (0.84, 0.2), (0.84 + beak, 0.3), (0.84, 0.4))
    if p.inst.variant == 2:
        p.solid("polygon", p.accent, (0.52, 0.12), (0.6, -0.1), (0.7, 0.08))
    p.solid("ellipse", EYE, 0.63, 0.18, 0.73, 0.28)
    p.solid("ellipse", p.accent, 0.18, 0.6, 0.56, 0.82)  # wing
    return (0.42, 0.06, 0.88, 0.52)


def _vase(p: _Painter):  # no handles, two handles, a tall thin neck
    neck_w, neck_top = ((0.2, 0.14), (0.2, 0.14), (0.1, -0.05))[p.inst.variant]
    if p.inst.variant == 1:
        for u in (-0.08, 0.78):
            p.solid("ellipse", None, u, 0.3, u + 0.3, 0.62, outline=p.accent, width=p.stroke)
    p.body("rectangle", 0.5 - neck_w, neck_top, 0.5 + neck_w, 0.45)
    p.body("ellipse", 0.02, 0.3, 0.98, 1.0)
    p.solid("rectangle", p.accent, 0.5 - neck_w - 0.07, neck_top - 0.04, 0.5 + neck_w + 0.07, neck_top + 0.08)


def _cat(p: _Painter):  # tail to the right, to the left, none
    for s in ((1,), (-1,), ())[p.inst.variant]:
        base, tip = (0.82, 0.82), (1.04, 0.4)
        if s < 0:
            base, tip = (1 - base[0], base[1]), (1 - tip[0], tip[1])
        p.solid("line", p.accent, base, tip, width=p.stroke)
    p.body("ellipse", 0.1, 0.45, 0.9, 1.0)
    p.body("polygon", (0.2, 0.2), (0.28, -0.06), (0.42, 0.14))
    p.body("polygon", (0.58, 0.14), (0.72, -0.06), (0.8, 0.2))
    p.body("ellipse", 0.18, 0.05, 0.82, 0.55)
    p.solid("ellipse", EYE, 0.31, 0.2, 0.43, 0.33)
    p.solid("ellipse", EYE, 0.57, 0.2, 0.69, 0.33)
    p.solid("polygon", p.accent, (0.43, 0.37), (0.57, 0.37), (0.5, 0.46))
    return (0.18, 0.05, 0.82, 0.55)


def _fish(p: _Painter):  # no fin, a top fin, top and bottom fins
    p.solid("polygon", p.accent, (0.25, 0.55), (0.0, 0.28), (0.0, 0.82))
    if p.inst.variant >= 1:
        p.solid("polygon", p.accent, (0.4, 0.36), (0.55, 0.08), (0.72, 0.36))
    if p.inst.variant == 2:
        p.solid("polygon", p.accent, (0.45, 0.74), (0.58, 0.98), (0.7, 0.74))
    p.body("ellipse", 0.15, 0.3, 1.0, 0.8)
    p.solid("ellipse", EYE, 0.76, 0.44, 0.86, 0.54)


def _backpack(p: _Painter):  # no pocket, one pocket, two pockets
    p.solid("ellipse", None, 0.28, 0.0, 0.72, 0.3, outline=p.accent, width=p.stroke)
    p.body("rectangle", 0.1, 0.12, 0.9, 1.0)
    if p.inst.variant == 1:
        p.solid("rectangle", p.accent, 0.22, 0.52, 0.78, 0.9)
    elif p.inst.variant == 2:
        p.solid("rectangle", p.accent, 0.16, 0.52, 0.46, 0.9)
        p.solid("rectangle", p.accent, 0.54, 0.52, 0.84, 0.9)


DRAWERS = {
    "robot": _robot, "teddy": _teddy, "cup": _cup, "ball": _ball, "flower": _flower, "house": _house,
    "car": _car, "duck": _duck, "vase": _vase, "cat": _cat, "fish": _fish, "backpack": _backpack,
}


def _accessory(p: _Painter, head, kind: str):
    u0, v0, u1, v1 = head
    if kind == "hat":
        p.solid("rectangle", HAT_COLOR, u0 - 0.08, v0 - 0.05, u1 + 0.08, v0 + 0.04)  # brim
        p.solid("rectangle", HAT_COLOR, u0 + 0.1, v0 - 0.3, u1 - 0.1, v0 - 0.02)
    elif kind == "scarf":
        p.solid("rectangle", SCARF_COLOR, u0 - 0.04, v1 - 0.07, u1 + 0.04, v1 + 0.07)
        p.solid("rectangle", SCARF_COLOR, u1 - 0.18, v1, u1 - 0.04, v1 + 0.32)


def object_box(scene: Scene, rng: random.Random):
    """(x0, y0, w, h) of the object on the canvas: position and size words decide it, with a little jitter,
    and the object (parts included) stays on the canvas."""
    h = SIZE_H[scene.size] * CANVAS * rng.uniform(0.94, 1.06)
    w = h * PROPORTION_W[scene.instance.proportion]
    margin = 0.1 * w  # handles, tails and beaks reach past the box
    cx = POSITION_X[scene.position] * CANVAS + rng.uniform(-3, 3)
    cx = min(max(cx, w / 2 + margin), CANVAS - w / 2 - margin)
    bottom = CANVAS * rng.uniform(0.9, 0.95)
    return (cx - w / 2, bottom - h, w, h)


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as an RGB image of size x size pixels."""
    rng = random.Random(scene.seed)
    canvas = draw_background(scene.background, rng)
    painter = _Painter(canvas, object_box(scene, rng), scene.instance)
    head = DRAWERS[scene.instance.cls](painter)
    if scene.accessory and head is not None:
        _accessory(painter, head, scene.accessory)
    return canvas if size == CANVAS else canvas.resize((size, size), Image.BOX)


def render_background(name: str, seed: int, size: int = 64) -> Image.Image:
    img = draw_background(name, random.Random(seed))
    return img if size == CANVAS else img.resize((size, size), Image.BOX)
