//! The toy world's seven characters: names, pronouns, looks, and how to draw each one.
//! Every character has its own body shape, colour and accessory so they stay recognisable
//! at 64x64 (see docs/img/toyworld-portraits.png).

use super::raster::{Canvas, Rgb};
use crate::rules::Pronoun;

/// A toy-world character.
#[derive(Debug, Clone, Copy)]
pub struct ToyCharacter {
    /// Display name.
    pub name: &'static str,
    /// Pronoun family.
    pub pronoun: Pronoun,
    /// What the character looks like.
    pub description: &'static str,
    /// Size relative to an adult.
    pub scale: f32,
    /// Horizontal extent (left, right) in units of the drawn height, facing right.
    pub extent: (f32, f32),
    /// Accessory noun used in captions ("hat", "bow", ...).
    pub accessory: &'static str,
}

/// The cast, in label order.
pub const CAST: [ToyCharacter; 7] = [
    ToyCharacter {
        name: "Tom",
        pronoun: Pronoun::He,
        description: "a broad man in an orange shirt and blue tie with a tall black top hat",
        scale: 1.0,
        extent: (-0.38, 0.38),
        accessory: "top hat",
    },
    ToyCharacter {
        name: "Mia",
        pronoun: Pronoun::She,
        description: "a woman with long yellow hair in a red triangle dress",
        scale: 0.95,
        extent: (-0.3, 0.3),
        accessory: "dress",
    },
    ToyCharacter {
        name: "Bob",
        pronoun: Pronoun::He,
        description: "a round man in blue with brown hair and big black glasses",
        scale: 0.95,
        extent: (-0.36, 0.36),
        accessory: "glasses",
    },
    ToyCharacter {
        name: "Lily",
        pronoun: Pronoun::She,
        description: "a tall slim woman in a purple gown with a black hair bun and a pink bow",
        scale: 1.0,
        extent: (-0.25, 0.25),
        accessory: "pink bow",
    },
    ToyCharacter {
        name: "Kiki",
        pronoun: Pronoun::She,
        description: "a small girl in pink with a big head and a large yellow bow",
        scale: 0.62,
        extent: (-0.3, 0.3),
        accessory: "yellow bow",
    },
    ToyCharacter {
        name: "Rex",
        pronoun: Pronoun::He,
        description: "a green long-necked pet dinosaur with purple spots and a tail",
        scale: 0.75,
        extent: (-0.8, 0.6),
        accessory: "tail",
    },
    ToyCharacter {
        name: "Mr Grey",
        pronoun: Pronoun::He,
        description:
            "a tall old man in a grey suit with a white beard, red bow tie and a walking cane",
        scale: 1.08,
        extent: (-0.26, 0.4),
        accessory: "cane",
    },
];

const SKIN: Rgb = [240, 198, 160];
const BLACK: Rgb = [20, 20, 24];
const WHITE: Rgb = [250, 250, 250];

/// Maps character-local coordinates (units of height, feet at 0, up negative) to pixels.
struct Pose<'a> {
    c: &'a mut Canvas,
    cx: f32,
    fy: f32,
    h: f32,
    flip: bool,
    id: u8,
}

impl Pose<'_> {
    fn x(&self, x: f32) -> f32 {
        self.cx + if self.flip { -x } else { x } * self.h
    }
    fn y(&self, y: f32) -> f32 {
        self.fy + y * self.h
    }
    fn rect(&mut self, x0: f32, y0: f32, x1: f32, y1: f32, col: Rgb) {
        let (a, b, c, d) = (self.x(x0), self.y(y0), self.x(x1), self.y(y1));
        self.c.rect(a, b, c, d, col, self.id);
    }
    fn ell(&mut self, x: f32, y: f32, rx: f32, ry: f32, col: Rgb) {
        let (a, b, h) = (self.x(x), self.y(y), self.h);
        self.c.ellipse(a, b, rx * h, ry * h, col, self.id);
    }
    fn tri(&mut self, p: [(f32, f32); 3], col: Rgb) {
        let q = p.map(|(x, y)| (self.x(x), self.y(y)));
        self.c.triangle(q[0], q[1], q[2], col, self.id);
    }
    fn line(&mut self, a: (f32, f32), b: (f32, f32), w: f32, col: Rgb) {
        let (pa, pb, h) = (
            (self.x(a.0), self.y(a.1)),
            (self.x(b.0), self.y(b.1)),
            self.h,
        );
        self.c.line(pa, pb, (w * h).max(1.0), col, self.id);
    }
    fn eyes(&mut self, y: f32, dx: f32) {
        self.ell(-dx + 0.02, y, 0.022, 0.022, BLACK);
        self.ell(dx + 0.02, y, 0.022, 0.022, BLACK);
    }
    fn legs(&mut self, dx: f32, top: f32, col: Rgb, shoe: Rgb) {
        self.rect(-dx - 0.06, top, -dx + 0.05, 0.0, col);
        self.rect(dx - 0.05, top, dx + 0.06, 0.0, col);
        self.rect(-dx - 0.08, -0.04, -dx + 0.06, 0.0, shoe);
        self.rect(dx - 0.04, -0.04, dx + 0.1, 0.0, shoe);
    }
}

/// Draw character `index` standing with feet centred at (cx, feet_y), `height` pixels tall
/// (before the character's own scale), facing left when `flip`. Pixels get owner `id`.
pub fn draw(c: &mut Canvas, index: usize, cx: f32, feet_y: f32, height: f32, flip: bool, id: u8) {
    let h = height * CAST[index].scale;
    let mut p = Pose {
        c,
        cx,
        fy: feet_y,
        h,
        flip,
        id,
    };
    match index {
        0 => {
            p.legs(0.11, -0.16, [90, 60, 30], BLACK);
            p.ell(-0.31, -0.42, 0.07, 0.15, [240, 140, 30]);
            p.ell(0.31, -0.42, 0.07, 0.15, [240, 140, 30]);
            p.rect(-0.28, -0.6, 0.28, -0.14, [240, 140, 30]);
            p.tri([(-0.06, -0.6), (0.06, -0.6), (0.0, -0.36)], [40, 90, 220]);
            p.ell(0.0, -0.73, 0.14, 0.14, SKIN);
            p.eyes(-0.75, 0.05);
            p.rect(-0.2, -0.88, 0.2, -0.84, BLACK);
            p.rect(-0.12, -1.0, 0.12, -0.86, BLACK);
        }
        1 => {
            p.legs(0.07, -0.16, SKIN, [200, 30, 40]);
            p.ell(0.0, -0.68, 0.19, 0.24, [250, 210, 40]);
            p.tri([(0.0, -0.68), (-0.3, -0.12), (0.3, -0.12)], [220, 40, 50]);
            p.ell(0.0, -0.77, 0.13, 0.13, SKIN);
            p.ell(0.0, -0.88, 0.14, 0.06, [250, 210, 40]);
            p.eyes(-0.78, 0.045);
        }
        2 => {
            p.legs(0.1, -0.16, [30, 30, 90], BLACK);
            p.ell(0.0, -0.38, 0.32, 0.27, [60, 110, 235]);
            p.ell(0.0, -0.75, 0.14, 0.14, SKIN);
            p.ell(0.0, -0.86, 0.14, 0.06, [110, 70, 30]);
            p.ell(-0.04, -0.76, 0.055, 0.05, BLACK);
            p.ell(0.09, -0.76, 0.055, 0.05, BLACK);
            p.ell(-0.04, -0.76, 0.025, 0.022, WHITE);
            p.ell(0.09, -0.76, 0.025, 0.022, WHITE);
        }
        3 => {
            p.tri([(0.0, -0.5), (-0.24, -0.02), (0.24, -0.02)], [140, 60, 200]);
            p.rect(-0.13, -0.64, 0.13, -0.2, [140, 60, 200]);
            p.ell(0.0, -0.77, 0.15, 0.15, [30, 20, 20]);
            p.ell(-0.02, -0.93, 0.08, 0.07, [30, 20, 20]);
            p.ell(0.02, -0.75, 0.12, 0.12, SKIN);
            p.eyes(-0.76, 0.04);
            p.tri(
                [(0.12, -0.92), (0.26, -0.99), (0.26, -0.83)],
                [255, 110, 200],
            );
            p.tri([(0.12, -0.92), (0.0, -1.0), (0.0, -0.84)], [255, 110, 200]);
        }
        4 => {
            p.legs(0.08, -0.12, SKIN, [230, 90, 150]);
            p.ell(0.0, -0.3, 0.26, 0.22, [255, 140, 185]);
            p.ell(0.0, -0.66, 0.2, 0.2, SKIN);
            p.eyes(-0.66, 0.07);
            p.tri([(0.0, -0.87), (-0.26, -1.0), (-0.26, -0.76)], [255, 215, 0]);
            p.tri([(0.0, -0.87), (0.26, -1.0), (0.26, -0.76)], [255, 215, 0]);
            p.ell(0.0, -0.87, 0.06, 0.06, [255, 180, 0]);
        }
        5 => {
            let g = [60, 170, 70];
            p.tri([(-0.3, -0.38), (-0.3, -0.2), (-0.8, -0.16)], g);
            for lx in [-0.28, -0.12, 0.08, 0.22] {
                p.rect(lx - 0.05, -0.22, lx + 0.05, 0.0, [40, 130, 50]);
            }
            p.ell(-0.04, -0.32, 0.38, 0.17, g);
            p.line((0.2, -0.36), (0.38, -0.72), 0.13, g);
            p.ell(0.44, -0.76, 0.16, 0.1, g);
            p.ell(0.48, -0.79, 0.025, 0.025, BLACK);
            for (sx, sy) in [(-0.2, -0.42), (0.0, -0.45), (0.16, -0.4)] {
                p.ell(sx, sy, 0.06, 0.05, [150, 60, 170]);
            }
        }
        _ => {
            p.line((0.34, -0.5), (0.36, 0.0), 0.04, [120, 70, 20]);
            p.legs(0.08, -0.16, [80, 80, 90], BLACK);
            p.rect(-0.2, -0.68, 0.2, -0.14, [130, 130, 145]);
            p.ell(0.3, -0.45, 0.06, 0.06, SKIN);
            p.tri([(-0.07, -0.68), (0.07, -0.68), (0.0, -0.52)], WHITE);
            p.rect(-0.07, -0.66, 0.07, -0.61, [220, 30, 30]);
            p.ell(0.0, -0.8, 0.12, 0.12, SKIN);
            p.ell(0.0, -0.71, 0.11, 0.07, WHITE);
            p.ell(-0.1, -0.84, 0.04, 0.06, WHITE);
            p.ell(0.1, -0.84, 0.04, 0.06, WHITE);
            p.eyes(-0.81, 0.045);
        }
    }
}

/// A canonical portrait: the character centred on a light background.
pub fn portrait(index: usize, size: usize) -> Canvas {
    let mut c = Canvas::new(size, size, [236, 236, 236]);
    let s = size as f32;
    let (l, r) = CAST[index].extent;
    let sc = CAST[index].scale;
    let fit = (0.9 / ((r - l) * sc)).min(0.86 / sc);
    let h = s * fit;
    let cx = s / 2.0 - (l + r) / 2.0 * h * sc;
    draw(&mut c, index, cx, s * 0.94, h, false, index as u8 + 1);
    c
}
