//! What a worker does with an uploaded image: checks it against the limits
//! from its header alone, decodes it, reads its EXIF date and orientation
//! (and whether it carries a GPS location, only to say it was dropped), and
//! makes a JPEG thumbnail with no metadata at all.
//!
//! Everything here is blocking, CPU-bound work on bytes in memory: the
//! worker runs it in `spawn_blocking`, under a semaphore of the cores.
//!
//! A decompression bomb (a header claiming 60000×60000 pixels over a few
//! bytes of compressed data) is refused before any pixel buffer exists: the
//! dimensions and the decoded size are checked from the header, and the
//! decoder is given an allocation limit as well. A truncated or corrupt
//! file fails in the decoder. Both are permanent: the same bytes would fail
//! again.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, codecs::jpeg::JpegEncoder, metadata};

/// The limits an image must fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// The largest upload, in bytes (checked by `CreatePhoto` too).
    pub max_bytes: usize,
    /// The longest side, in pixels.
    pub max_side: u32,
    /// The most pixels (width × height).
    pub max_pixels: u64,
    /// The most memory the decoder may allocate, the decoded image
    /// included: with one decode per core, the processing's memory is at
    /// most the cores times this.
    pub max_alloc: u64,
    /// The thumbnail fits in a square of this side.
    pub thumbnail_side: u32,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits {
            max_bytes: 10 * 1024 * 1024,
            // A 12 MP phone photo is 4032 × 3024; a 45 MP camera 8192 × 5464.
            max_side: 12_000,
            max_pixels: 50_000_000,
            // 50 MP of RGB8 is 150 MB.
            max_alloc: 192 * 1024 * 1024,
            thumbnail_side: 256,
        }
    }
}

/// A processed image.
#[derive(Debug, Clone, PartialEq)]
pub struct Processed {
    /// The format, as a media type (`image/jpeg`, `image/png`).
    pub format: &'static str,
    /// The width as displayed (the EXIF orientation applied).
    pub width: u32,
    /// The height as displayed.
    pub height: u32,
    /// `DateTimeOriginal` (with its offset when given, else as UTC), as
    /// seconds and nanoseconds since the Unix epoch.
    pub taken: Option<(i64, i32)>,
    /// The EXIF orientation (1-8), 0 when none is recorded.
    pub orientation: u8,
    /// Whether the EXIF carried GPS fields (dropped: nothing keeps them).
    pub had_location: bool,
    /// The thumbnail, a JPEG.
    pub thumbnail: Vec<u8>,
    /// Its width.
    pub thumbnail_width: u32,
    /// Its height.
    pub thumbnail_height: u32,
}

/// The media type of the thumbnails.
pub const THUMBNAIL_TYPE: &str = "image/jpeg";

/// The media type of an image's format, from its first bytes: JPEG and PNG
/// only (what `CreatePhoto` accepts).
pub fn sniff(bytes: &[u8]) -> Option<&'static str> {
    match image::guess_format(bytes) {
        Ok(ImageFormat::Jpeg) => Some("image/jpeg"),
        Ok(ImageFormat::Png) => Some("image/png"),
        _ => None,
    }
}

/// Processes `bytes`; an `Err` is permanent (the image is invalid or past
/// the limits) and says why, for people.
pub fn process(bytes: &[u8], limits: &ImageLimits) -> Result<Processed, String> {
    if bytes.len() > limits.max_bytes {
        return Err(format!(
            "the image has {} bytes, more than the {} accepted",
            bytes.len(),
            limits.max_bytes
        ));
    }
    let (format, media) = match image::guess_format(bytes) {
        Ok(ImageFormat::Jpeg) => (ImageFormat::Jpeg, "image/jpeg"),
        Ok(ImageFormat::Png) => (ImageFormat::Png, "image/png"),
        _ => return Err("the image is neither a JPEG nor a PNG".into()),
    };
    if format == ImageFormat::Jpeg {
        // The JPEG decoder fills in what is missing of a cut file: refuse
        // one that ends before its EOI marker instead.
        jpeg_is_whole(bytes)?;
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    // The decoder's own guard; the dimensions are checked below, with a
    // clearer message, before anything is decoded.
    let mut decoder_limits = Limits::default();
    decoder_limits.max_alloc = Some(limits.max_alloc);
    reader.limits(decoder_limits);
    // Reads the header only (PNG: up to the first IDAT chunk; JPEG: the
    // markers before the scan).
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| format!("the image's header does not decode: {e}"))?;
    let (width, height) = decoder.dimensions();
    check_header(width, height, decoder.total_bytes(), limits)?;

    // EXIF is best effort: a broken EXIF block loses its data, not the photo.
    let exif = decoder.exif_metadata().ok().flatten().and_then(read_exif);
    let exif = exif.unwrap_or_default();
    let image = DynamicImage::from_decoder(decoder).map_err(|e| format!("the image does not decode: {e}"))?;

    let side = limits.thumbnail_side;
    // Scaled down to fit, never up.
    let mut thumbnail = match width <= side && height <= side {
        true => image,
        false => image.thumbnail(side, side),
    };
    if let Some(orientation) = metadata::Orientation::from_exif(exif.orientation) {
        thumbnail.apply_orientation(orientation);
    }
    let (width, height) = match exif.orientation {
        // 5 to 8 turn the picture a quarter: its sides swap.
        5..=8 => (height, width),
        _ => (width, height),
    };
    let rgb = thumbnail.to_rgb8();
    let mut encoded = Vec::new();
    JpegEncoder::new_with_quality(&mut encoded, 80)
        .encode_image(&rgb)
        .map_err(|e| format!("the thumbnail does not encode: {e}"))?;
    Ok(Processed {
        format: media,
        width,
        height,
        taken: exif.taken,
        orientation: exif.orientation,
        had_location: exif.had_location,
        thumbnail: encoded,
        thumbnail_width: rgb.width(),
        thumbnail_height: rgb.height(),
    })
}

/// The limits, from the header's claims, before a pixel is decoded.
fn check_header(width: u32, height: u32, decoded_bytes: u64, limits: &ImageLimits) -> Result<(), String> {
    let pixels = u64::from(width) * u64::from(height);
    if width == 0 || height == 0 {
        return Err(format!("the image's header claims {width}×{height} pixels"));
    }
    if width > limits.max_side || height > limits.max_side || pixels > limits.max_pixels {
        return Err(format!(
            "the image's header claims {width}×{height} pixels ({pixels} in all); at most {} on a side and {} \
             in all are accepted (a decompression bomb is refused before it is decoded)",
            limits.max_side, limits.max_pixels
        ));
    }
    if decoded_bytes > limits.max_alloc {
        return Err(format!(
            "decoded, the image would take {decoded_bytes} bytes; at most {} are accepted",
            limits.max_alloc
        ));
    }
    Ok(())
}

/// Walks a JPEG's markers from SOI to EOI (segments by their length, scan
/// data up to the next marker: in scan data a 0xFF byte is followed by 0x00
/// or a restart marker): an `Err` if the file ends first. Bytes after EOI
/// (a motion photo's video, say) are allowed.
fn jpeg_is_whole(bytes: &[u8]) -> Result<(), String> {
    let cut = || Err("the JPEG is truncated: it ends before its end-of-image marker (it does not decode)".to_owned());
    let mut at = 2;
    loop {
        // A marker: 0xFF (fill bytes allowed), then its code.
        while bytes.get(at) == Some(&0xFF) && bytes.get(at + 1) == Some(&0xFF) {
            at += 1;
        }
        let (Some(0xFF), Some(&code)) = (bytes.get(at), bytes.get(at + 1)) else {
            return cut();
        };
        at += 2;
        match code {
            0xD9 => return Ok(()),
            // Standalone markers: no length.
            0x01 | 0xD0..=0xD7 => continue,
            _ => {}
        }
        let (Some(&high), Some(&low)) = (bytes.get(at), bytes.get(at + 1)) else {
            return cut();
        };
        at += usize::from(u16::from_be_bytes([high, low]));
        if code == 0xDA {
            // Scan data, up to the next marker that is not a stuffed byte
            // or a restart.
            loop {
                match (bytes.get(at), bytes.get(at + 1)) {
                    (Some(0xFF), Some(0x00 | 0xD0..=0xD7)) => at += 2,
                    (Some(0xFF), Some(_)) => break,
                    (Some(_), _) => at += 1,
                    (None, _) => return cut(),
                }
            }
        }
    }
}

/// What Lightbox reads of an image's EXIF.
#[derive(Debug, Default)]
struct ExifData {
    taken: Option<(i64, i32)>,
    orientation: u8,
    had_location: bool,
}

/// Reads the raw EXIF block (a TIFF structure, as the decoders hand it).
fn read_exif(raw: Vec<u8>) -> Option<ExifData> {
    let exif = exif::Reader::new().read_raw(raw).ok()?;
    let orientation = exif
        .get_field(exif::Tag::Orientation, exif::In::PRIMARY)
        .and_then(|field| field.value.get_uint(0))
        .and_then(|value| u8::try_from(value).ok())
        .filter(|value| (1..=8).contains(value))
        .unwrap_or(0);
    let had_location = exif
        .fields()
        .any(|field| field.tag == exif::Tag::GPSInfoIFDPointer || field.tag.context() == exif::Context::Gps);
    let ascii = |tag| match exif.get_field(tag, exif::In::PRIMARY).map(|f| &f.value) {
        Some(exif::Value::Ascii(values)) => values.first().cloned(),
        _ => None,
    };
    let taken = ascii(exif::Tag::DateTimeOriginal).and_then(|text| {
        let mut time = exif::DateTime::from_ascii(&text).ok()?;
        if let Some(offset) = ascii(exif::Tag::OffsetTimeOriginal) {
            // A malformed offset leaves the time as UTC.
            let _ = time.parse_offset(&offset);
        }
        if let Some(subsec) = ascii(exif::Tag::SubSecTimeOriginal) {
            let _ = time.parse_subsec(&subsec);
        }
        unix_time(&time)
    });
    Some(ExifData {
        taken,
        orientation,
        had_location,
    })
}

/// An EXIF date and time as seconds and nanoseconds since the Unix epoch;
/// `None` for a date that does not exist.
fn unix_time(time: &exif::DateTime) -> Option<(i64, i32)> {
    let (year, month, day) = (i64::from(time.year), i64::from(time.month), i64::from(time.day));
    let valid = (1900..=9999).contains(&year)
        && (1..=12).contains(&month)
        && (1..=days_in_month(year, month)).contains(&day)
        && time.hour < 24
        && time.minute < 60
        && time.second < 61;
    if !valid {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let local = days * 86_400 + i64::from(time.hour) * 3600 + i64::from(time.minute) * 60 + i64::from(time.second);
    let offset = i64::from(time.offset.unwrap_or(0)) * 60;
    let nanos = time.nanosecond.and_then(|n| i32::try_from(n).ok()).unwrap_or(0);
    Some((local - offset, nanos))
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

/// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_count_from_the_epoch() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2024, 2, 29), 19_782);
        let time = exif::DateTime::from_ascii(b"2024:02:29 12:30:15").expect("parses");
        assert_eq!(unix_time(&time), Some((19_782 * 86_400 + 45_015, 0)));
        let mut time = exif::DateTime::from_ascii(b"2023:02:29 12:30:15").expect("parses");
        assert_eq!(unix_time(&time), None, "no 29 February in 2023");
        time.day = 28;
        time.offset = Some(120);
        assert_eq!(unix_time(&time).map(|t| t.0 % 86_400), Some(45_015 - 7200));
    }

    #[test]
    fn headers_past_the_limits_are_refused_before_decoding() {
        let limits = ImageLimits::default();
        let err = check_header(60_000, 60_000, 60_000 * 60_000 * 4, &limits).expect_err("a bomb");
        assert!(err.contains("60000×60000"), "{err}");
        assert!(check_header(4032, 3024, 4032 * 3024 * 3, &limits).is_ok());
        assert!(check_header(0, 10, 0, &limits).is_err());
        assert!(process(b"GIF89a....", &limits).is_err_and(|e| e.contains("neither")));
        // SOI, an APP0 of 4 bytes, SOS with scan data (a stuffed 0xFF and a
        // restart marker in it), EOI; then cut short.
        let whole = [
            0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x04, 0x01, 0x02, 0xFF, 0xDA, 0x00, 0x02, 0x11, 0xFF, 0x00, 0x22, 0xFF, 0xD0,
            0x33, 0xFF, 0xD9,
        ];
        assert!(jpeg_is_whole(&whole).is_ok());
        assert!(jpeg_is_whole(&[&whole[..], b"trailing video"].concat()).is_ok());
        for end in 3..whole.len() - 1 {
            assert!(jpeg_is_whole(&whole[..end]).is_err(), "cut at {end}");
        }
    }
}
