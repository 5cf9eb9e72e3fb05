//! Portrait upload checks and normalisation: sniff the real format from the bytes, refuse
//! anything that is not a decodable PNG, JPEG or WebP of sane size, apply the EXIF
//! orientation and re-encode so that no metadata (GPS, camera serials) is kept.

use std::io::Cursor;

use axum::http::StatusCode;
use image::{ImageDecoder, ImageFormat, ImageReader, Limits};

use crate::config::MAX_PORTRAIT_BYTES;
use crate::error::ApiError;

/// Largest accepted width or height of an uploaded image, in pixels.
pub const MAX_SIDE: u32 = 4096;

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

/// Checks and normalises uploaded image bytes.
///
/// Errors: 413 over 10 MiB, 415 when the bytes are not PNG/JPEG/WebP, 422 when the image is
/// larger than 4096 px a side, would need too much memory to decode, or does not decode.
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
    // 4096 x 4096 RGBA16 plus decoder scratch; anything needing more is a decompression bomb.
    limits.max_alloc = Some(160 * 1024 * 1024);

    let mut reader = ImageReader::with_format(Cursor::new(data), format);
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(decode_error)?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(ApiError::invalid(
            "invalid_image",
            "the image has no pixels",
        ));
    }
    if width > MAX_SIDE || height > MAX_SIDE {
        return Err(too_large(width, height));
    }
    let orientation = decoder.orientation().ok();
    let mut image = image::DynamicImage::from_decoder(decoder).map_err(decode_error)?;
    if let Some(orientation) = orientation {
        image.apply_orientation(orientation);
    }
    let (width, height) = (image.width(), image.height());

    let mut bytes = Vec::new();
    let mime = if format == ImageFormat::Jpeg {
        let rgb = image.to_rgb8();
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

fn too_large(width: u32, height: u32) -> ApiError {
    ApiError::invalid(
        "image_too_large",
        format!("the image is {width}x{height} px; at most {MAX_SIDE} px a side is accepted"),
    )
}

fn decode_error(err: image::ImageError) -> ApiError {
    match err {
        image::ImageError::Limits(_) => ApiError::invalid(
            "image_too_large",
            format!(
                "the image would need too much memory to decode (at most {MAX_SIDE} px a side)"
            ),
        ),
        other => ApiError::invalid(
            "invalid_image",
            format!("the image could not be decoded: {other}"),
        ),
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
        assert_eq!(normalize_portrait(&cut).unwrap_err().code, "invalid_image");
        assert_eq!(
            normalize_portrait(&png(4097, 1)).unwrap_err().code,
            "image_too_large"
        );
    }
}
