//! A tiny RGB rasteriser for the toy world: filled ellipses, rectangles, triangles and thick
//! lines with hard edges (pixel centres are tested), plus a parallel id buffer so every
//! character's visible pixels (after occlusion) are known exactly.

/// An RGB colour.
pub type Rgb = [u8; 3];

/// An RGB image with a per-pixel owner id (0 = background).
#[derive(Debug, Clone)]
pub struct Canvas {
    /// Width in pixels.
    pub w: usize,
    /// Height in pixels.
    pub h: usize,
    /// Row-major RGB bytes.
    pub rgb: Vec<u8>,
    /// Row-major owner ids.
    pub ids: Vec<u8>,
}

impl Canvas {
    /// A canvas filled with one colour, all ids 0.
    pub fn new(w: usize, h: usize, fill: Rgb) -> Canvas {
        let mut rgb = Vec::with_capacity(w * h * 3);
        for _ in 0..w * h {
            rgb.extend_from_slice(&fill);
        }
        Canvas {
            w,
            h,
            rgb,
            ids: vec![0; w * h],
        }
    }

    #[inline]
    fn put(&mut self, x: usize, y: usize, c: Rgb, id: u8) {
        let i = y * self.w + x;
        self.rgb[i * 3..i * 3 + 3].copy_from_slice(&c);
        self.ids[i] = id;
    }

    /// Pixel range whose centres may fall in [lo, hi].
    fn span(lo: f32, hi: f32, n: usize) -> std::ops::Range<usize> {
        let a = (lo - 0.5).ceil().max(0.0) as usize;
        let b = ((hi - 0.5).floor() + 1.0).clamp(0.0, n as f32) as usize;
        a.min(n)..b.max(a.min(n))
    }

    /// Fill pixels whose centre satisfies `inside`, within a bounding box.
    pub fn fill_where(
        &mut self,
        bbox: [f32; 4],
        c: Rgb,
        id: u8,
        inside: impl Fn(f32, f32) -> bool,
    ) {
        for y in Self::span(bbox[1], bbox[3], self.h) {
            for x in Self::span(bbox[0], bbox[2], self.w) {
                if inside(x as f32 + 0.5, y as f32 + 0.5) {
                    self.put(x, y, c, id);
                }
            }
        }
    }

    /// Filled axis-aligned rectangle [x0, x1] x [y0, y1].
    pub fn rect(&mut self, x0: f32, y0: f32, x1: f32, y1: f32, c: Rgb, id: u8) {
        let (x0, x1) = (x0.min(x1), x0.max(x1));
        let (y0, y1) = (y0.min(y1), y0.max(y1));
        self.fill_where([x0, y0, x1, y1], c, id, |_, _| true);
    }

    /// Filled ellipse; at least the centre pixel is drawn, so tiny features never vanish.
    pub fn ellipse(&mut self, cx: f32, cy: f32, rx: f32, ry: f32, c: Rgb, id: u8) {
        let (rx, ry) = (rx.abs().max(0.01), ry.abs().max(0.01));
        self.fill_where([cx - rx, cy - ry, cx + rx, cy + ry], c, id, |x, y| {
            let (dx, dy) = ((x - cx) / rx, (y - cy) / ry);
            dx * dx + dy * dy <= 1.0
        });
        let (px, py) = (cx.floor(), cy.floor());
        if px >= 0.0 && py >= 0.0 && (px as usize) < self.w && (py as usize) < self.h {
            self.put(px as usize, py as usize, c, id);
        }
    }

    /// Filled triangle.
    pub fn triangle(&mut self, a: (f32, f32), b: (f32, f32), c3: (f32, f32), c: Rgb, id: u8) {
        let edge = |p: (f32, f32), q: (f32, f32), x: f32, y: f32| {
            (q.0 - p.0) * (y - p.1) - (q.1 - p.1) * (x - p.0)
        };
        let area = edge(a, b, c3.0, c3.1);
        if area.abs() < 1e-6 {
            return;
        }
        let bbox = [
            a.0.min(b.0).min(c3.0),
            a.1.min(b.1).min(c3.1),
            a.0.max(b.0).max(c3.0),
            a.1.max(b.1).max(c3.1),
        ];
        self.fill_where(bbox, c, id, |x, y| {
            let (e0, e1, e2) = (edge(a, b, x, y), edge(b, c3, x, y), edge(c3, a, x, y));
            if area > 0.0 {
                e0 >= 0.0 && e1 >= 0.0 && e2 >= 0.0
            } else {
                e0 <= 0.0 && e1 <= 0.0 && e2 <= 0.0
            }
        });
    }

    /// A thick line segment (drawn as a quad).
    pub fn line(&mut self, a: (f32, f32), b: (f32, f32), width: f32, c: Rgb, id: u8) {
        let (dx, dy) = (b.0 - a.0, b.1 - a.1);
        let len = (dx * dx + dy * dy).sqrt().max(1e-6);
        let (nx, ny) = (-dy / len * width / 2.0, dx / len * width / 2.0);
        let p = [
            (a.0 + nx, a.1 + ny),
            (b.0 + nx, b.1 + ny),
            (b.0 - nx, b.1 - ny),
            (a.0 - nx, a.1 - ny),
        ];
        self.triangle(p[0], p[1], p[2], c, id);
        self.triangle(p[0], p[2], p[3], c, id);
    }

    /// Vertical gradient fill of rows [y0, y1).
    pub fn gradient(&mut self, y0: usize, y1: usize, top: Rgb, bottom: Rgb) {
        let n = (y1.saturating_sub(y0)).max(1) as f32;
        for y in y0..y1.min(self.h) {
            let t = (y - y0) as f32 / n;
            let c = [0, 1, 2].map(|k| (top[k] as f32 * (1.0 - t) + bottom[k] as f32 * t) as u8);
            for x in 0..self.w {
                self.put(x, y, c, 0);
            }
        }
    }

    /// Copy another canvas' pixels and ids into this one at (ox, oy).
    pub fn blit(&mut self, other: &Canvas, ox: usize, oy: usize) {
        for y in 0..other.h.min(self.h.saturating_sub(oy)) {
            for x in 0..other.w.min(self.w.saturating_sub(ox)) {
                let i = (y * other.w + x) * 3;
                let c = [other.rgb[i], other.rgb[i + 1], other.rgb[i + 2]];
                self.put(ox + x, oy + y, c, other.ids[y * other.w + x]);
            }
        }
    }

    /// Mirror left-right.
    pub fn flip_x(&mut self) {
        for y in 0..self.h {
            for x in 0..self.w / 2 {
                let (a, b) = (y * self.w + x, y * self.w + self.w - 1 - x);
                self.ids.swap(a, b);
                for k in 0..3 {
                    self.rgb.swap(a * 3 + k, b * 3 + k);
                }
            }
        }
    }

    /// Convert to an `image` RGB buffer.
    pub fn to_image(&self) -> image::RgbImage {
        image::RgbImage::from_raw(self.w as u32, self.h as u32, self.rgb.clone())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_cover_expected_pixels() {
        let mut c = Canvas::new(8, 8, [0, 0, 0]);
        c.rect(2.0, 2.0, 4.0, 5.0, [255, 0, 0], 3);
        assert_eq!(c.ids.iter().filter(|&&i| i == 3).count(), 6);
        c.ellipse(6.0, 6.0, 0.1, 0.1, [0, 255, 0], 4);
        assert_eq!(c.ids[6 * 8 + 6], 4);
        c.triangle((0.0, 0.0), (8.0, 0.0), (0.0, 8.0), [0, 0, 255], 5);
        assert_eq!(c.ids[0], 5);
        assert_eq!(c.ids[6 * 8 + 6], 4);
        c.flip_x();
        assert_eq!(c.ids[7], 5);
    }
}
