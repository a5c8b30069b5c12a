//! Images: decoding (the `image` crate) and the preprocessing of Hugging Face image
//! processors (`preprocessor_config.json`): RGB conversion, resize, center crop, rescale,
//! normalize.
//!
//! Hugging Face's PIL-based image processors resize 8-bit images with Pillow, so the
//! resize here is Pillow's own algorithm (`libImaging/Resample.c`: separable convolution,
//! horizontal pass first, 22-bit fixed-point coefficients, each pass rounded to 8 bits);
//! the pixel values then match `transformers`' to float precision.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// Formats this build decodes.
pub const SUPPORTED_FORMATS: &str = "PNG, JPEG, GIF, BMP, WebP";

/// Decoded pixels: 8 bits a channel, rows top to bottom, channels interleaved (HWC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pixels {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA).
    pub channels: usize,
    /// `width * height * channels` bytes.
    pub data: Vec<u8>,
}

impl Pixels {
    /// Checks the sizes; `what` names the image in errors.
    pub fn new(width: usize, height: usize, channels: usize, data: Vec<u8>) -> Result<Self> {
        if !(1..=4).contains(&channels) {
            return Err(Error::InvalidArgument(format!(
                "an image has 1 to 4 channels (gray, gray+alpha, RGB, RGBA), not {channels}"
            )));
        }
        if width == 0 || height == 0 {
            return Err(Error::InvalidArgument(format!(
                "the image is {width}x{height}: it has no pixels"
            )));
        }
        let want = width
            .checked_mul(height)
            .and_then(|n| n.checked_mul(channels))
            .ok_or_else(|| Error::InvalidArgument("the image is too large".into()))?;
        if data.len() != want {
            return Err(Error::InvalidArgument(format!(
                "a {width}x{height} image with {channels} channels has {want} bytes, not {}",
                data.len()
            )));
        }
        Ok(Self {
            width,
            height,
            channels,
            data,
        })
    }

    /// The image in RGB as `transformers`' `convert_to_rgb` makes it (Pillow's
    /// `convert("RGB")`): gray is replicated, alpha is dropped.
    pub fn to_rgb(&self) -> Pixels {
        if self.channels == 3 {
            return self.clone();
        }
        let mut out = Vec::with_capacity(self.width * self.height * 3);
        for px in self.data.chunks_exact(self.channels) {
            match self.channels {
                1 | 2 => out.extend_from_slice(&[px[0]; 3]),
                _ => out.extend_from_slice(&px[..3]),
            }
        }
        Pixels {
            width: self.width,
            height: self.height,
            channels: 3,
            data: out,
        }
    }
}

/// Decodes an image file; `what` names it in errors.
pub fn decode_file(path: &Path) -> Result<Pixels> {
    let bytes = std::fs::read(path).map_err(|e| Error::FileAccess {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    decode(&bytes, &path.display().to_string())
}

/// Decodes an encoded image (PNG, JPEG, GIF, BMP or WebP; a GIF's first frame); `what`
/// names it in errors. 16-bit images are reduced to 8 bits.
pub fn decode(bytes: &[u8], what: &str) -> Result<Pixels> {
    use image::{DynamicImage, ImageFormat, ImageReader, Limits};
    let bad = |message: String| Error::InvalidMedia {
        what: what.to_string(),
        message,
    };
    let format = image::guess_format(bytes).map_err(|_| {
        bad(format!(
            "not an image in a supported format ({SUPPORTED_FORMATS})"
        ))
    })?;
    if !matches!(
        format,
        ImageFormat::Png
            | ImageFormat::Jpeg
            | ImageFormat::Gif
            | ImageFormat::Bmp
            | ImageFormat::WebP
    ) {
        return Err(bad(format!(
            "{} images are not supported (supported: {SUPPORTED_FORMATS})",
            format
                .extensions_str()
                .first()
                .copied()
                .unwrap_or("these")
                .to_uppercase()
        )));
    }
    let mut reader = ImageReader::with_format(std::io::Cursor::new(bytes), format);
    let mut limits = Limits::default();
    limits.max_image_width = Some(1 << 15);
    limits.max_image_height = Some(1 << 15);
    limits.max_alloc = Some(1 << 30);
    reader.limits(limits);
    let image = reader
        .decode()
        .map_err(|e| bad(format!("cannot decode the {format:?} image: {e}")))?;
    let (width, height) = (image.width() as usize, image.height() as usize);
    let (channels, data) = match image {
        DynamicImage::ImageLuma8(b) => (1, b.into_raw()),
        DynamicImage::ImageLumaA8(b) => (2, b.into_raw()),
        DynamicImage::ImageRgb8(b) => (3, b.into_raw()),
        DynamicImage::ImageRgba8(b) => (4, b.into_raw()),
        other if other.color().has_alpha() => (4, other.to_rgba8().into_raw()),
        other if other.color().has_color() => (3, other.to_rgb8().into_raw()),
        other => (1, other.to_luma8().into_raw()),
    };
    Pixels::new(width, height, channels, data)
}

/// Pillow's resampling filters, by their numbers (`PIL.Image.Resampling`), as
/// `preprocessor_config.json`'s `resample` gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    /// 0
    Nearest,
    /// 1
    Lanczos,
    /// 2
    Bilinear,
    /// 3
    Bicubic,
    /// 4
    Box,
    /// 5
    Hamming,
}

impl Resample {
    fn from_pil(n: i64) -> Result<Self> {
        Ok(match n {
            0 => Self::Nearest,
            1 => Self::Lanczos,
            2 => Self::Bilinear,
            3 => Self::Bicubic,
            4 => Self::Box,
            5 => Self::Hamming,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "preprocessor config: resample {n} is not one of Pillow's filters (0-5)"
                )))
            }
        })
    }

    fn support(self) -> f64 {
        match self {
            Self::Nearest | Self::Box => 0.5,
            Self::Bilinear | Self::Hamming => 1.0,
            Self::Bicubic => 2.0,
            Self::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let sinc = |x: f64| {
            if x == 0.0 {
                1.0
            } else {
                let x = x * std::f64::consts::PI;
                x.sin() / x
            }
        };
        match self {
            Self::Nearest | Self::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Self::Bilinear => (1.0 - x.abs()).max(0.0),
            Self::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let xp = x * std::f64::consts::PI;
                    xp.sin() / xp * (0.54 + 0.46 * xp.cos())
                }
            }
            Self::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Self::Lanczos => {
                if -3.0 < x && x < 3.0 {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// One axis of a Pillow resize: for each output index, the first input index and the
/// fixed-point weights.
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    weights: Vec<i32>,
}

fn coeffs(in_size: usize, out_size: usize, filter: Resample) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) truncates toward zero; negative values clamp to 0 either way.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut ww = 0.0;
        for (x, slot) in k.iter_mut().enumerate().take(xmax) {
            let w = filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss);
            *slot = w;
            ww += w;
        }
        for x in 0..xmax {
            let w = if ww != 0.0 { k[x] / ww } else { k[x] };
            let scaled = w * (1u32 << PRECISION_BITS) as f64;
            weights[xx * ksize + x] = if w < 0.0 {
                (scaled - 0.5) as i32
            } else {
                (scaled + 0.5) as i32
            };
        }
        bounds.push((xmin, xmax));
    }
    Coeffs {
        bounds,
        ksize,
        weights,
    }
}

fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes an RGB image as Pillow's `Image.resize(size, resample)` (no `reducing_gap`).
pub fn resize(src: &Pixels, width: usize, height: usize, filter: Resample) -> Pixels {
    assert_eq!(src.channels, 3, "resize takes RGB");
    if filter == Resample::Nearest {
        return resize_nearest(src, width, height);
    }
    let mut cur = src.clone();
    if width != cur.width {
        let c = coeffs(cur.width, width, filter);
        let mut out = vec![0u8; width * cur.height * 3];
        for y in 0..cur.height {
            let row = &cur.data[y * cur.width * 3..(y + 1) * cur.width * 3];
            for (xx, &(xmin, xmax)) in c.bounds.iter().enumerate() {
                let k = &c.weights[xx * c.ksize..xx * c.ksize + xmax];
                let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
                for (x, &w) in k.iter().enumerate() {
                    let p = &row[(x + xmin) * 3..(x + xmin) * 3 + 3];
                    for (s, &v) in ss.iter_mut().zip(p) {
                        *s = s.wrapping_add(v as i32 * w);
                    }
                }
                let o = (y * width + xx) * 3;
                for (dst, &s) in out[o..o + 3].iter_mut().zip(&ss) {
                    *dst = clip8(s);
                }
            }
        }
        cur = Pixels {
            width,
            height: cur.height,
            channels: 3,
            data: out,
        };
    }
    if height != cur.height {
        let c = coeffs(cur.height, height, filter);
        let mut out = vec![0u8; cur.width * height * 3];
        for (yy, &(ymin, ymax)) in c.bounds.iter().enumerate() {
            let k = &c.weights[yy * c.ksize..yy * c.ksize + ymax];
            for xx in 0..cur.width {
                let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
                for (y, &w) in k.iter().enumerate() {
                    let p = ((y + ymin) * cur.width + xx) * 3;
                    for (s, &v) in ss.iter_mut().zip(&cur.data[p..p + 3]) {
                        *s = s.wrapping_add(v as i32 * w);
                    }
                }
                let o = (yy * cur.width + xx) * 3;
                for (dst, &s) in out[o..o + 3].iter_mut().zip(&ss) {
                    *dst = clip8(s);
                }
            }
        }
        cur = Pixels {
            width: cur.width,
            height,
            channels: 3,
            data: out,
        };
    }
    cur
}

/// Pillow's nearest-neighbour resize: the source pixel under each output pixel's center.
fn resize_nearest(src: &Pixels, width: usize, height: usize) -> Pixels {
    let (sx, sy) = (
        src.width as f64 / width as f64,
        src.height as f64 / height as f64,
    );
    let mut out = Vec::with_capacity(width * height * 3);
    for y in 0..height {
        let yi = (((y as f64 + 0.5) * sy) as usize).min(src.height - 1);
        for x in 0..width {
            let xi = (((x as f64 + 0.5) * sx) as usize).min(src.width - 1);
            let p = (yi * src.width + xi) * 3;
            out.extend_from_slice(&src.data[p..p + 3]);
        }
    }
    Pixels {
        width,
        height,
        channels: 3,
        data: out,
    }
}

/// `transformers`' `center_crop` on an RGB image: the centered window, zero-padded where
/// the image is smaller.
pub fn center_crop(src: &Pixels, width: usize, height: usize) -> Pixels {
    let (ow, oh) = (src.width as i64, src.height as i64);
    let (cw, ch) = (width as i64, height as i64);
    // Python's floor division.
    let top = (oh - ch).div_euclid(2);
    let left = (ow - cw).div_euclid(2);
    let mut out = vec![0u8; width * height * 3];
    for y in 0..ch {
        let sy = top + y;
        if sy < 0 || sy >= oh {
            continue;
        }
        for x in 0..cw {
            let sx = left + x;
            if sx < 0 || sx >= ow {
                continue;
            }
            let s = ((sy * ow + sx) * 3) as usize;
            let o = ((y * cw + x) * 3) as usize;
            out[o..o + 3].copy_from_slice(&src.data[s..s + 3]);
        }
    }
    Pixels {
        width,
        height,
        channels: 3,
        data: out,
    }
}

/// A `size` or `crop_size` entry of `preprocessor_config.json`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum SizeSpec {
    Square(u32),
    Map {
        height: Option<u32>,
        width: Option<u32>,
        shortest_edge: Option<u32>,
        longest_edge: Option<u32>,
    },
}

/// The image-processing part of a Hugging Face `preprocessor_config.json` (CLIP, SigLIP
/// and other PIL-based processors); fields the file leaves out take `transformers`'
/// defaults for `BaseImageProcessor`.
#[derive(Debug, Clone, Deserialize)]
struct RawConfig {
    #[serde(default = "yes")]
    do_resize: bool,
    size: Option<SizeSpec>,
    resample: Option<i64>,
    #[serde(default)]
    do_center_crop: bool,
    crop_size: Option<SizeSpec>,
    #[serde(default = "yes")]
    do_rescale: bool,
    rescale_factor: Option<f64>,
    #[serde(default = "yes")]
    do_normalize: bool,
    image_mean: Option<FloatOrList>,
    image_std: Option<FloatOrList>,
    #[serde(default = "yes")]
    do_convert_rgb: bool,
    image_processor_type: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum FloatOrList {
    One(f32),
    List(Vec<f32>),
}

impl FloatOrList {
    fn channels(&self, name: &str) -> Result<[f32; 3]> {
        match self {
            Self::One(v) => Ok([*v; 3]),
            Self::List(v) if v.len() == 3 => Ok([v[0], v[1], v[2]]),
            Self::List(v) => Err(Error::InvalidArgument(format!(
                "preprocessor config: {name} has {} values; expected 3",
                v.len()
            ))),
        }
    }
}

fn yes() -> bool {
    true
}

/// How the image is resized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resize {
    /// The shorter side becomes this long; the other keeps the aspect (truncated).
    ShortestEdge(usize),
    /// Exactly this size.
    Exact {
        /// Width.
        width: usize,
        /// Height.
        height: usize,
    },
}

/// Image preprocessing as a Hugging Face image processor does it.
#[derive(Debug, Clone, PartialEq)]
pub struct ImagePreprocessor {
    /// Resize, if any.
    pub resize: Option<Resize>,
    /// The resize filter.
    pub resample: Resample,
    /// Center crop to (width, height), if any.
    pub crop: Option<(usize, usize)>,
    /// Multiply by this (1/255), if any.
    pub rescale: Option<f64>,
    /// Subtract the mean and divide by the standard deviation per channel, if any.
    pub normalize: Option<([f32; 3], [f32; 3])>,
}

const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

impl ImagePreprocessor {
    /// Reads `preprocessor_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::FileAccess {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::from_json(&text).map_err(|e| match e {
            Error::InvalidArgument(m) => Error::InvalidArgument(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Parses the text of `preprocessor_config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| {
            Error::InvalidArgument(format!("preprocessor config is not valid: {e}"))
        })?;
        if !raw.do_convert_rgb {
            // Without conversion the processors keep gray images single-channel, which a
            // 3-channel encoder cannot take; EtLlm always converts.
        }
        let size = |spec: &SizeSpec, shortest_ok: bool, name: &str| -> Result<Resize> {
            match *spec {
                SizeSpec::Square(n) => Ok(if shortest_ok {
                    Resize::ShortestEdge(n as usize)
                } else {
                    Resize::Exact {
                        width: n as usize,
                        height: n as usize,
                    }
                }),
                SizeSpec::Map {
                    height: Some(h),
                    width: Some(w),
                    ..
                } => Ok(Resize::Exact {
                    width: w as usize,
                    height: h as usize,
                }),
                SizeSpec::Map {
                    shortest_edge: Some(s),
                    longest_edge: None,
                    ..
                } if shortest_ok => Ok(Resize::ShortestEdge(s as usize)),
                _ => Err(Error::InvalidArgument(format!(
                    "preprocessor config: {name} {spec:?} is not supported (EtLlm takes \
                     {{\"height\", \"width\"}}, {{\"shortest_edge\"}} or a number)"
                ))),
            }
        };
        let resize = match (&raw.size, raw.do_resize) {
            (Some(spec), true) => Some(size(spec, true, "size")?),
            (None, true) => {
                return Err(Error::InvalidArgument(
                    "preprocessor config: do_resize is set but there is no size".into(),
                ))
            }
            (_, false) => None,
        };
        let crop = match (&raw.crop_size, raw.do_center_crop) {
            (Some(spec), true) => match size(spec, false, "crop_size")? {
                Resize::Exact { width, height } => Some((width, height)),
                Resize::ShortestEdge(_) => unreachable!("not allowed for crops"),
            },
            (None, true) => {
                return Err(Error::InvalidArgument(
                    "preprocessor config: do_center_crop is set but there is no crop_size".into(),
                ))
            }
            (_, false) => None,
        };
        for (w, h) in crop.iter().copied().chain(resize.iter().map(|r| match *r {
            Resize::Exact { width, height } => (width, height),
            Resize::ShortestEdge(s) => (s, s),
        })) {
            if w == 0 || h == 0 || w > 1 << 14 || h > 1 << 14 {
                return Err(Error::InvalidArgument(format!(
                    "preprocessor config: a size of {w}x{h} is out of range"
                )));
            }
        }
        let clip = raw
            .image_processor_type
            .as_deref()
            .is_some_and(|t| t.starts_with("CLIP"));
        let normalize = if raw.do_normalize {
            let mean = match &raw.image_mean {
                Some(m) => m.channels("image_mean")?,
                None if clip => CLIP_MEAN,
                None => [0.5; 3],
            };
            let std = match &raw.image_std {
                Some(s) => s.channels("image_std")?,
                None if clip => CLIP_STD,
                None => [0.5; 3],
            };
            if std.contains(&0.0) {
                return Err(Error::InvalidArgument(
                    "preprocessor config: image_std has a zero".into(),
                ));
            }
            Some((mean, std))
        } else {
            None
        };
        Ok(Self {
            resize,
            resample: Resample::from_pil(raw.resample.unwrap_or(2))?,
            crop,
            rescale: raw
                .do_rescale
                .then(|| raw.rescale_factor.unwrap_or(1.0 / 255.0)),
            normalize,
        })
    }

    /// The RGB image after resize and crop, still 8 bits a channel.
    pub fn resize_and_crop(&self, image: &Pixels) -> Pixels {
        let mut rgb = image.to_rgb();
        if let Some(r) = self.resize {
            let (w, h) = match r {
                Resize::Exact { width, height } => (width, height),
                Resize::ShortestEdge(s) => {
                    let (w, h) = (rgb.width, rgb.height);
                    // transformers' get_resize_output_image_size (default_to_square=False).
                    let (short, long) = if w <= h { (w, h) } else { (h, w) };
                    let new_long = (s as f64 * long as f64 / short as f64) as usize;
                    if w <= h {
                        (s, new_long.max(1))
                    } else {
                        (new_long.max(1), s)
                    }
                }
            };
            if (w, h) != (rgb.width, rgb.height) {
                rgb = resize(&rgb, w, h, self.resample);
            }
        }
        if let Some((w, h)) = self.crop {
            if (w, h) != (rgb.width, rgb.height) {
                rgb = center_crop(&rgb, w, h);
            }
        }
        rgb
    }

    /// The pixel values the vision encoder takes: channels first (CHW), `f32`.
    pub fn pixel_values(&self, image: &Pixels) -> (Vec<f32>, usize, usize) {
        let rgb = self.resize_and_crop(image);
        (self.normalized(&rgb), rgb.width, rgb.height)
    }

    /// Rescale and normalize an RGB image into CHW floats, in `transformers`' precision
    /// (rescale in f64 then f32; normalize in f32).
    fn normalized(&self, rgb: &Pixels) -> Vec<f32> {
        let plane = rgb.width * rgb.height;
        let mut out = vec![0f32; plane * 3];
        for (i, px) in rgb.data.chunks_exact(3).enumerate() {
            for ch in 0..3 {
                let mut v = match self.rescale {
                    Some(s) => (px[ch] as f64 * s) as f32,
                    None => px[ch] as f32,
                };
                if let Some((mean, std)) = &self.normalize {
                    v = (v - mean[ch]) / std[ch];
                }
                out[ch * plane + i] = v;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: usize, h: usize) -> Pixels {
        let data = (0..w * h * 3).map(|i| (i * 37 % 251) as u8).collect();
        Pixels::new(w, h, 3, data).unwrap()
    }

    #[test]
    fn resizing_to_the_same_size_changes_nothing() {
        let img = gradient(7, 5);
        assert_eq!(resize(&img, 7, 5, Resample::Bicubic), img);
    }

    #[test]
    fn a_uniform_image_stays_uniform_through_every_filter() {
        let img = Pixels::new(9, 6, 3, [10u8, 128, 250].repeat(54)).unwrap();
        for f in [
            Resample::Bilinear,
            Resample::Bicubic,
            Resample::Lanczos,
            Resample::Box,
            Resample::Hamming,
            Resample::Nearest,
        ] {
            let out = resize(&img, 4, 13, f);
            assert!(out.data.chunks(3).all(|p| p == [10, 128, 250]), "{f:?}");
        }
    }

    #[test]
    fn alpha_is_dropped_and_gray_is_replicated() {
        let img = Pixels::new(2, 1, 4, vec![10, 20, 30, 255, 10, 20, 30, 0]).unwrap();
        assert_eq!(img.to_rgb().data, vec![10, 20, 30, 10, 20, 30]);
        let gray = Pixels::new(1, 1, 2, vec![7, 0]).unwrap();
        assert_eq!(gray.to_rgb().data, vec![7, 7, 7]);
    }

    #[test]
    fn crop_larger_than_the_image_pads_with_zeros() {
        let img = Pixels::new(1, 1, 3, vec![9, 9, 9]).unwrap();
        let out = center_crop(&img, 3, 1);
        assert_eq!(out.data, vec![0, 0, 0, 9, 9, 9, 0, 0, 0]);
    }

    #[test]
    fn pixel_buffers_of_the_wrong_length_are_refused() {
        assert!(Pixels::new(2, 2, 3, vec![0; 11]).is_err());
        assert!(Pixels::new(2, 2, 5, vec![0; 20]).is_err());
        assert!(Pixels::new(0, 2, 3, vec![]).is_err());
    }

    #[test]
    fn a_clip_config_reads_shortest_edge_and_crop() {
        let p = ImagePreprocessor::from_json(
            r#"{"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32},
                "crop_size": {"height": 32, "width": 32}, "do_center_crop": true, "resample": 3}"#,
        )
        .unwrap();
        assert_eq!(p.resize, Some(Resize::ShortestEdge(32)));
        assert_eq!(p.crop, Some((32, 32)));
        assert_eq!(p.resample, Resample::Bicubic);
        assert_eq!(p.normalize, Some((CLIP_MEAN, CLIP_STD)));
    }
}
