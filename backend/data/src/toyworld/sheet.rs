//! Contact sheets for docs: story rows (frames with their captions and referential
//! captions), the cast's portraits and the backgrounds. Text uses a built-in 5x7 font
//! (upper case, digits and common punctuation).

use image::{Rgb as Px, RgbImage};

use super::cast::{portrait, CAST};
use super::scenes::{draw_scene, SCENES};

const GLYPHS: &[(char, &str)] = &[
    ('A', ".###.#...##...#######...##...##...#"),
    ('B', "####.#...##...#####.#...##...#####."),
    ('C', ".###.#...##....#....#....#...#.###."),
    ('D', "####.#...##...##...##...##...#####."),
    ('E', "######....#....####.#....#....#####"),
    ('F', "######....#....####.#....#....#...."),
    ('G', ".###.#...##....#.####...##...#.####"),
    ('H', "#...##...##...#######...##...##...#"),
    ('I', ".###...#....#....#....#....#...###."),
    ('J', "..###...#....#....#....#.#..#..##.."),
    ('K', "#...##..#.#.#..##...#.#..#..#.#...#"),
    ('L', "#....#....#....#....#....#....#####"),
    ('M', "#...###.###.#.##.#.##...##...##...#"),
    ('N', "#...##...###..##.#.##..###...##...#"),
    ('O', ".###.#...##...##...##...##...#.###."),
    ('P', "####.#...##...#####.#....#....#...."),
    ('Q', ".###.#...##...##...##.#.##..#..##.#"),
    ('R', "####.#...##...#####.#.#..#..#.#...#"),
    ('S', ".#####....#.....###.....#....#####."),
    ('T', "#####..#....#....#....#....#....#.."),
    ('U', "#...##...##...##...##...##...#.###."),
    ('V', "#...##...##...##...##...#.#.#...#.."),
    ('W', "#...##...##...##.#.##.#.##.#.#.#.#."),
    ('X', "#...##...#.#.#...#...#.#.#...##...#"),
    ('Y', "#...##...#.#.#...#....#....#....#.."),
    ('Z', "#####....#...#...#...#...#....#####"),
    ('0', ".###.#...##..###.#.###..##...#.###."),
    ('1', "..#...##....#....#....#....#...###."),
    ('2', ".###.#...#....#...#...#...#...#####"),
    ('3', "####.....#....#.###.....#....#####."),
    ('4', "...#...##..#.#.#..#.#####...#....#."),
    ('5', "######....####.....#....##...#.###."),
    ('6', ".###.#....#....####.#...##...#.###."),
    ('7', "#####....#...#...#...#....#....#..."),
    ('8', ".###.#...##...#.###.#...##...#.###."),
    ('9', ".###.#...##...#.####....#....#.###."),
    ('.', "..........................##...##.."),
    (',', ".....................##....#...#..."),
    ('\'', "..#....#...#......................."),
    ('!', "..#....#....#....#....#.........#.."),
    ('?', ".###.#...#....#...#...#.........#.."),
    ('-', "...............###................."),
    (':', "......##...##........##...##......."),
    (';', "......##...##........##....#...#..."),
];

/// Width of one character cell in pixels (5 + 1 spacing).
pub const CHAR_W: u32 = 6;
/// Height of one text line in pixels (7 + 2 spacing).
pub const LINE_H: u32 = 9;

/// Draw upper-cased text at (x, y); unknown characters become blanks.
pub fn draw_text(img: &mut RgbImage, x: u32, y: u32, text: &str, colour: [u8; 3]) {
    for (i, ch) in text.chars().enumerate() {
        let up = ch.to_ascii_uppercase();
        let Some((_, bits)) = GLYPHS.iter().find(|(c, _)| *c == up) else {
            continue;
        };
        for (k, b) in bits.bytes().take(35).enumerate() {
            let (gx, gy) = (x + i as u32 * CHAR_W + k as u32 % 5, y + k as u32 / 5);
            if b == b'#' && gx < img.width() && gy < img.height() {
                img.put_pixel(gx, gy, Px(colour));
            }
        }
    }
}

/// Greedy word wrap to `width` characters.
pub fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split_whitespace() {
        let last = lines.last_mut().map(|l| l.len()).unwrap_or(0);
        if last > 0 && last + 1 + word.len() > width {
            lines.push(String::new());
        }
        let l = lines.last_mut().expect("non-empty");
        if !l.is_empty() {
            l.push(' ');
        }
        l.push_str(word);
    }
    lines
}

fn upscale(img: &RgbImage, k: u32) -> RgbImage {
    RgbImage::from_fn(img.width() * k, img.height() * k, |x, y| {
        *img.get_pixel(x / k, y / k)
    })
}

/// A sheet with one row per story: each frame upscaled by `scale`, its caption below in
/// black and, when different, its referential caption in blue.
pub fn story_sheet(rows: &[Vec<(RgbImage, String, String)>], scale: u32) -> RgbImage {
    let cell_w = rows
        .iter()
        .flatten()
        .map(|f| f.0.width() * scale)
        .max()
        .unwrap_or(64);
    let cell_h = rows
        .iter()
        .flatten()
        .map(|f| f.0.height() * scale)
        .max()
        .unwrap_or(64);
    let chars = (cell_w / CHAR_W) as usize;
    let text_lines = rows
        .iter()
        .flatten()
        .map(|(_, c, r)| wrap(c, chars).len() + if r != c { wrap(r, chars).len() } else { 0 })
        .max()
        .unwrap_or(0) as u32;
    let (gap, cols) = (8u32, rows.iter().map(Vec::len).max().unwrap_or(0) as u32);
    let row_h = cell_h + text_lines * LINE_H + 2 * gap;
    let mut sheet = RgbImage::from_pixel(
        gap + cols * (cell_w + gap),
        gap + rows.len() as u32 * row_h,
        Px([255, 255, 255]),
    );
    for (r, row) in rows.iter().enumerate() {
        for (c, (img, caption, referential)) in row.iter().enumerate() {
            let (x, y) = (gap + c as u32 * (cell_w + gap), gap + r as u32 * row_h);
            image::imageops::replace(&mut sheet, &upscale(img, scale), x as i64, y as i64);
            let mut ty = y + cell_h + 4;
            for line in wrap(caption, chars) {
                draw_text(&mut sheet, x, ty, &line, [0, 0, 0]);
                ty += LINE_H;
            }
            if referential != caption {
                for line in wrap(referential, chars) {
                    draw_text(&mut sheet, x, ty, &line, [20, 60, 220]);
                    ty += LINE_H;
                }
            }
        }
    }
    sheet
}

/// The cast's portraits side by side with their names.
pub fn portrait_sheet(size: usize) -> RgbImage {
    let rows = vec![(0..CAST.len())
        .map(|i| {
            (
                portrait(i, size).to_image(),
                CAST[i].name.to_string(),
                CAST[i].name.to_string(),
            )
        })
        .collect()];
    story_sheet(&rows, 1)
}

/// All backgrounds with their labels, two rows.
pub fn background_sheet(size: usize) -> RgbImage {
    let items: Vec<(RgbImage, String, String)> = (0..SCENES.len())
        .map(|i| {
            (
                draw_scene(i, size).to_image(),
                SCENES[i].name.to_string(),
                SCENES[i].name.to_string(),
            )
        })
        .collect();
    let rows: Vec<Vec<_>> = items.chunks(5).map(|c| c.to_vec()).collect();
    story_sheet(&rows, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glyphs_are_complete_and_wrap_works() {
        for (c, g) in GLYPHS {
            assert_eq!(g.len(), 35, "glyph {c}");
        }
        assert_eq!(
            wrap("Tom talks to Mia in the kitchen.", 12),
            vec!["Tom talks to", "Mia in the", "kitchen."]
        );
        let mut img = RgbImage::new(20, 10);
        draw_text(&mut img, 0, 0, "I.", [255, 255, 255]);
        assert!(img.pixels().any(|p| p.0 == [255, 255, 255]));
    }
}
