//! Portrait upload checks and normalisation: sniff the real format from the bytes, refuse
//! anything that is not a complete, decodable PNG, JPEG or WebP of sane size, apply the EXIF
//! orientation and re-encode so that no metadata (GPS, camera serials) is kept.
//!
//! Every size is checked from the image's header before a single pixel is decoded: at most
//! [`MAX_SIDE`] px a side, [`MAX_PIXELS`] pixels and [`MAX_DECODED_BYTES`] of decoded pixel
//! data, so a small file declaring a huge image (a decompression bomb) costs nothing. A JPEG
//! must also hold its whole structure up to the end-of-image marker and enough entropy-coded
//! data for the size it declares: the JPEG decoder would otherwise draw a truncated file's
//! missing part as grey filler. Request handlers go through [`normalize_portrait_bounded`],
//! which decodes on the blocking pool and at most [`MAX_CONCURRENT_DECODES`] at a time.

use std::io::Cursor;

use axum::http::StatusCode;
use image::{ImageDecoder, ImageFormat, ImageReader, Limits};
use tokio::sync::Semaphore;

use crate::config::MAX_PORTRAIT_BYTES;
use crate::error::ApiError;

/// Largest accepted width or height of an uploaded image, in pixels.
pub const MAX_SIDE: u32 = 4096;
/// Largest accepted number of pixels (width x height): 16 megapixels (4096 x 3906 at the side
/// limit), so a square image at 4096 px a side is just over it.
pub const MAX_PIXELS: u64 = 16_000_000;
/// Largest accepted decoded size, width x height x bytes per pixel of the decoded colour type
/// (64 MiB: any 8-bit image within [`MAX_PIXELS`], a 16-bit RGBA one up to 8.4 megapixels).
pub const MAX_DECODED_BYTES: u64 = 64 * 1024 * 1024;
/// What a decoder may allocate besides the pixel buffer (rows, ancillary chunks, tables).
const DECODER_SCRATCH_BYTES: u64 = 16 * 1024 * 1024;
/// Uploads decoded at the same time, in the whole process. A decode holds up to
/// [`MAX_DECODED_BYTES`] (twice that while an EXIF rotation or re-encoding copies it), so this
/// bounds the memory that uploads can take however many arrive at once; the rest wait.
pub const MAX_CONCURRENT_DECODES: usize = 2;

static DECODES: Semaphore = Semaphore::const_new(MAX_CONCURRENT_DECODES);

/// A portrait ready to store.
#[derive(Debug, Clone)]
pub struct NormalizedImage {
    /// Encoded bytes (PNG or JPEG), free of metadata.
    pub bytes: Vec<u8>,
    /// MIME type of `bytes`.
    pub mime: &'static str,
    /// Width after orientation.
    pub width: u32,
    /// Height after orientation.
    pub height: u32,
}

/// [`normalize_portrait`] for request handlers: runs on tokio's blocking pool, off the async
/// threads, once one of the [`MAX_CONCURRENT_DECODES`] slots is free. The slot is held by the
/// blocking task itself, so a client that disconnects does not free it before the decode ends.
pub async fn normalize_portrait_bounded(data: Vec<u8>) -> Result<NormalizedImage, ApiError> {
    let permit = DECODES.acquire().await.map_err(ApiError::internal)?;
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        normalize_portrait(&data)
    })
    .await
    .map_err(ApiError::internal)?
}

/// Checks and normalises uploaded image bytes.
///
/// Errors: 413 over 10 MiB; 415 when the bytes are not PNG/JPEG/WebP; 422 `image_too_large`
/// when the header declares more than 4096 px a side, 16 megapixels or 64 MiB of decoded
/// pixels (refused before decoding); 422 `invalid_image` when the image is truncated, corrupt
/// or does not decode.
pub fn normalize_portrait(data: &[u8]) -> Result<NormalizedImage, ApiError> {
    if data.len() > MAX_PORTRAIT_BYTES {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "the portrait is {} bytes; the limit is {MAX_PORTRAIT_BYTES} bytes (10 MiB)",
                data.len()
            ),
        ));
    }
    let format = image::guess_format(data)
        .ok()
        .filter(|f| matches!(f, ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP));
    let Some(format) = format else {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_image_type",
            "the portrait must be a PNG, JPEG or WebP image",
        ));
    };
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    // The pixel buffer is checked against MAX_DECODED_BYTES below, before it is allocated;
    // the decoders' own allocations are held to the same budget plus their scratch.
    limits.max_alloc = Some(MAX_DECODED_BYTES + DECODER_SCRATCH_BYTES);

    let mut reader = ImageReader::with_format(Cursor::new(data), format);
    reader.limits(limits);
    // Reads the header only; nothing the size of the image is allocated yet.
    let mut decoder = reader.into_decoder().map_err(|e| decode_error(e, format))?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(ApiError::invalid(
            "invalid_image",
            "the image has no pixels",
        ));
    }
    check_size(width, height, decoder.total_bytes(), decoder.color_type())?;
    if format == ImageFormat::Jpeg {
        check_jpeg_complete(data, width, height)?;
    }
    let orientation = decoder.orientation().ok();
    let mut image =
        image::DynamicImage::from_decoder(decoder).map_err(|e| decode_error(e, format))?;
    if let Some(orientation) = orientation {
        image.apply_orientation(orientation);
    }
    let (width, height) = (image.width(), image.height());

    let mut bytes = Vec::new();
    let mime = if format == ImageFormat::Jpeg {
        // `into_rgb8` keeps the decoded buffer when it is RGB already (a colour JPEG).
        let rgb = image.into_rgb8();
        let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 92);
        rgb.write_with_encoder(encoder)
            .map_err(ApiError::internal)?;
        "image/jpeg"
    } else {
        image
            .write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
            .map_err(ApiError::internal)?;
        "image/png"
    };
    Ok(NormalizedImage {
        bytes,
        mime,
        width,
        height,
    })
}

/// The size limits, from the header's declared size and decoded colour type.
fn check_size(
    width: u32,
    height: u32,
    decoded_bytes: u64,
    color: image::ColorType,
) -> Result<(), ApiError> {
    let pixels = u64::from(width) * u64::from(height);
    if width > MAX_SIDE || height > MAX_SIDE || pixels > MAX_PIXELS {
        return Err(too_large(width, height));
    }
    if decoded_bytes > MAX_DECODED_BYTES {
        return Err(ApiError::invalid(
            "image_too_large",
            format!(
                "the image is {width}x{height} px at {} bytes a pixel ({color:?}), which needs {} \
                 MiB to decode; at most {} MiB is accepted (an 8-bit image up to 16 megapixels)",
                color.bytes_per_pixel(),
                decoded_bytes.div_ceil(1024 * 1024),
                MAX_DECODED_BYTES / (1024 * 1024),
            ),
        ));
    }
    Ok(())
}

fn too_large(width: u32, height: u32) -> ApiError {
    let megapixels = (u64::from(width) * u64::from(height)) as f64 / 1e6;
    ApiError::invalid(
        "image_too_large",
        format!(
            "the image is {width}x{height} px ({megapixels:.1} megapixels); at most {MAX_SIDE} px \
             a side and {} megapixels are accepted",
            MAX_PIXELS / 1_000_000
        ),
    )
}

fn truncated_jpeg(why: &str) -> ApiError {
    ApiError::invalid(
        "invalid_image",
        format!("the JPEG is truncated or corrupt: {why}"),
    )
}

/// Walks a JPEG's marker structure, from SOI to EOI, without decoding it. The decoder fills
/// whatever a truncated file lacks with grey and reports success, so this is where a file
/// that ends early is caught: it must reach its end-of-image marker after at least one scan,
/// every segment must fit in the data, and its scans must hold at least one bit per 8x8
/// block (the shortest Huffman code of each block's DC coefficient), which a file whose
/// header declares far more pixels than its data holds does not. Bytes after EOI (thumbnails
/// or gain maps some cameras append) are ignored.
fn check_jpeg_complete(data: &[u8], width: u32, height: u32) -> Result<(), ApiError> {
    if data.get(..2) != Some(&[0xFF, 0xD8][..]) {
        return Err(truncated_jpeg(
            "it does not start with a start-of-image marker",
        ));
    }
    let mut pos = 2;
    let mut scans = 0usize;
    let mut entropy_bytes = 0u64;
    // Blocks of the frame, and whether its coding is Huffman (which the bound applies to).
    let mut blocks: Option<u64> = None;
    let mut huffman = false;
    loop {
        // A marker: 0xFF (any number of fill 0xFF), then its code. Decoders skip stray bytes
        // before a marker, and so does this.
        while pos < data.len() && data[pos] != 0xFF {
            pos += 1;
        }
        while pos < data.len() && data[pos] == 0xFF {
            pos += 1;
        }
        let Some(&marker) = data.get(pos) else {
            return Err(truncated_jpeg(
                "the data ends before its end-of-image marker",
            ));
        };
        pos += 1;
        match marker {
            0xD9 => break,
            // Standalone markers: restart markers (outside a scan) and TEM.
            0x01 | 0xD0..=0xD7 => continue,
            0xD8 => return Err(truncated_jpeg("a second start-of-image marker")),
            _ => {}
        }
        let Some(length) = data.get(pos..pos + 2) else {
            return Err(truncated_jpeg("the data ends inside a segment header"));
        };
        let length = usize::from(u16::from_be_bytes([length[0], length[1]]));
        if length < 2 || pos + length > data.len() {
            return Err(truncated_jpeg("a segment runs past the end of the data"));
        }
        let segment = &data[pos + 2..pos + length];
        pos += length;
        match marker {
            // Start of frame: baseline, extended and progressive Huffman (C0-C2), lossless and
            // arithmetic-coded ones (C3, C5-C7, C9-CB, CD-CF).
            0xC0..=0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => {
                huffman = matches!(marker, 0xC0..=0xC2);
                blocks = frame_blocks(segment, width, height);
            }
            // Start of scan: the entropy-coded data follows, up to the next marker that is
            // neither a stuffed 0xFF00 nor a restart marker.
            0xDA => {
                scans += 1;
                loop {
                    match data.get(pos) {
                        None => return Err(truncated_jpeg("the data ends inside the image data")),
                        Some(0xFF) => match data.get(pos + 1) {
                            None => {
                                return Err(truncated_jpeg("the data ends inside the image data"))
                            }
                            Some(0x00) => {
                                entropy_bytes += 1;
                                pos += 2;
                            }
                            Some(0xD0..=0xD7) => pos += 2,
                            Some(_) => break,
                        },
                        Some(_) => {
                            entropy_bytes += 1;
                            pos += 1;
                        }
                    }
                }
            }
            _ => {}
        }
    }
    if scans == 0 {
        return Err(truncated_jpeg("it holds no image data (no scan)"));
    }
    if let (Some(blocks), true) = (blocks, huffman) {
        if entropy_bytes * 8 < blocks {
            return Err(truncated_jpeg(&format!(
                "it declares {width}x{height} px ({blocks} blocks of 8x8) but holds only \
                 {entropy_bytes} bytes of image data, less than one bit a block"
            )));
        }
    }
    Ok(())
}

/// Number of 8x8 blocks in all components of a frame (SOF segment), each component at its
/// own sampling; `None` when the segment is malformed (the decoder reports that).
fn frame_blocks(sof: &[u8], width: u32, height: u32) -> Option<u64> {
    let count = usize::from(*sof.get(5)?);
    let components = sof.get(6..6 + 3 * count)?;
    let sampling: Vec<(u64, u64)> = components
        .chunks_exact(3)
        .map(|c| (u64::from(c[1] >> 4), u64::from(c[1] & 0x0F)))
        .collect();
    let h_max = sampling.iter().map(|s| s.0).max()?.max(1);
    let v_max = sampling.iter().map(|s| s.1).max()?.max(1);
    let (width, height) = (u64::from(width), u64::from(height));
    Some(
        sampling
            .iter()
            .map(|&(h, v)| {
                let w = (width * h).div_ceil(h_max);
                let hgt = (height * v).div_ceil(v_max);
                w.div_ceil(8) * hgt.div_ceil(8)
            })
            .sum(),
    )
}

/// The decoder's own words ("Corrupt deflate stream. BadZlibHeader") mean nothing to the
/// person uploading; they go to the log, and the answer says what happened and what to do.
fn decode_error(err: image::ImageError, format: ImageFormat) -> ApiError {
    match err {
        image::ImageError::Limits(_) => ApiError::invalid(
            "image_too_large",
            format!(
                "the image would need too much memory to decode (at most {MAX_SIDE} px a side, \
                 {} megapixels and {} MiB of pixels)",
                MAX_PIXELS / 1_000_000,
                MAX_DECODED_BYTES / (1024 * 1024)
            ),
        ),
        other => {
            tracing::info!(error = %other, "portrait upload refused: the decoder failed");
            let kind = match format {
                ImageFormat::Jpeg => "JPEG",
                ImageFormat::WebP => "WebP",
                _ => "PNG",
            };
            ApiError::invalid(
                "invalid_image",
                format!(
                    "the file looks like a {kind} image but is damaged or incomplete, so it \
                     cannot be read; save or export the picture again and upload the new file"
                ),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgb, RgbImage};

    fn png(width: u32, height: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(width, height, |x, y| Rgb([x as u8, y as u8, 7]));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn accepts_png_and_keeps_pixels() {
        let out = normalize_portrait(&png(5, 3)).unwrap();
        assert_eq!((out.width, out.height, out.mime), (5, 3, "image/png"));
        let back = image::load_from_memory(&out.bytes).unwrap().to_rgb8();
        assert_eq!(back.get_pixel(4, 2), &Rgb([4, 2, 7]));
    }

    fn jpeg(width: u32, height: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(width, height, |x, y| {
            Rgb([(x * 7) as u8, (y * 3) as u8, ((x ^ y) * 5) as u8])
        });
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Jpeg)
            .unwrap();
        out
    }

    fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let mut out = (data.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32fast::hash(&out[4..]);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    /// A PNG that is only a header declaring this size and colour (no pixel data).
    fn png_header(width: u32, height: u32, bit_depth: u8, color_type: u8) -> Vec<u8> {
        let mut ihdr = width.to_be_bytes().to_vec();
        ihdr.extend_from_slice(&height.to_be_bytes());
        ihdr.extend_from_slice(&[bit_depth, color_type, 0, 0, 0]);
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        out.extend(chunk(b"IHDR", &ihdr));
        out.extend(chunk(
            b"IDAT",
            &[0x78, 0x9C, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
        ));
        out.extend(chunk(b"IEND", &[]));
        out
    }

    #[test]
    fn declared_sizes_over_the_budgets_are_refused_from_the_header() {
        // The bomb of issue #18: 4096x4096 16-bit RGBA, 128 MiB of pixels.
        let err = normalize_portrait(&png_header(4096, 4096, 16, 6)).unwrap_err();
        assert_eq!((err.status.as_u16(), err.code), (422, "image_too_large"));
        assert!(err.detail.contains("4096x4096 px"), "{}", err.detail);
        assert!(err.detail.contains("16 megapixels"), "{}", err.detail);
        // Within 16 megapixels but 16-bit RGBA: 122 MiB to decode.
        let err = normalize_portrait(&png_header(4000, 4000, 16, 6)).unwrap_err();
        assert_eq!(err.code, "image_too_large");
        assert!(err.detail.contains("4000x4000 px"), "{}", err.detail);
        assert!(err.detail.contains("64 MiB"), "{}", err.detail);
        // Long and thin: within 4096 a side is not enough.
        assert_eq!(
            normalize_portrait(&png_header(4097, 16, 8, 2))
                .unwrap_err()
                .code,
            "image_too_large"
        );
        // Within every budget, the header passes and the missing data is what is refused.
        let err = normalize_portrait(&png_header(4000, 4000, 8, 6)).unwrap_err();
        assert_eq!(err.code, "invalid_image", "{}", err.detail);
    }

    #[test]
    fn accepts_a_complete_jpeg_even_with_bytes_after_its_end() {
        let full = jpeg(40, 30);
        let out = normalize_portrait(&full).unwrap();
        assert_eq!((out.width, out.height, out.mime), (40, 30, "image/jpeg"));
        let mut trailing = full.clone();
        trailing.extend_from_slice(b"trailing bytes some cameras append");
        assert!(normalize_portrait(&trailing).is_ok());
    }

    #[test]
    fn refuses_jpegs_that_end_early() {
        let full = jpeg(200, 150);
        // The decoder alone accepts every one of these and fills the rest with grey.
        for keep in [
            full.len() - 1,
            full.len() - 2,
            full.len() * 3 / 4,
            full.len() / 2,
            700,
        ] {
            let err = normalize_portrait(&full[..keep]).unwrap_err();
            assert_eq!(
                err.code, "invalid_image",
                "kept {keep} bytes: {}",
                err.detail
            );
            assert!(err.detail.contains("truncated"), "{}", err.detail);
        }
    }

    #[test]
    fn refuses_a_jpeg_declaring_far_more_pixels_than_it_holds() {
        // A complete 16x16 JPEG whose frame header is edited to say 4000x4000: what issue
        // #18 saw accepted as a 4000x4000 portrait of grey.
        let mut lie = jpeg(16, 16);
        let sof = lie.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        lie[sof + 5..sof + 7].copy_from_slice(&4000u16.to_be_bytes());
        lie[sof + 7..sof + 9].copy_from_slice(&4000u16.to_be_bytes());
        let err = normalize_portrait(&lie).unwrap_err();
        assert_eq!(err.code, "invalid_image", "{}", err.detail);
        assert!(err.detail.contains("4000x4000"), "{}", err.detail);
    }

    #[tokio::test]
    async fn bounded_normalisation_decodes_off_the_runtime() {
        let out = normalize_portrait_bounded(png(9, 4)).await.unwrap();
        assert_eq!((out.width, out.height), (9, 4));
        let err = normalize_portrait_bounded(png_header(4096, 4096, 16, 6))
            .await
            .unwrap_err();
        assert_eq!(err.code, "image_too_large");
    }

    #[test]
    fn refuses_text_truncated_and_oversized_images() {
        assert_eq!(
            normalize_portrait(b"hello, not an image")
                .unwrap_err()
                .status,
            415
        );
        let mut cut = png(64, 64);
        cut.truncate(cut.len() / 2);
        let err = normalize_portrait(&cut).unwrap_err();
        assert_eq!(err.code, "invalid_image");
        // Plain words, not the decoder's.
        assert_eq!(
            err.detail,
            "the file looks like a PNG image but is damaged or incomplete, so it cannot be \
             read; save or export the picture again and upload the new file"
        );
        let mut garbled = png(64, 64);
        let idat = garbled.windows(4).position(|w| w == b"IDAT").unwrap();
        garbled[idat + 4..idat + 12].copy_from_slice(b"garbage!");
        let err = normalize_portrait(&garbled).unwrap_err();
        assert!(
            err.detail.contains("damaged or incomplete"),
            "{}",
            err.detail
        );
        assert!(
            !err.detail.to_lowercase().contains("zlib"),
            "{}",
            err.detail
        );
        assert_eq!(
            normalize_portrait(&png(4097, 1)).unwrap_err().code,
            "image_too_large"
        );
    }
}
