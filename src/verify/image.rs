//! Images as model inputs: JPEG, PNG, BMP and WebP files decoded one at a time and
//! preprocessed the way torchvision's transforms do.
//!
//! Per image: decode; convert to the model's channel count (3: RGB, alpha dropped, gray
//! repeated; 1: luma with ITU-R 601 weights, as PIL's `convert("L")`); resize the shorter side
//! (bilinear with antialiasing when shrinking, as PIL); center crop (offsets rounded half to
//! even, as torchvision's `CenterCrop`); `x * scale`, `(x - mean) / std` per channel; channel
//! order and layout. The [`Preprocess::imagenet`] preset is torchvision's `Resize(256)`,
//! `CenterCrop(224)`, `ToTensor()`, `Normalize(mean, std)`.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};

use image::{DynamicImage, ImageBuffer, Pixel};
use ndarray::{ArrayD, IxDyn};

use super::data::{self, Case};
use super::source::{bad_data, SampleSource};
use crate::error::{Error, Result};
use crate::onnx::{ElemType, Model, TensorData};

/// Order of the color channels the model takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ChannelOrder {
    Rgb,
    Bgr,
}

/// Layout of the image tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    /// `[1, C, H, W]` (PyTorch).
    Nchw,
    /// `[1, H, W, C]` (TensorFlow).
    Nhwc,
}

/// Named preprocessing settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PreprocessPreset {
    /// torchvision's ImageNet evaluation transform: Resize(256) (shorter side, bilinear),
    /// CenterCrop(224), ToTensor (/255), Normalize(mean 0.485,0.456,0.406, std
    /// 0.229,0.224,0.225); RGB, NCHW.
    Imagenet,
}

/// How images become model inputs. Every field left `None` takes the preset's value, else the
/// default: no resize, no crop (the model's declared height and width, reached by resizing the
/// shorter side and center cropping), scale 1/255, mean 0, std 1, RGB, the layout the model's
/// declared shape shows (NCHW when it does not tell).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Preprocess {
    pub preset: Option<PreprocessPreset>,
    /// Resize so the shorter side has this many pixels (aspect ratio kept).
    pub resize: Option<usize>,
    /// Center crop to (height, width).
    pub crop: Option<(usize, usize)>,
    /// Multiplies the 0..255 pixel values.
    pub scale: Option<f64>,
    /// Subtracted per channel after scaling, in the model's channel order (1 or C values).
    pub mean: Option<Vec<f32>>,
    /// Divides per channel after the mean, in the model's channel order (1 or C values).
    pub std: Option<Vec<f32>>,
    pub channel_order: Option<ChannelOrder>,
    pub layout: Option<Layout>,
}

/// The largest `--resize` or `--crop` side accepted.
pub const MAX_IMAGE_SIDE: usize = 1 << 14;

/// The largest image file read (bytes).
const MAX_IMAGE_FILE: u64 = 1 << 28;

impl Preprocess {
    /// The ImageNet preset with every field set.
    pub fn imagenet() -> Preprocess {
        Preprocess {
            preset: Some(PreprocessPreset::Imagenet),
            resize: Some(256),
            crop: Some((224, 224)),
            scale: Some(1.0 / 255.0),
            mean: Some(vec![0.485, 0.456, 0.406]),
            std: Some(vec![0.229, 0.224, 0.225]),
            channel_order: Some(ChannelOrder::Rgb),
            layout: Some(Layout::Nchw),
        }
    }

    /// True when nothing is set (images then take the model's declared size).
    pub fn is_unset(&self) -> bool {
        *self == Preprocess::default()
    }

    /// The preset's fields under the explicit ones. A preset's mean and std are in RGB
    /// order; with an explicit BGR order they are reversed to follow it.
    pub fn effective(&self) -> Preprocess {
        let Some(preset) = self.preset else {
            return self.clone();
        };
        let base = match preset {
            PreprocessPreset::Imagenet => Preprocess::imagenet(),
        };
        let bgr = self.channel_order == Some(ChannelOrder::Bgr);
        let flip = |v: Option<Vec<f32>>| {
            v.map(|mut v| {
                if bgr {
                    v.reverse();
                }
                v
            })
        };
        Preprocess {
            preset: Some(preset),
            resize: self.resize.or(base.resize),
            crop: self.crop.or(base.crop),
            scale: self.scale.or(base.scale),
            mean: self.mean.clone().or_else(|| flip(base.mean)),
            std: self.std.clone().or_else(|| flip(base.std)),
            channel_order: self.channel_order.or(base.channel_order),
            layout: self.layout.or(base.layout),
        }
    }
}

/// Parses `--crop`: `N` (square) or `HxW`.
pub fn parse_crop(s: &str) -> std::result::Result<(usize, usize), String> {
    let side = |v: &str| -> std::result::Result<usize, String> {
        match v.trim().parse::<usize>() {
            Ok(n) if (1..=MAX_IMAGE_SIDE).contains(&n) => Ok(n),
            _ => Err(format!(
                "'{s}': expected N or HxW with sides from 1 to {MAX_IMAGE_SIDE}"
            )),
        }
    };
    match s.split_once(['x', 'X']) {
        Some((h, w)) => Ok((side(h)?, side(w)?)),
        None => side(s).map(|n| (n, n)),
    }
}

/// Parses `--resize`: a side from 1 to [`MAX_IMAGE_SIDE`].
pub fn parse_side(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_IMAGE_SIDE).contains(&n) => Ok(n),
        _ => Err(format!("'{s}': expected a side from 1 to {MAX_IMAGE_SIDE}")),
    }
}

/// Parses `--scale`: a number or a fraction (`1/255`).
pub fn parse_scale(s: &str) -> std::result::Result<f64, String> {
    let num = |v: &str| v.trim().parse::<f64>().ok().filter(|x| x.is_finite());
    let v = match s.split_once('/') {
        Some((a, b)) => num(a).zip(num(b)).map(|(a, b)| a / b),
        None => num(s),
    };
    v.filter(|x| x.is_finite() && *x != 0.0)
        .ok_or_else(|| format!("'{s}': expected a non-zero number or a fraction such as 1/255"))
}

/// Whether a file extension (lower case) is an image qfold decodes.
pub fn is_image_extension(ext: &str) -> bool {
    matches!(ext, "jpg" | "jpeg" | "png" | "bmp" | "webp")
}

/// What every image of a data set becomes: resolved from [`Preprocess`] and the model input.
#[derive(Debug, Clone)]
struct Plan {
    input: String,
    ty: ElemType,
    channels: usize,
    /// Final (height, width).
    size: (usize, usize),
    resize: Option<usize>,
    /// No size was given: resize to cover `size`, then crop.
    cover: bool,
    scale: f64,
    mean: Vec<f32>,
    std: Vec<f32>,
    bgr: bool,
    layout: Layout,
    /// The input has a leading batch axis of 1.
    batch_axis: bool,
}

impl Plan {
    fn new(model: &Model, what: &str, pre: &Preprocess) -> Result<(Plan, Vec<String>)> {
        let decl = data::declared_inputs(model)?;
        let (input, ty, dims) = match decl.as_slice() {
            [one] => one.clone(),
            _ => {
                return Err(bad_data(
                    what,
                    format!(
                        "images feed a model with a single input; this one has inputs {}: give \
                         .npz files with one array per input instead",
                        decl.iter()
                            .map(|d| format!("'{}'", d.0))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ))
            }
        };
        let bad_input =
            |why: String| bad_data(what, format!("images cannot feed input '{input}': {why}"));
        if !ty.is_float() || ty == ElemType::BF16 {
            return Err(bad_input(format!(
                "it is {}; images become float32, float16 or double tensors",
                ty.name()
            )));
        }
        let shown: Vec<String> = dims
            .iter()
            .map(|d| d.map_or("?".into(), |v| v.to_string()))
            .collect();
        let shown = format!("[{}]", shown.join(", "));
        let batch_axis = match dims.len() {
            4 => true,
            3 => false,
            _ => {
                return Err(bad_input(format!(
                    "it is declared {shown}; images feed [N, C, H, W], [N, H, W, C], [C, H, W] \
                     or [H, W, C] inputs"
                )))
            }
        };
        if batch_axis && dims[0].is_some_and(|b| b != 1) {
            return Err(bad_input(format!(
                "it is declared {shown}, a fixed batch of {}; images feed one at a time \
                 (batch 1 or symbolic)",
                dims[0].unwrap_or(0)
            )));
        }
        let pre = pre.effective();
        let chw = &dims[dims.len() - 3..];
        let channel_like = |d: Option<usize>| matches!(d, Some(1) | Some(3));
        let layout = pre
            .layout
            .unwrap_or(if !channel_like(chw[0]) && channel_like(chw[2]) {
                Layout::Nhwc
            } else {
                Layout::Nchw
            });
        let (c, h, w) = match layout {
            Layout::Nchw => (chw[0], chw[1], chw[2]),
            Layout::Nhwc => (chw[2], chw[0], chw[1]),
        };
        let mut notes = Vec::new();
        let channels = match c {
            Some(1) => 1,
            Some(3) => 3,
            None => {
                notes.push(format!(
                    "{what}: input '{input}' ({shown}) does not fix its channel count: images \
                     are fed with 3 (RGB)"
                ));
                3
            }
            Some(other) => {
                return Err(bad_input(format!(
                    "it is declared {shown}, {other} channels in {layout:?} layout; images give \
                     1 or 3 channels (is --layout right?)"
                )))
            }
        };
        let model_size = h.zip(w);
        let size = match (pre.crop, model_size) {
            (Some(crop), Some(m)) if crop != m => {
                return Err(bad_input(format!(
                    "it is declared {shown} ({}x{} images), but --crop gives {}x{}: crop to the \
                     model's size",
                    m.0, m.1, crop.0, crop.1
                )))
            }
            (Some(crop), _) => crop,
            (None, Some(m)) => m,
            (None, None) if pre.resize.is_some() => {
                return Err(bad_input(format!(
                    "it is declared {shown}, with no fixed height and width, and --resize alone \
                     leaves images of different sizes: pass --crop N as well"
                )))
            }
            (None, None) => {
                return Err(bad_input(format!(
                    "it is declared {shown}, with no fixed height and width: pass --preprocess \
                     imagenet, or --resize N and --crop N, to say what size images are fed at"
                )))
            }
        };
        let per_channel = |v: Option<Vec<f32>>, default: f32, flag: &str| -> Result<Vec<f32>> {
            match v {
                None => Ok(vec![default; channels]),
                Some(v) if v.len() == channels => Ok(v),
                Some(v) if v.len() == 1 => Ok(vec![v[0]; channels]),
                Some(v) => Err(bad_input(format!(
                    "--{flag} gives {} values; the model takes {channels} channel{}",
                    v.len(),
                    if channels == 1 { "" } else { "s" }
                ))),
            }
        };
        let mean = per_channel(pre.mean.clone(), 0.0, "mean")?;
        let std = per_channel(pre.std.clone(), 1.0, "std")?;
        if let Some(s) = std.iter().find(|s| !(s.is_finite() && **s != 0.0)) {
            return Err(bad_input(format!("--std {s}: every std must be non-zero")));
        }
        if mean.iter().any(|m| !m.is_finite()) {
            return Err(bad_input("--mean: every mean must be finite".into()));
        }
        let plan = Plan {
            input,
            ty,
            channels,
            size,
            resize: pre.resize,
            cover: pre.resize.is_none() && pre.crop.is_none(),
            scale: pre.scale.unwrap_or(1.0 / 255.0),
            mean,
            std,
            bgr: pre.channel_order == Some(ChannelOrder::Bgr),
            layout,
            batch_axis,
        };
        Ok((plan, notes))
    }

    /// What the plan does, for the notes.
    fn describe(&self) -> String {
        let mut steps = Vec::new();
        if let Some(r) = self.resize {
            steps.push(format!("resize shorter side to {r} (bilinear)"));
        }
        if self.cover {
            steps.push(format!(
                "resize shorter side to cover {}x{} (bilinear) when the size differs",
                self.size.0, self.size.1
            ));
        }
        steps.push(format!("center crop {}x{}", self.size.0, self.size.1));
        steps.push(format!("x{}", self.scale));
        if self.mean.iter().any(|&m| m != 0.0) || self.std.iter().any(|&s| s != 1.0) {
            steps.push(format!("mean {:?}, std {:?}", self.mean, self.std));
        }
        steps.push(
            match (self.channels, self.bgr) {
                (1, _) => "gray",
                (_, true) => "BGR",
                _ => "RGB",
            }
            .into(),
        );
        steps.push(format!("{:?}", self.layout).to_uppercase());
        let shape = self.shape();
        format!(
            "fed to input '{}' as {shape:?} {}: {}",
            self.input,
            self.ty.name(),
            steps.join(", ")
        )
    }

    fn shape(&self) -> Vec<usize> {
        let (h, w) = self.size;
        let c = self.channels;
        let mut s = match self.layout {
            Layout::Nchw => vec![c, h, w],
            Layout::Nhwc => vec![h, w, c],
        };
        if self.batch_axis {
            s.insert(0, 1);
        }
        s
    }
}

/// Images read and preprocessed one at a time.
pub(crate) struct ImageSource {
    files: Vec<PathBuf>,
    labels: Option<Vec<i64>>,
    root: PathBuf,
    plan: Plan,
    notes: Vec<String>,
    /// Per image, what was done to it beyond the plan ([`GRAY_TO_RGB`]...), counted once per
    /// image however often it is read.
    changes: Vec<AtomicU8>,
}

const GRAY_TO_RGB: u8 = 1;
const ALPHA_DROPPED: u8 = 2;
const COLOR_TO_GRAY: u8 = 4;
const RESIZED_TO_FIT: u8 = 8;

impl ImageSource {
    /// `files` (sorted, each inside `root`), labelled by `labels` when given; `what` names the
    /// data set in messages; `notes` are passed on.
    pub(crate) fn open(
        model: &Model,
        what: &str,
        files: Vec<PathBuf>,
        labels: Option<Vec<i64>>,
        root: PathBuf,
        pre: &Preprocess,
        mut notes: Vec<String>,
    ) -> Result<ImageSource> {
        let (plan, plan_notes) = Plan::new(model, what, pre)?;
        notes.extend(plan_notes);
        notes.push(format!(
            "{what}: {} images {}",
            files.len(),
            plan.describe()
        ));
        for f in &files {
            crate::files::confined(&root, f).map_err(Error::Usage)?;
        }
        let changes = files.iter().map(|_| AtomicU8::new(0)).collect();
        Ok(ImageSource {
            files,
            labels,
            root,
            plan,
            notes,
            changes,
        })
    }

    fn load(&self, path: &Path, changes: &AtomicU8) -> Result<TensorData> {
        let mark = |c: u8| {
            changes.fetch_or(c, Ordering::Relaxed);
        };
        let what = path.display().to_string();
        crate::files::confined(&self.root, path).map_err(Error::Usage)?;
        let bytes = crate::files::read_regular(path, MAX_IMAGE_FILE)?;
        let mut reader = image::ImageReader::new(std::io::Cursor::new(&bytes))
            .with_guessed_format()
            .map_err(|e| bad_data(&what, e))?;
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(1 << 15);
        limits.max_image_height = Some(1 << 15);
        limits.max_alloc = Some(1 << 30);
        reader.limits(limits);
        let img = reader.decode().map_err(|e| {
            bad_data(
                &what,
                format!(
                    "cannot decode this image ({e}); re-save it as PNG or JPEG, or remove it \
                     from the folder"
                ),
            )
        })?;
        let p = &self.plan;
        let raw = if p.channels == 3 {
            if !img.color().has_color() {
                mark(GRAY_TO_RGB);
            } else if img.color().has_alpha() {
                mark(ALPHA_DROPPED);
            }
            self.fit(&what, img.to_rgb8(), mark)?.into_raw()
        } else {
            let gray = luma601(&img, || mark(COLOR_TO_GRAY));
            self.fit(&what, gray, mark)?.into_raw()
        };
        Ok(self.tensor(&raw))
    }

    /// Resizes and center crops to the plan's size.
    fn fit<P: Pixel<Subpixel = u8> + 'static>(
        &self,
        what: &str,
        img: ImageBuffer<P, Vec<u8>>,
        mark: impl Fn(u8),
    ) -> Result<ImageBuffer<P, Vec<u8>>> {
        let p = &self.plan;
        let (th, tw) = p.size;
        let (w, h) = (img.width() as usize, img.height() as usize);
        let target = match (p.resize, p.cover) {
            (Some(n), _) => Some(shorter_side(w, h, n)),
            (None, true) if (w, h) != (tw, th) => {
                mark(RESIZED_TO_FIT);
                let s = (th as f64 / h as f64).max(tw as f64 / w as f64);
                let nw = ((w as f64 * s).round() as usize).max(tw);
                let nh = ((h as f64 * s).round() as usize).max(th);
                Some((nw, nh))
            }
            _ => None,
        };
        let img = match target {
            Some((nw, nh)) if (nw, nh) != (w, h) => image::imageops::resize(
                &img,
                nw as u32,
                nh as u32,
                image::imageops::FilterType::Triangle,
            ),
            _ => img,
        };
        let (w, h) = (img.width() as usize, img.height() as usize);
        if w < tw || h < th {
            return Err(bad_data(
                what,
                format!(
                    "the image is {w}x{h} (width x height){}, smaller than the {tw}x{th} the \
                     model takes: pass --resize N with N at least {}",
                    if target.is_some() {
                        " after resizing"
                    } else {
                        ""
                    },
                    th.max(tw)
                ),
            ));
        }
        if (w, h) == (tw, th) {
            return Ok(img);
        }
        let top = round_half_even_half(h - th);
        let left = round_half_even_half(w - tw);
        Ok(
            image::imageops::crop_imm(&img, left as u32, top as u32, tw as u32, th as u32)
                .to_image(),
        )
    }

    /// The tensor of an interleaved `raw` image of the plan's size.
    fn tensor(&self, raw: &[u8]) -> TensorData {
        let p = &self.plan;
        let (h, w) = p.size;
        let c = p.channels;
        let mut out = vec![0f32; c * h * w];
        for y in 0..h {
            for x in 0..w {
                let px = &raw[(y * w + x) * c..(y * w + x + 1) * c];
                for ch in 0..c {
                    let src = if p.bgr { c - 1 - ch } else { ch };
                    // in f64, so x/255 comes out as the correctly rounded f32 ToTensor gives
                    let v =
                        ((px[src] as f64 * p.scale - p.mean[ch] as f64) / p.std[ch] as f64) as f32;
                    let at = match p.layout {
                        Layout::Nchw => (ch * h + y) * w + x,
                        Layout::Nhwc => (y * w + x) * c + ch,
                    };
                    out[at] = v;
                }
            }
        }
        let a = match ArrayD::from_shape_vec(IxDyn(&p.shape()), out) {
            Ok(a) => a,
            Err(_) => unreachable!("c * h * w elements"),
        };
        match p.ty {
            ElemType::F32 => TensorData::F32(a),
            ElemType::F16 => TensorData::F16(a.mapv(half::f16::from_f32)),
            _ => TensorData::F64(a.mapv(f64::from)),
        }
    }
}

/// (width, height) with the shorter side `n` and the longer scaled to keep the aspect ratio
/// (truncated, as torchvision's `Resize(n)`).
fn shorter_side(w: usize, h: usize, n: usize) -> (usize, usize) {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = ((n as f64 * long as f64 / short.max(1) as f64) as usize).max(1);
    if w <= h {
        (n, new_long)
    } else {
        (new_long, n)
    }
}

/// `round(d / 2)` with Python's rounding (half to even), as torchvision's `CenterCrop`.
fn round_half_even_half(d: usize) -> usize {
    let q = d / 2;
    if d % 2 == 1 && q % 2 == 1 {
        q + 1
    } else {
        q
    }
}

/// The image as 8-bit gray: luma with ITU-R 601 weights as PIL's `convert("L")`;
/// `converted` is called when the image had color.
fn luma601(img: &DynamicImage, converted: impl FnOnce()) -> image::GrayImage {
    if !img.color().has_color() {
        return img.to_luma8();
    }
    converted();
    let rgb = img.to_rgb8();
    let mut out = image::GrayImage::new(rgb.width(), rgb.height());
    for (o, p) in out.pixels_mut().zip(rgb.pixels()) {
        let [r, g, b] = p.0;
        let l = (r as u32 * 299 + g as u32 * 587 + b as u32 * 114 + 500) / 1000;
        o.0 = [l as u8];
    }
    out
}

impl SampleSource for ImageSource {
    fn len(&self) -> usize {
        self.files.len()
    }

    fn read(&self, k: usize) -> Result<Cow<'_, Case>> {
        let path = self.files.get(k).ok_or_else(|| {
            Error::Usage(format!(
                "image {k} asked of a data set of {} images",
                self.files.len()
            ))
        })?;
        let t = self.load(path, &self.changes[k])?;
        Ok(Cow::Owned(Case {
            source: path.display().to_string(),
            inputs: vec![(self.plan.input.clone(), t)],
            expected: vec![],
            labels: self
                .labels
                .as_ref()
                .and_then(|l| l.get(k))
                .map(|&l| vec![l]),
        }))
    }

    fn notes(&self) -> Vec<String> {
        let mut n = self.notes.clone();
        let total = self.files.len();
        let mut count = |bit: u8, what: &str| {
            let c = self
                .changes
                .iter()
                .filter(|c| c.load(Ordering::Relaxed) & bit != 0)
                .count();
            if c > 0 {
                n.push(format!("{c} of {total} images {what}"));
            }
        };
        count(
            GRAY_TO_RGB,
            "were grayscale: converted to 3 channels (RGB) as the model takes",
        );
        count(
            ALPHA_DROPPED,
            "had an alpha channel: dropped (RGB) as the model takes 3 channels",
        );
        count(
            COLOR_TO_GRAY,
            "were in color: converted to 1 channel (luma, ITU-R 601) as the model takes",
        );
        count(
            RESIZED_TO_FIT,
            "were resized (shorter side) and center-cropped to the model's size (no --resize \
             or --crop given)",
        );
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torchvision_sizes() {
        // Resize(256) of a 500x375 (w x h) image: 341x256; CenterCrop offsets round half even.
        assert_eq!(shorter_side(500, 375, 256), (341, 256));
        assert_eq!(shorter_side(375, 500, 256), (256, 341));
        assert_eq!(round_half_even_half(117), 58); // 58.5 -> 58
        assert_eq!(round_half_even_half(69), 34); // 34.5 -> 34
        assert_eq!(round_half_even_half(71), 36); // 35.5 -> 36
        assert_eq!(round_half_even_half(32), 16);
    }

    #[test]
    fn flags_parse() {
        assert_eq!(parse_crop("224"), Ok((224, 224)));
        assert_eq!(parse_crop("200x300"), Ok((200, 300)));
        assert!(parse_crop("0").is_err());
        assert!(parse_crop("a").is_err());
        assert_eq!(parse_scale("1/255"), Ok(1.0 / 255.0));
        assert_eq!(parse_scale("0.5"), Ok(0.5));
        assert!(parse_scale("1/0").is_err());
        assert!(parse_scale("0").is_err());
    }

    #[test]
    fn preset_fields_yield_to_explicit_ones() {
        let p = Preprocess {
            preset: Some(PreprocessPreset::Imagenet),
            crop: Some((200, 200)),
            channel_order: Some(ChannelOrder::Bgr),
            ..Default::default()
        }
        .effective();
        assert_eq!(p.resize, Some(256));
        assert_eq!(p.crop, Some((200, 200)));
        assert_eq!(p.mean, Some(vec![0.406, 0.456, 0.485]));
        assert_eq!(p.std, Some(vec![0.225, 0.224, 0.229]));
    }
}
