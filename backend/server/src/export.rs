//! Story exports: a ZIP of the frame images with `story.json`, an animated GIF of the ready
//! frames, and a printable comic page as PDF. Pure functions over an [`ExportStory`] read
//! from the store; the handlers in `api/export.rs` run them on the blocking pool.
//!
//! Which frames go where:
//! - **ZIP**: every stored image, whatever its status (a `stale` image is the last one drawn
//!   before its caption changed), named by story position (`frame-03.png` is the third
//!   frame), the cast's portraits (`portraits/01-mia.png`), plus `story.json` (version 2)
//!   listing every frame with its status, image file (or null), seed and how it was drawn
//!   (steps, guidance, sampler, model bundle): everything needed to draw the story again, and
//!   what `POST /api/stories/import` reads back as a new story. A story with no images yet
//!   still exports: `story.json` and the portraits are a complete backup of its text and cast.
//! - **GIF** and **PDF**: only `ready` frames show an image. They need at least one; otherwise
//!   409 `story_not_generated`. The PDF keeps every caption, drawing an empty panel that names
//!   the status where a frame has no ready image, so the page reads as the whole story.

pub mod pdf;

use std::io::{Cursor, Write};

use axum::http::StatusCode;
use image::codecs::gif::{GifEncoder, Repeat};
use image::{Delay, DynamicImage, Rgba, RgbaImage};
use serde_json::json;

use crate::error::{ApiError, ApiResult};
use crate::store::characters::Pronoun;
use crate::store::frame_media::FrameMedia;
use crate::store::frame_versions::DrawOptions;

/// What `story.json` says it is; the importer refuses anything else.
pub const STORY_FORMAT: &str = "storygpt-v story export";
/// The newest `story.json` version written (the importer reads 1 and 2).
pub const STORY_VERSION: u64 = 2;

/// How long each GIF frame shows.
pub const GIF_FRAME_MS: u32 = 1500;
/// Longest side of the GIF canvas; larger frames are scaled down to keep the file small.
pub const GIF_MAX_SIDE: u32 = 768;
/// Smallest longest side of the GIF canvas: smaller frames (the toy model's 64 px) are
/// enlarged by a whole factor, nearest neighbour, so they stay sharp and can be seen.
pub const GIF_MIN_SIDE: u32 = 256;
/// Longest side of a PDF panel image; 1024 px is ~300 dpi at the panel's printed width.
pub const PDF_MAX_SIDE: u32 = 1024;

/// A cast member as exported.
#[derive(Debug, Clone)]
pub struct ExportCharacter {
    /// Character id.
    pub id: i64,
    /// Name.
    pub name: String,
    /// Pronoun.
    pub pronoun: Pronoun,
    /// The stored portrait.
    pub portrait: Vec<u8>,
    /// Its MIME type.
    pub portrait_mime: String,
}

impl ExportCharacter {
    /// The portrait's path in the ZIP: `portraits/01-mia.png` (cast order, 1-based).
    pub fn portrait_file(&self, index: usize) -> String {
        let slug: String = self
            .name
            .chars()
            .map(|c| {
                if c.is_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        let ext = if self.portrait_mime == "image/jpeg" {
            "jpg"
        } else {
            "png"
        };
        format!(
            "portraits/{:02}-{}.{ext}",
            index + 1,
            slug.trim_matches('-')
        )
    }
}

/// Everything an export needs about a story.
#[derive(Debug, Clone)]
pub struct ExportStory {
    /// Story id.
    pub id: i64,
    /// Title.
    pub title: String,
    /// The cast, in story order.
    pub characters: Vec<ExportCharacter>,
    /// Frames in story order, with image bytes.
    pub frames: Vec<FrameMedia>,
    /// How each drawn frame's image was made, by frame id.
    pub drawn_with: std::collections::HashMap<i64, DrawOptions>,
}

impl ExportStory {
    /// Frames whose image is current: status `ready` with an image stored.
    pub fn ready_frames(&self) -> Vec<&FrameMedia> {
        self.frames
            .iter()
            .filter(|f| f.status == "ready" && f.image.is_some())
            .collect()
    }

    /// A file-name stem from the title: ASCII letters and digits, words joined by '-'.
    pub fn file_stem(&self) -> String {
        let mut slug = String::new();
        for ch in self.title.chars() {
            if ch.is_ascii_alphanumeric() {
                slug.push(ch.to_ascii_lowercase());
            } else if !slug.is_empty() && !slug.ends_with('-') {
                slug.push('-');
            }
            if slug.len() >= 48 {
                break;
            }
        }
        let slug = slug.trim_end_matches('-');
        if slug.is_empty() {
            format!("story-{}", self.id)
        } else {
            format!("story-{}-{slug}", self.id)
        }
    }

    fn not_generated(&self) -> ApiError {
        ApiError::new(
            StatusCode::CONFLICT,
            "story_not_generated",
            if self.frames.is_empty() {
                format!(
                    "story {} has no frames; add captions and generate it first",
                    self.id
                )
            } else {
                format!(
                    "no frame of story {} has a ready image yet; generate the story first \
                     (the ZIP export works before that)",
                    self.id
                )
            },
        )
    }
}

/// Name of a frame's image in the ZIP: `frame-01.png`, zero-padded to at least two digits
/// (three from 100 frames) so that sorting the names keeps the story order.
pub fn frame_file_name(position: i64, frame_count: usize, mime: &str) -> String {
    let width = frame_count.to_string().len().max(2);
    let extension = match mime {
        "image/png" => "png",
        "image/jpeg" => "jpg",
        "image/webp" => "webp",
        "image/gif" => "gif",
        _ => "bin",
    };
    format!("frame-{:0width$}.{extension}", position + 1)
}

fn zip_time(rfc3339: &str) -> zip::DateTime {
    use chrono::{Datelike, Timelike};
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .ok()
        .and_then(|t| {
            zip::DateTime::from_date_and_time(
                u16::try_from(t.year()).ok()?,
                t.month() as u8,
                t.day() as u8,
                t.hour() as u8,
                t.minute() as u8,
                t.second() as u8,
            )
            .ok()
        })
        .unwrap_or_default()
}

/// `story.json`: the story's text, cast and per-frame generation facts.
pub fn story_json(story: &ExportStory) -> serde_json::Value {
    let count = story.frames.len();
    json!({
        "format": STORY_FORMAT,
        "version": STORY_VERSION,
        "id": story.id,
        "title": story.title,
        "captions": story.frames.iter().map(|f| f.caption.as_str()).collect::<Vec<_>>(),
        "characters": story.characters.iter().enumerate().map(|(i, c)| json!({
            "id": c.id,
            "name": c.name,
            "pronoun": c.pronoun.as_str(),
            "portrait": c.portrait_file(i),
        })).collect::<Vec<_>>(),
        "frames": story.frames.iter().map(|f| {
            let drawn = story.drawn_with.get(&f.id).filter(|_| f.image.is_some());
            json!({
                "position": f.position + 1,
                "caption": f.caption,
                "status": f.status,
                "seed": f.seed,
                "duration_ms": f.duration_ms,
                "image": match (&f.image, &f.image_mime) {
                    (Some(_), Some(mime)) => Some(frame_file_name(f.position, count, mime)),
                    _ => None,
                },
                "steps": drawn.map(|d| d.steps),
                "guidance_scale": drawn.map(|d| d.guidance_scale),
                "scheduler": drawn.and_then(|d| d.scheduler.clone()),
                "bundle": drawn.and_then(|d| d.bundle.clone()),
                "negative_prompt": drawn.map(|d| d.negative_prompt.clone()),
                "width": drawn.and_then(|d| d.width),
                "height": drawn.and_then(|d| d.height),
            })
        }).collect::<Vec<_>>(),
    })
}

/// The ZIP export: `story.json` (deflated) then each stored frame image in story order
/// (stored as is: PNG and JPEG are compressed already, and the bytes stay exactly those kept).
pub fn zip(story: &ExportStory) -> ApiResult<Vec<u8>> {
    use zip::write::SimpleFileOptions;
    use zip::CompressionMethod;

    let fail = |e: zip::result::ZipError| ApiError::internal(format!("zip export: {e}"));
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let newest = story
        .frames
        .iter()
        .map(|f| f.updated_at.as_str())
        .max()
        .unwrap_or("");
    let json_options = SimpleFileOptions::default()
        .compression_method(CompressionMethod::Deflated)
        .last_modified_time(zip_time(newest))
        .unix_permissions(0o644);
    writer
        .start_file("story.json", json_options)
        .map_err(fail)?;
    let text = serde_json::to_vec_pretty(&story_json(story)).map_err(ApiError::internal)?;
    writer.write_all(&text).map_err(ApiError::internal)?;
    for (i, character) in story.characters.iter().enumerate() {
        let options = SimpleFileOptions::default()
            .compression_method(CompressionMethod::Stored)
            .last_modified_time(zip_time(newest))
            .unix_permissions(0o644);
        writer
            .start_file(character.portrait_file(i), options)
            .map_err(fail)?;
        writer
            .write_all(&character.portrait)
            .map_err(ApiError::internal)?;
    }
    let count = story.frames.len();
    for frame in &story.frames {
        let (Some(bytes), Some(mime)) = (&frame.image, &frame.image_mime) else {
            continue;
        };
        let options = SimpleFileOptions::default()
            .compression_method(CompressionMethod::Stored)
            .last_modified_time(zip_time(&frame.updated_at))
            .unix_permissions(0o644);
        writer
            .start_file(frame_file_name(frame.position, count, mime), options)
            .map_err(fail)?;
        writer.write_all(bytes).map_err(ApiError::internal)?;
    }
    Ok(writer.finish().map_err(fail)?.into_inner())
}

fn decode(frame: &FrameMedia) -> ApiResult<DynamicImage> {
    let bytes = frame.image.as_deref().unwrap_or_default();
    image::load_from_memory(bytes).map_err(|e| {
        ApiError::internal(format!(
            "the stored image of frame {} does not decode: {e}",
            frame.id
        ))
    })
}

/// Scales `(w, h)` down (never up) to fit a `max` x `max` box.
fn fit(w: u32, h: u32, max: u32) -> (u32, u32) {
    if w <= max && h <= max {
        return (w.max(1), h.max(1));
    }
    let scale = max as f64 / w.max(h) as f64;
    (
        ((w as f64 * scale).round() as u32).max(1),
        ((h as f64 * scale).round() as u32).max(1),
    )
}

/// The GIF canvas for a first frame of `(w, h)`: scaled down to fit [`GIF_MAX_SIDE`], or up
/// by the smallest whole factor that reaches [`GIF_MIN_SIDE`].
fn gif_canvas(w: u32, h: u32) -> (u32, u32) {
    let longest = w.max(h).max(1);
    if longest >= GIF_MIN_SIDE {
        return fit(w, h, GIF_MAX_SIDE);
    }
    let factor = GIF_MIN_SIDE.div_ceil(longest);
    (w.max(1) * factor, h.max(1) * factor)
}

/// The GIF export: the ready frames in story order, 1.5 s each, looping forever. The canvas
/// is the first ready frame's size, scaled to fit 768 px or enlarged (whole factor, nearest
/// neighbour) to at least 256; a frame of another shape is scaled to fit and centred on
/// white.
pub fn gif(story: &ExportStory) -> ApiResult<Vec<u8>> {
    let ready = story.ready_frames();
    let Some(first) = ready.first() else {
        return Err(story.not_generated());
    };
    let first = decode(first)?;
    let (width, height) = gif_canvas(first.width(), first.height());
    let mut out = Vec::new();
    {
        // Speed 10 of 1..=30: NeuQuant quality close to the slowest setting, several times faster.
        let mut encoder = GifEncoder::new_with_speed(&mut out, 10);
        encoder
            .set_repeat(Repeat::Infinite)
            .map_err(ApiError::internal)?;
        for frame in ready {
            let image = decode(frame)?;
            let canvas = if (image.width(), image.height()) == (width, height) {
                image.to_rgba8()
            } else {
                let (w, h) = fit_into(image.width(), image.height(), width, height);
                // Enlarging keeps pixels square and sharp; shrinking averages them.
                let filter = if w > image.width() {
                    image::imageops::FilterType::Nearest
                } else {
                    image::imageops::FilterType::Triangle
                };
                let scaled = image.resize_exact(w, h, filter).to_rgba8();
                let mut canvas = RgbaImage::from_pixel(width, height, Rgba([255, 255, 255, 255]));
                image::imageops::overlay(
                    &mut canvas,
                    &scaled,
                    ((width - w) / 2) as i64,
                    ((height - h) / 2) as i64,
                );
                canvas
            };
            encoder
                .encode_frame(image::Frame::from_parts(
                    canvas,
                    0,
                    0,
                    Delay::from_numer_denom_ms(GIF_FRAME_MS, 1),
                ))
                .map_err(ApiError::internal)?;
        }
    }
    Ok(out)
}

/// The largest size with `w:h`'s aspect that fits `(max_w, max_h)`.
fn fit_into(w: u32, h: u32, max_w: u32, max_h: u32) -> (u32, u32) {
    let scale = (max_w as f64 / w.max(1) as f64).min(max_h as f64 / h.max(1) as f64);
    (
        ((w as f64 * scale).round() as u32).clamp(1, max_w),
        ((h as f64 * scale).round() as u32).clamp(1, max_h),
    )
}

/// The PDF export: an A4 comic page (more pages past six frames) with the title, the frames
/// in a two-column grid and each caption under its panel.
pub fn pdf(story: &ExportStory) -> ApiResult<Vec<u8>> {
    if story.ready_frames().is_empty() {
        return Err(story.not_generated());
    }
    let mut panels = Vec::with_capacity(story.frames.len());
    for frame in &story.frames {
        let image = if frame.status == "ready" && frame.image.is_some() {
            let decoded = decode(frame)?;
            let (w, h) = fit(decoded.width(), decoded.height(), PDF_MAX_SIDE);
            let rgb = if (w, h) == (decoded.width(), decoded.height()) {
                decoded.to_rgb8()
            } else {
                decoded
                    .resize_exact(w, h, image::imageops::FilterType::Triangle)
                    .to_rgb8()
            };
            let mut jpeg = Vec::new();
            let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90);
            rgb.write_with_encoder(encoder)
                .map_err(ApiError::internal)?;
            Some(pdf::Jpeg {
                bytes: jpeg,
                width: w,
                height: h,
            })
        } else {
            None
        };
        let placeholder = match frame.status.as_str() {
            "ready" => "no image".to_string(),
            "stale" => "caption changed since drawn".to_string(),
            "failed" => "generation failed".to_string(),
            "queued" | "running" => "being generated".to_string(),
            _ => "not generated yet".to_string(),
        };
        panels.push(pdf::Panel {
            number: frame.position as usize + 1,
            caption: frame.caption.clone(),
            image,
            placeholder,
        });
    }
    Ok(pdf::comic(&story.title, &panels))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32, shade: u8) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, _| image::Rgb([shade, x as u8, 0]));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    fn frame(position: i64, status: &str, image: Option<Vec<u8>>) -> FrameMedia {
        FrameMedia {
            id: position + 10,
            position,
            caption: format!("Caption {}", position + 1),
            status: status.into(),
            seed: image.as_ref().map(|_| 42 + position),
            duration_ms: image.as_ref().map(|_| 1200),
            has_image: image.is_some(),
            image_mime: image.as_ref().map(|_| "image/png".to_string()),
            image,
            updated_at: "2025-03-04T05:06:07.000Z".into(),
            attention_count: 0,
            version_id: None,
            version_count: 0,
        }
    }

    fn story(frames: Vec<FrameMedia>) -> ExportStory {
        ExportStory {
            id: 7,
            title: "At the door: (part 1)".into(),
            characters: vec![ExportCharacter {
                id: 1,
                name: "Fred".into(),
                pronoun: Pronoun::He,
                portrait: png(2, 2, 5),
                portrait_mime: "image/png".into(),
            }],
            frames,
            drawn_with: Default::default(),
        }
    }

    #[test]
    fn names_sort_in_story_order() {
        assert_eq!(frame_file_name(0, 5, "image/png"), "frame-01.png");
        assert_eq!(frame_file_name(11, 12, "image/jpeg"), "frame-12.jpg");
        assert_eq!(frame_file_name(8, 150, "image/png"), "frame-009.png");
        assert_eq!(story(vec![]).file_stem(), "story-7-at-the-door-part-1");
    }

    #[test]
    fn gif_and_pdf_need_a_ready_frame() {
        let s = story(vec![
            frame(0, "pending", None),
            frame(1, "stale", Some(png(4, 4, 1))),
        ]);
        assert_eq!(gif(&s).unwrap_err().code, "story_not_generated");
        assert_eq!(pdf(&s).unwrap_err().status, StatusCode::CONFLICT);
        // The ZIP still has the stale image and the whole text.
        let json = story_json(&s);
        assert_eq!(json["frames"][0]["image"], serde_json::Value::Null);
        assert_eq!(json["frames"][1]["image"], "frame-02.png");
        assert_eq!(json["captions"][1], "Caption 2");
        assert_eq!(json["characters"][0]["pronoun"], "he");
    }

    #[test]
    fn gif_frames_share_the_first_frames_canvas() {
        let s = story(vec![
            frame(0, "ready", Some(png(8, 6, 10))),
            frame(1, "pending", None),
            frame(2, "ready", Some(png(3, 9, 200))),
        ]);
        let bytes = gif(&s).unwrap();
        use image::AnimationDecoder;
        let decoder = image::codecs::gif::GifDecoder::new(Cursor::new(bytes)).unwrap();
        let frames = decoder.into_frames().collect_frames().unwrap();
        assert_eq!(frames.len(), 2);
        for f in &frames {
            // 8 x 6 is enlarged 32 times to reach 256 px.
            assert_eq!(f.buffer().dimensions(), (256, 192));
            assert_eq!(f.delay().numer_denom_ms(), (1500, 1));
        }
    }

    #[test]
    fn small_frames_are_enlarged_sharply_and_large_ones_shrunk() {
        assert_eq!(gif_canvas(64, 64), (256, 256));
        assert_eq!(gif_canvas(100, 50), (300, 150));
        assert_eq!(gif_canvas(512, 512), (512, 512));
        assert_eq!(gif_canvas(1536, 768), (768, 384));
        // A 64 px frame of four flat quadrants: each enlarged pixel is a 4 x 4 block of one
        // colour, so the quadrant edges stay hard (no blended pixels between them).
        let mut img = image::RgbImage::new(64, 64);
        for (x, y, p) in img.enumerate_pixels_mut() {
            *p = image::Rgb(match (x < 32, y < 32) {
                (true, true) => [200, 30, 30],
                (false, true) => [30, 200, 30],
                (true, false) => [30, 30, 200],
                (false, false) => [230, 230, 40],
            });
        }
        let mut bytes = Vec::new();
        img.write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png)
            .unwrap();
        let s = story(vec![frame(0, "ready", Some(bytes))]);
        use image::AnimationDecoder;
        let decoder = image::codecs::gif::GifDecoder::new(Cursor::new(gif(&s).unwrap())).unwrap();
        let frames = decoder.into_frames().collect_frames().unwrap();
        let out = frames[0].buffer();
        assert_eq!(out.dimensions(), (256, 256));
        let colours: std::collections::HashSet<[u8; 4]> = out.pixels().map(|p| p.0).collect();
        assert_eq!(colours.len(), 4, "no blended colours: {colours:?}");
        assert_ne!(
            out.get_pixel(127, 0),
            out.get_pixel(128, 0),
            "a hard edge at 4 x 32"
        );
    }
}
