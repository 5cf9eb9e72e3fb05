//! The CLIP image preprocessor (transformers `CLIPImageProcessor`, PIL backend): optional pad to
//! square, resize of the shortest side with PIL's bicubic filter, center crop, rescale to
//! `[0, 1]`, normalise with CLIP's mean / std, channels first.
//!
//! The resize reimplements Pillow's `ImagingResample` for 8-bit images (separable convolution,
//! bicubic `a = -0.5`, support scaled by the downscale factor, 22-bit fixed-point coefficients,
//! horizontal pass then vertical pass with rounding and clamping to u8 in between). The fixture
//! test compares it with Pillow's output byte for byte.

use candle_core::{Device, Result, Tensor};
use image::RgbImage;

/// CLIP's normalisation mean (`OPENAI_CLIP_MEAN`, transformers' literals).
#[allow(clippy::excessive_precision)]
pub const CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
/// CLIP's normalisation standard deviation (`OPENAI_CLIP_STD`, transformers' literals).
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Settings of `CLIPImageProcessor` (ViT-L/14: 224 / 224).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipImageProcessor {
    /// Target length of the shortest side (`size.shortest_edge`).
    pub shortest_edge: u32,
    /// Center crop size (`crop_size`, square).
    pub crop_size: u32,
    /// Per-channel mean.
    pub mean: [f32; 3],
    /// Per-channel standard deviation.
    pub std: [f32; 3],
}

impl Default for ClipImageProcessor {
    fn default() -> Self {
        Self {
            shortest_edge: 224,
            crop_size: 224,
            mean: CLIP_MEAN,
            std: CLIP_STD,
        }
    }
}

impl ClipImageProcessor {
    /// A processor for a vision tower of `image_size` (resize and crop to that size).
    pub fn for_image_size(image_size: u32) -> Self {
        Self {
            shortest_edge: image_size,
            crop_size: image_size,
            ..Self::default()
        }
    }

    /// Resize (shortest side, PIL bicubic) then center crop, as u8.
    pub fn resize_and_crop(&self, img: &RgbImage) -> RgbImage {
        let (w, h) = img.dimensions();
        let s = self.shortest_edge;
        // transformers' get_resize_output_image_size: int(size * long / short).
        let (nw, nh) = if w <= h {
            (s, (s as u64 * h as u64 / w as u64) as u32)
        } else {
            ((s as u64 * w as u64 / h as u64) as u32, s)
        };
        let resized = resize_bicubic(img, nw, nh);
        center_crop(&resized, self.crop_size, self.crop_size)
    }

    /// `pixel_values` `(1, 3, crop, crop)` f32 for one image.
    pub fn preprocess(&self, img: &RgbImage, device: &Device) -> Result<Tensor> {
        let img = self.resize_and_crop(img);
        let (w, h) = img.dimensions();
        let (w, h) = (w as usize, h as usize);
        let mut data = vec![0f32; 3 * w * h];
        for (x, y, p) in img.enumerate_pixels() {
            for c in 0..3 {
                // transformers: u8 * (1/255) in f64, cast to f32, then (x - mean) / std in f32.
                let v = (p[c] as f64 * (1.0 / 255.0)) as f32;
                data[c * w * h + y as usize * w + x as usize] = (v - self.mean[c]) / self.std[c];
            }
        }
        Tensor::from_vec(data, (1, 3, h, w), device)
    }

    /// `pixel_values` `(n, 3, crop, crop)` for a batch.
    pub fn preprocess_batch(&self, imgs: &[RgbImage], device: &Device) -> Result<Tensor> {
        let t = imgs
            .iter()
            .map(|i| self.preprocess(i, device))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&t, 0)
    }
}

/// Pads to a square canvas of `fill`, the image centered (LLaVA's `expand2square`: offset
/// `(long - short) / 2`, rounded down). StoryGPT-V pads character portraits this way.
pub fn pad_to_square(img: &RgbImage, fill: [u8; 3]) -> RgbImage {
    let (w, h) = img.dimensions();
    if w == h {
        return img.clone();
    }
    let s = w.max(h);
    let mut out = RgbImage::from_pixel(s, s, image::Rgb(fill));
    let (ox, oy) = ((s - w) / 2, (s - h) / 2);
    image::imageops::replace(&mut out, img, ox as i64, oy as i64);
    out
}

/// transformers' `center_crop`: offsets `(size - crop) / 2` rounded down. Pads with zeros if
/// the image is smaller than the crop (as transformers does).
pub fn center_crop(img: &RgbImage, cw: u32, ch: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    if w >= cw && h >= ch {
        let (x, y) = ((w - cw) / 2, (h - ch) / 2);
        return image::imageops::crop_imm(img, x, y, cw, ch).to_image();
    }
    let mut out = RgbImage::new(cw.max(w), ch.max(h));
    let (px, py) = ((cw.max(w) - w) / 2, (ch.max(h) - h) / 2);
    image::imageops::replace(&mut out, img, px as i64, py as i64);
    center_crop(&out, cw, ch)
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    let a = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`: per output pixel, the first input
/// index and the fixed-point weights.
fn coefficients(in_size: u32, out_size: u32) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ss = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let mut k: Vec<f64> = (xmin..xmax)
                .map(|x| bicubic((x as f64 - center + 0.5) * ss))
                .collect();
            let sum: f64 = k.iter().sum();
            if sum != 0.0 {
                k.iter_mut().for_each(|w| *w /= sum);
            }
            let fixed = k
                .iter()
                .map(|&w| {
                    let v = w * (1u64 << PRECISION_BITS) as f64;
                    if w < 0.0 {
                        (v - 0.5) as i32
                    } else {
                        (v + 0.5) as i32
                    }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's `Image.resize((w, h), Image.BICUBIC)` for RGB u8 images.
pub fn resize_bicubic(img: &RgbImage, out_w: u32, out_h: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    if (w, h) == (out_w, out_h) {
        return img.clone();
    }
    let src = img.as_raw();
    let round = 1i64 << (PRECISION_BITS - 1);
    // Horizontal pass over every row (Pillow restricts it to the rows the vertical pass reads,
    // which gives the same values).
    let (mid_w, mid): (u32, Vec<u8>) = if out_w != w {
        let coeffs = coefficients(w, out_w);
        let mut mid = vec![0u8; out_w as usize * h as usize * 3];
        for y in 0..h as usize {
            for (xx, (xmin, k)) in coeffs.iter().enumerate() {
                for c in 0..3 {
                    let mut ss = round;
                    for (i, &wgt) in k.iter().enumerate() {
                        ss += src[(y * w as usize + xmin + i) * 3 + c] as i64 * wgt as i64;
                    }
                    mid[(y * out_w as usize + xx) * 3 + c] = clip8(ss);
                }
            }
        }
        (out_w, mid)
    } else {
        (w, src.clone())
    };
    let out: Vec<u8> = if out_h != h {
        let coeffs = coefficients(h, out_h);
        let mut out = vec![0u8; mid_w as usize * out_h as usize * 3];
        for (yy, (ymin, k)) in coeffs.iter().enumerate() {
            for x in 0..mid_w as usize {
                for c in 0..3 {
                    let mut ss = round;
                    for (i, &wgt) in k.iter().enumerate() {
                        ss += mid[((ymin + i) * mid_w as usize + x) * 3 + c] as i64 * wgt as i64;
                    }
                    out[(yy * mid_w as usize + x) * 3 + c] = clip8(ss);
                }
            }
        }
        out
    } else {
        mid
    };
    RgbImage::from_raw(out_w, out_h, out).expect("buffer matches dimensions")
}
