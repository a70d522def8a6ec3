//! The quantization settings `quantize` and `analyze` share: a preset and its overrides.

use qfold::commands::QuantizeSettings;

#[derive(clap::Args)]
pub struct SettingsArgs {
    /// Named settings (the other options override them).
    #[arg(long, value_enum, ignore_case = true, default_value = "qfold")]
    pub preset: super::PresetArg,
    /// How each activation's range is chosen (default: the preset's).
    #[arg(long, value_enum, ignore_case = true)]
    method: Option<super::MethodArg>,
    /// Percentile for --method percentile, in (50, 100] [default: 99.999].
    #[arg(long)]
    pub percentile: Option<f64>,
    /// Activation type (default: the preset's).
    #[arg(long, value_enum, ignore_case = true)]
    activation: Option<super::QTypeArg>,
    /// Weight type (default: the preset's).
    #[arg(long, value_enum, ignore_case = true)]
    weight: Option<super::QTypeArg>,
    /// Symmetric activations (zero point at the grid's middle; Relu is then kept).
    #[arg(long)]
    symmetric_activations: bool,
    /// Per-channel weight scales.
    #[arg(long, conflicts_with = "per_tensor")]
    per_channel: bool,
    /// One scale per weight tensor.
    #[arg(long)]
    per_tensor: bool,
    /// With per-channel weights, keep per tensor every weight that quantizes per tensor with at
    /// least this SQNR in dB (faster QLinearConv in tract).
    #[arg(long, value_name = "DB", conflicts_with = "per_tensor")]
    per_tensor_min_sqnr: Option<f64>,
    /// 7-bit activations (PyTorch fbgemm's reduce_range).
    #[arg(long)]
    reduce_range: bool,
    /// Leave this node or PyTorch module path float (repeatable).
    #[arg(long, value_name = "NAME")]
    exclude: Vec<String>,
    /// Leave these op types float: `--op-types Gemm,Add` (case-insensitive; a type no node
    /// has is an error).
    #[arg(long, value_name = "A,B")]
    op_types: Option<String>,
    /// Do not fuse before quantizing.
    #[arg(long)]
    no_fuse: bool,
    /// Keep constant subgraphs, Identity and inference Dropout nodes as they are (by default
    /// fusion folds and removes them first).
    #[arg(long)]
    no_constant_folding: bool,
    /// Treat initializers that are also graph inputs as constants (for IR >= 4 they are
    /// defaults a caller may override, so they are not folded otherwise).
    #[arg(long)]
    inputs_as_constants: bool,
    /// Fuse without folding Add / Sub / Mul / Div by constants into the Conv, ConvTranspose,
    /// Gemm or MatMul before them: they stay separate ops, quantized as ONNX Runtime
    /// quantizes them (BatchNormalization still folds). By default quantize makes the folds
    /// unless leaving them out measures better on the calibration samples.
    #[arg(long, conflicts_with = "affine_folding")]
    no_affine_folding: bool,
    /// Make the channel-affine folds without measuring whether leaving them out is better.
    #[arg(long)]
    affine_folding: bool,
    /// Calibration threads (0: every core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Cross-layer equalization (Nagel et al. 2019) before quantizing, with bias correction on
    /// the calibration data (the paper's pipeline): per-tensor weights then lose little against
    /// per-channel (the tract preset does it where it measures better).
    #[arg(long, conflicts_with = "no_equalize")]
    equalize: bool,
    /// No cross-layer equalization, whatever the preset.
    #[arg(long)]
    no_equalize: bool,
    /// Correct each quantized Conv / Gemm bias for the mean output shift its weight
    /// quantization causes, measured on the calibration data.
    #[arg(long, conflicts_with = "no_bias_correction")]
    bias_correction: bool,
    /// No bias correction, not even with --equalize.
    #[arg(long)]
    no_bias_correction: bool,
    /// High-bias absorption (Nagel et al. 2019, section 4.1.1): lower the bias before each
    /// Relu / ReLU6 by the smallest value its channel takes on the calibration data, and raise
    /// the next layer's bias to match (where that layer is a Conv without padding or a Gemm).
    /// Exact on the calibration data; it narrows activation ranges that equalization widened.
    #[arg(long)]
    high_bias_absorption: bool,
    /// Correct each quantized Conv / Gemm bias for the mean error of its output in the
    /// quantized model (its weight's rounding and every rounding upstream), measured on the
    /// calibration data layer group by layer group (AIMET's empirical bias correction).
    #[arg(long)]
    output_bias_correction: bool,
}

impl SettingsArgs {
    /// The library's settings; `format` is quantize's `--format`.
    pub fn settings(&self, format: Option<String>) -> QuantizeSettings {
        QuantizeSettings {
            preset: super::spelling(&self.preset),
            format,
            method: self.method.as_ref().map(super::spelling),
            percentile: self.percentile.unwrap_or(99.999),
            activation: self.activation.as_ref().map(super::spelling),
            weight: self.weight.as_ref().map(super::spelling),
            symmetric_activations: self.symmetric_activations,
            per_channel: match (self.per_channel, self.per_tensor) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            },
            per_tensor_min_sqnr: self.per_tensor_min_sqnr,
            reduce_range: self.reduce_range,
            exclude: self.exclude.clone(),
            op_types: self.op_types.iter().cloned().collect(),
            fuse: !self.no_fuse,
            no_constant_folding: self.no_constant_folding,
            inputs_as_constants: self.inputs_as_constants,
            affine_folding: match (self.affine_folding, self.no_affine_folding) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            },
            threads: self.threads,
            equalize: match (self.equalize, self.no_equalize) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            },
            bias_correction: self.bias_correction,
            no_bias_correction: self.no_bias_correction,
            high_bias_absorption: self.high_bias_absorption,
            output_bias_correction: self.output_bias_correction,
        }
    }

    /// Refuses `--percentile` with another method than percentile.
    pub fn check(&self, opts: &qfold::quant::QuantizeOptions) -> qfold::Result<()> {
        if let (Some(p), false) = (
            self.percentile,
            matches!(
                opts.method,
                qfold::quant::observe::Method::Percentile { .. }
            ),
        ) {
            return Err(qfold::Error::Usage(format!(
                "--percentile {p} applies to --method percentile; the method is {}",
                opts.method.name()
            )));
        }
        Ok(())
    }
}
