//! The toy world's ten backgrounds: distinct sky/ground colours and props (house, sea, sun,
//! mountains, moon, trees, cactus, snowman, desk...), drawn at any size.

use super::raster::{Canvas, Rgb};

/// A background: its label, the phrase captions use, and where characters stand.
#[derive(Debug, Clone, Copy)]
pub struct Scene {
    /// Label in `backgrounds.json` / `setting`.
    pub name: &'static str,
    /// Location phrase for captions ("in the kitchen").
    pub phrase: &'static str,
    /// Fraction of the height where the floor/ground starts.
    pub horizon: f32,
}

/// All backgrounds, in label order.
pub const SCENES: [Scene; 10] = [
    Scene {
        name: "stone house",
        phrase: "in front of the stone house",
        horizon: 0.62,
    },
    Scene {
        name: "kitchen",
        phrase: "in the kitchen",
        horizon: 0.6,
    },
    Scene {
        name: "living room",
        phrase: "in the living room",
        horizon: 0.62,
    },
    Scene {
        name: "beach",
        phrase: "at the beach",
        horizon: 0.6,
    },
    Scene {
        name: "mountains",
        phrase: "in the mountains",
        horizon: 0.64,
    },
    Scene {
        name: "night street",
        phrase: "on the street at night",
        horizon: 0.66,
    },
    Scene {
        name: "forest",
        phrase: "in the forest",
        horizon: 0.62,
    },
    Scene {
        name: "desert",
        phrase: "in the desert",
        horizon: 0.6,
    },
    Scene {
        name: "snowy field",
        phrase: "in the snow",
        horizon: 0.6,
    },
    Scene {
        name: "office",
        phrase: "in the office",
        horizon: 0.64,
    },
];

fn tree(c: &mut Canvas, x: f32, base: f32, s: f32, crown: Rgb) {
    c.rect(
        x - 0.025 * s,
        base - 0.2 * s,
        x + 0.025 * s,
        base,
        [110, 70, 35],
        0,
    );
    c.ellipse(x, base - 0.26 * s, 0.1 * s, 0.11 * s, crown, 0);
}

fn pine(c: &mut Canvas, x: f32, base: f32, s: f32, col: Rgb) {
    c.rect(
        x - 0.015 * s,
        base - 0.05 * s,
        x + 0.015 * s,
        base,
        [90, 60, 30],
        0,
    );
    c.triangle(
        (x, base - 0.3 * s),
        (x - 0.08 * s, base - 0.04 * s),
        (x + 0.08 * s, base - 0.04 * s),
        col,
        0,
    );
}

/// Draw background `index` at `size` x `size`.
pub fn draw_scene(index: usize, size: usize) -> Canvas {
    let s = size as f32;
    let sc = SCENES[index];
    let hz = (sc.horizon * s) as usize;
    let mut c = Canvas::new(size, size, [0, 0, 0]);
    let hzf = hz as f32;
    match index {
        0 => {
            c.gradient(0, hz, [110, 180, 240], [180, 220, 250]);
            c.gradient(hz, size, [110, 190, 80], [70, 150, 50]);
            c.rect(
                0.5 * s,
                0.3 * s,
                0.92 * s,
                hzf + 0.02 * s,
                [160, 160, 150],
                0,
            );
            c.triangle(
                (0.46 * s, 0.32 * s),
                (0.96 * s, 0.32 * s),
                (0.71 * s, 0.12 * s),
                [150, 80, 40],
                0,
            );
            c.rect(
                0.66 * s,
                0.44 * s,
                0.76 * s,
                hzf + 0.02 * s,
                [100, 60, 30],
                0,
            );
            c.rect(0.54 * s, 0.38 * s, 0.62 * s, 0.46 * s, [250, 240, 150], 0);
            c.ellipse(0.15 * s, 0.15 * s, 0.06 * s, 0.06 * s, [255, 230, 90], 0);
        }
        1 => {
            c.gradient(0, hz, [250, 235, 150], [245, 225, 140]);
            c.gradient(hz, size, [200, 150, 100], [180, 130, 85]);
            for y in (hz..size).step_by(((s * 0.08) as usize).max(2)) {
                c.rect(0.0, y as f32, s, y as f32 + 1.0, [150, 100, 60], 0);
            }
            c.rect(0.1 * s, 0.12 * s, 0.34 * s, 0.36 * s, [170, 220, 255], 0);
            c.rect(0.21 * s, 0.12 * s, 0.23 * s, 0.36 * s, WHITE, 0);
            c.rect(
                0.62 * s,
                0.3 * s,
                0.98 * s,
                hzf + 0.06 * s,
                [230, 230, 235],
                0,
            );
            c.rect(0.66 * s, 0.34 * s, 0.94 * s, 0.5 * s, [60, 60, 70], 0);
            c.ellipse(0.72 * s, 0.29 * s, 0.04 * s, 0.015 * s, [40, 40, 40], 0);
        }
        2 => {
            c.gradient(0, hz, [235, 220, 190], [225, 205, 175]);
            c.gradient(hz, size, [170, 50, 50], [140, 35, 40]);
            c.rect(
                0.08 * s,
                0.36 * s,
                0.5 * s,
                hzf + 0.04 * s,
                [60, 140, 90],
                0,
            );
            c.rect(0.05 * s, 0.3 * s, 0.53 * s, 0.38 * s, [50, 120, 75], 0);
            c.rect(0.62 * s, 0.12 * s, 0.86 * s, 0.32 * s, [120, 80, 40], 0);
            c.rect(0.64 * s, 0.14 * s, 0.84 * s, 0.3 * s, [150, 200, 230], 0);
            c.ellipse(0.74 * s, 0.24 * s, 0.05 * s, 0.04 * s, [250, 200, 60], 0);
        }
        3 => {
            c.gradient(0, (0.45 * s) as usize, [80, 180, 250], [170, 225, 255]);
            c.gradient((0.45 * s) as usize, hz, [20, 90, 180], [40, 130, 200]);
            c.gradient(hz, size, [240, 220, 150], [225, 200, 120]);
            c.ellipse(0.8 * s, 0.15 * s, 0.08 * s, 0.08 * s, [255, 220, 60], 0);
            c.triangle(
                (0.2 * s, 0.2 * s),
                (0.2 * s, 0.42 * s),
                (0.32 * s, 0.4 * s),
                WHITE,
                0,
            );
            c.rect(0.12 * s, 0.42 * s, 0.3 * s, 0.45 * s, [120, 70, 30], 0);
        }
        4 => {
            c.gradient(0, hz, [150, 200, 245], [210, 235, 250]);
            c.gradient(hz, size, [100, 160, 90], [80, 130, 70]);
            for (x, w, t) in [(0.2, 0.3, 0.18), (0.55, 0.35, 0.1), (0.88, 0.25, 0.25)] {
                let (x, w, t) = (x * s, w * s, t * s);
                c.triangle(
                    (x, t),
                    (x - w, hzf + 1.0),
                    (x + w, hzf + 1.0),
                    [120, 120, 135],
                    0,
                );
                c.triangle(
                    (x, t),
                    (x - w * 0.3, t + (hzf - t) * 0.3),
                    (x + w * 0.3, t + (hzf - t) * 0.3),
                    WHITE,
                    0,
                );
            }
        }
        5 => {
            c.gradient(0, hz, [10, 15, 50], [40, 40, 90]);
            c.gradient(hz, size, [70, 70, 75], [50, 50, 55]);
            c.ellipse(0.8 * s, 0.14 * s, 0.07 * s, 0.07 * s, [250, 245, 200], 0);
            for (x, y) in [
                (0.1, 0.08),
                (0.3, 0.15),
                (0.5, 0.06),
                (0.62, 0.2),
                (0.92, 0.3),
                (0.2, 0.3),
            ] {
                c.ellipse(x * s, y * s, 0.01 * s, 0.01 * s, [255, 255, 220], 0);
            }
            for (x0, x1, top) in [(0.0, 0.28, 0.36), (0.34, 0.6, 0.42), (0.68, 1.0, 0.38)] {
                c.rect(x0 * s, top * s, x1 * s, hzf, [30, 30, 50], 0);
                c.rect(
                    (x0 + 0.06) * s,
                    (top + 0.06) * s,
                    (x0 + 0.13) * s,
                    (top + 0.13) * s,
                    [250, 220, 90],
                    0,
                );
            }
            c.rect(0.0, hzf + 0.12 * s, s, hzf + 0.14 * s, [230, 230, 200], 0);
        }
        6 => {
            c.gradient(0, hz, [170, 215, 235], [200, 230, 240]);
            c.gradient(hz, size, [50, 110, 40], [35, 85, 30]);
            for (i, x) in [0.08f32, 0.3, 0.5, 0.7, 0.92].iter().enumerate() {
                let crown = if i % 2 == 0 {
                    [30, 120, 40]
                } else {
                    [50, 150, 60]
                };
                tree(
                    &mut c,
                    x * s,
                    hzf + 0.02 * s,
                    s * (0.9 + 0.1 * (i % 3) as f32),
                    crown,
                );
            }
        }
        7 => {
            c.gradient(0, hz, [250, 230, 170], [250, 210, 140]);
            c.gradient(hz, size, [230, 160, 70], [210, 130, 50]);
            c.ellipse(0.2 * s, 0.18 * s, 0.09 * s, 0.09 * s, [255, 250, 210], 0);
            let g = [40, 140, 60];
            c.rect(0.76 * s, 0.3 * s, 0.82 * s, hzf + 0.04 * s, g, 0);
            c.rect(0.7 * s, 0.42 * s, 0.76 * s, 0.46 * s, g, 0);
            c.rect(0.7 * s, 0.34 * s, 0.73 * s, 0.46 * s, g, 0);
            c.rect(0.82 * s, 0.38 * s, 0.88 * s, 0.42 * s, g, 0);
            c.rect(0.85 * s, 0.3 * s, 0.88 * s, 0.42 * s, g, 0);
        }
        8 => {
            c.gradient(0, hz, [190, 200, 215], [225, 230, 240]);
            c.gradient(hz, size, [250, 250, 255], [225, 232, 245]);
            for x in [0.1, 0.26] {
                pine(&mut c, x * s, hzf + 0.01 * s, s, [30, 90, 60]);
            }
            c.ellipse(0.78 * s, hzf - 0.02 * s, 0.09 * s, 0.08 * s, WHITE, 0);
            c.ellipse(0.78 * s, hzf - 0.14 * s, 0.06 * s, 0.06 * s, WHITE, 0);
            c.ellipse(
                0.8 * s,
                hzf - 0.15 * s,
                0.01 * s,
                0.01 * s,
                [240, 120, 30],
                0,
            );
            c.rect(
                0.74 * s,
                hzf - 0.24 * s,
                0.82 * s,
                hzf - 0.19 * s,
                [20, 20, 20],
                0,
            );
        }
        _ => {
            c.gradient(0, hz, [200, 205, 210], [185, 190, 200]);
            c.gradient(hz, size, [70, 90, 140], [55, 70, 115]);
            c.rect(0.55 * s, 0.42 * s, 0.98 * s, 0.48 * s, [130, 90, 50], 0);
            c.rect(
                0.58 * s,
                0.48 * s,
                0.62 * s,
                hzf + 0.06 * s,
                [110, 75, 40],
                0,
            );
            c.rect(
                0.91 * s,
                0.48 * s,
                0.95 * s,
                hzf + 0.06 * s,
                [110, 75, 40],
                0,
            );
            c.rect(0.68 * s, 0.26 * s, 0.84 * s, 0.4 * s, [40, 40, 50], 0);
            c.rect(0.7 * s, 0.28 * s, 0.82 * s, 0.38 * s, [90, 200, 230], 0);
            c.rect(0.1 * s, 0.1 * s, 0.3 * s, 0.24 * s, WHITE, 0);
            c.rect(0.12 * s, 0.16 * s, 0.28 * s, 0.18 * s, [220, 60, 60], 0);
        }
    }
    c
}

const WHITE: Rgb = [250, 250, 250];
