//! Test images, made here with the image crate's encoders: a JPEG with an
//! EXIF block spliced in by hand (APP1 `Exif\0\0` + a tiny TIFF with
//! `DateTimeOriginal`, `OffsetTimeOriginal`, `Orientation` and a GPS IFD),
//! a PNG, a decompression bomb and truncated files.

#![allow(dead_code)]

use std::io::Cursor;

use image::{ImageFormat, RgbImage, RgbaImage};

/// The EXIF block's `DateTimeOriginal` with its offset: 2021-07-14
/// 09:30:05 +02:00, as seconds since the Unix epoch.
pub const TAKEN_SECONDS: i64 = 1_626_247_805;

/// The EXIF orientation spliced in: 6, a quarter turn clockwise.
pub const ORIENTATION: u32 = 6;

/// The numerator of the GPS latitude's first rational: bytes that must
/// appear nowhere Lightbox stores anything.
pub const GPS_MARKER: u32 = 0x5EC1_2E75;

/// A `width`×`height` JPEG of a gradient, no metadata.
pub fn jpeg(width: u32, height: u32) -> Vec<u8> {
    let image = RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, 128])
    });
    let mut out = Cursor::new(Vec::new());
    image
        .write_to(&mut out, ImageFormat::Jpeg)
        .unwrap_or_else(|err| panic!("cannot encode a JPEG: {err}"));
    out.into_inner()
}

/// A `width`×`height` PNG with transparency.
pub fn png(width: u32, height: u32) -> Vec<u8> {
    let image = RgbaImage::from_fn(width, height, |x, y| {
        image::Rgba([(x % 256) as u8, 64, (y % 256) as u8, 200])
    });
    let mut out = Cursor::new(Vec::new());
    image
        .write_to(&mut out, ImageFormat::Png)
        .unwrap_or_else(|err| panic!("cannot encode a PNG: {err}"));
    out.into_inner()
}

/// `jpeg` with an APP1 EXIF segment right after its SOI marker.
pub fn with_exif(jpeg: &[u8], tiff: &[u8]) -> Vec<u8> {
    assert_eq!(&jpeg[..2], &[0xFF, 0xD8], "a JPEG starts with SOI");
    let length = u16::try_from(2 + 6 + tiff.len()).expect("a small EXIF block");
    let mut out = jpeg[..2].to_vec();
    out.extend([0xFF, 0xE1]);
    out.extend(length.to_be_bytes());
    out.extend(b"Exif\0\0");
    out.extend(tiff);
    out.extend(&jpeg[2..]);
    out
}

/// One IFD entry: tag, type (1 BYTE, 2 ASCII, 3 SHORT, 4 LONG, 5
/// RATIONAL), count, and its value's bytes (little-endian).
struct Entry(u16, u16, u32, Vec<u8>);

/// An IFD placed at offset `at` of the TIFF, its values longer than four
/// bytes right after it.
fn ifd(entries: &[Entry], at: u32) -> Vec<u8> {
    let count = u32::try_from(entries.len()).expect("few entries");
    let data_start = at + 2 + 12 * count + 4;
    let (mut out, mut data) = (Vec::new(), Vec::new());
    out.extend(u16::try_from(count).expect("few entries").to_le_bytes());
    for Entry(tag, kind, n, value) in entries {
        out.extend(tag.to_le_bytes());
        out.extend(kind.to_le_bytes());
        out.extend(n.to_le_bytes());
        if value.len() <= 4 {
            let mut inline = value.clone();
            inline.resize(4, 0);
            out.extend(inline);
        } else {
            let offset = data_start + u32::try_from(data.len()).expect("small");
            out.extend(offset.to_le_bytes());
            data.extend(value);
            if data.len() % 2 == 1 {
                data.push(0);
            }
        }
    }
    out.extend(0u32.to_le_bytes());
    out.extend(data);
    out
}

/// A little-endian TIFF: IFD0 with `Orientation` 6 and the pointers to an
/// Exif IFD (`DateTimeOriginal`, `OffsetTimeOriginal`) and a GPS IFD
/// (version, latitude reference and latitude).
pub fn exif_tiff() -> Vec<u8> {
    let ifd0_len = 2 + 12 * 3 + 4;
    let exif_at = 8 + ifd0_len;
    let exif = ifd(
        &[
            Entry(0x9003, 2, 20, b"2021:07:14 09:30:05\0".to_vec()),
            Entry(0x9011, 2, 7, b"+02:00\0".to_vec()),
        ],
        exif_at,
    );
    let gps_at = exif_at + u32::try_from(exif.len()).expect("small");
    let mut latitude = Vec::new();
    for (numerator, denominator) in [(GPS_MARKER, 1u32 << 26), (51, 1), (2999, 100)] {
        latitude.extend(numerator.to_le_bytes());
        latitude.extend(denominator.to_le_bytes());
    }
    let gps = ifd(
        &[
            Entry(0x0000, 1, 4, vec![2, 3, 0, 0]),
            Entry(0x0001, 2, 2, b"N\0".to_vec()),
            Entry(0x0002, 5, 3, latitude),
        ],
        gps_at,
    );
    let ifd0 = ifd(
        &[
            Entry(
                0x0112,
                3,
                1,
                u16::try_from(ORIENTATION).expect("small").to_le_bytes().to_vec(),
            ),
            Entry(0x8769, 4, 1, exif_at.to_le_bytes().to_vec()),
            Entry(0x8825, 4, 1, gps_at.to_le_bytes().to_vec()),
        ],
        8,
    );
    let mut tiff = b"II\x2a\x00".to_vec();
    tiff.extend(8u32.to_le_bytes());
    tiff.extend(ifd0);
    tiff.extend(exif);
    tiff.extend(gps);
    tiff
}

/// A JPEG of `width`×`height` with [`exif_tiff`] spliced in.
pub fn jpeg_with_exif(width: u32, height: u32) -> Vec<u8> {
    with_exif(&jpeg(width, height), &exif_tiff())
}

/// A PNG whose header claims 60000×60000 RGBA pixels (14.4 GB decoded)
/// over a compressed body of a few bytes: a decompression bomb.
pub fn bomb() -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut header = Vec::new();
    header.extend(60_000u32.to_be_bytes());
    header.extend(60_000u32.to_be_bytes());
    // Bit depth 8, colour type 6 (RGBA), deflate, adaptive filter, no interlace.
    header.extend([8, 6, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &header);
    // A zlib stream of nothing: what a real bomb would inflate is beside the point.
    chunk(&mut out, b"IDAT", &[0x78, 0x9C, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(&mut out, b"IEND", &[]);
    out
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend(u32::try_from(data.len()).expect("small").to_be_bytes());
    let mut crc = crc32(kind);
    crc = crc32_more(crc, data);
    out.extend(kind);
    out.extend(data);
    out.extend((!crc).to_be_bytes());
}

fn crc32(bytes: &[u8]) -> u32 {
    crc32_more(0xFFFF_FFFF, bytes)
}

fn crc32_more(mut crc: u32, bytes: &[u8]) -> u32 {
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// The first `share` of `bytes` (a file cut short).
pub fn truncated(bytes: &[u8], share: f64) -> Vec<u8> {
    bytes[..((bytes.len() as f64 * share) as usize).max(16)].to_vec()
}

/// `jpeg` grown to at least `size` bytes by APP2 segments of filler
/// (decoders skip them): a large upload that is still a small picture.
pub fn padded(jpeg: &[u8], size: usize) -> Vec<u8> {
    let mut out = jpeg[..2].to_vec();
    while out.len() + jpeg.len() < size {
        let filler = (size - out.len() - jpeg.len()).clamp(1, 65_000);
        out.extend([0xFF, 0xE2]);
        out.extend(u16::try_from(filler + 2).unwrap_or(u16::MAX).to_be_bytes());
        out.extend(std::iter::repeat_n(0x5A, filler));
    }
    out.extend(&jpeg[2..]);
    out
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
