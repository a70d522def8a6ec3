//! The image preprocessing flags, shared by the commands that read data sets.

use qfold::verify::image::{parse_crop, parse_scale, parse_side};
use qfold::verify::{ChannelOrder, Layout, Preprocess, PreprocessPreset};

/// How image files (JPEG, PNG, BMP, WebP) become model inputs. Without any of these flags,
/// images are taken at the model's declared height and width (shorter side resized, center
/// cropped), scaled by 1/255, RGB.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "Image preprocessing (for folders or files of images)")]
pub struct PreprocessArgs {
    /// A named preprocessing: imagenet = --resize 256 (shorter side, bilinear) --crop 224
    /// --scale 1/255 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --channel-order rgb
    /// --layout nchw. Flags given as well override its fields.
    #[arg(long, value_enum, ignore_case = true, value_name = "PRESET")]
    preprocess: Option<PreprocessPreset>,
    /// Resize images so their shorter side has N pixels (aspect ratio kept, bilinear).
    #[arg(long, value_name = "N", value_parser = parse_side)]
    resize: Option<usize>,
    /// Center crop to N x N, or H x W (`224` or `224x192`).
    #[arg(long, value_name = "N|HxW", value_parser = parse_crop)]
    crop: Option<(usize, usize)>,
    /// Multiply the 0..255 pixel values by this (default 1/255; `1/255` or `0.5` are accepted).
    #[arg(long, value_name = "X", value_parser = parse_scale)]
    scale: Option<f64>,
    /// Subtract per channel after scaling, in the model's channel order: `0.485,0.456,0.406`.
    #[arg(
        long,
        value_name = "A,B,C",
        value_delimiter = ',',
        allow_hyphen_values = true
    )]
    mean: Option<Vec<f32>>,
    /// Divide per channel after the mean, in the model's channel order: `0.229,0.224,0.225`.
    #[arg(long, value_name = "A,B,C", value_delimiter = ',')]
    std: Option<Vec<f32>>,
    /// Channel order the model takes (default rgb).
    #[arg(long, value_enum, ignore_case = true, value_name = "ORDER")]
    channel_order: Option<ChannelOrder>,
    /// Tensor layout (default: what the model's declared input shape shows, else nchw).
    #[arg(long, value_enum, ignore_case = true, value_name = "LAYOUT")]
    layout: Option<Layout>,
}

impl PreprocessArgs {
    /// The library's preprocessing settings.
    pub fn preprocess(&self) -> Preprocess {
        Preprocess {
            preset: self.preprocess,
            resize: self.resize,
            crop: self.crop,
            scale: self.scale,
            mean: self.mean.clone(),
            std: self.std.clone(),
            channel_order: self.channel_order,
            layout: self.layout,
        }
    }
}
