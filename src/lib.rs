//! qfold turns float ONNX models into fused and quantized ONNX models and proves every rewrite
//! by executing it in tract.
//!
//! The [`commands`] module holds what each `qfold` subcommand runs, as library functions that
//! read and write files and return the `--json` report ([`report`]). Underneath, [`fusion`]
//! folds BatchNormalization, [`quant`] calibrates and quantizes, [`verify`] compares models
//! in tract, and [`onnx`] reads and writes models (external data included). [`ndarray`] is
//! re-exported so tensors can be built without depending on a matching version.
//!
//! Fuse a model and check the result against the original in tract:
//!
//! ```
//! # fn main() -> qfold::Result<()> {
//! use qfold::fusion::{fuse, FuseOptions};
//! use qfold::verify::{compare_models, random_cases, tolerance};
//!
//! let original = qfold::onnx::load("onnx_models/digits_cnn/model.onnx")?;
//! let mut fused = original.clone();
//! let report = fuse(&mut fused, &FuseOptions::default())?;
//! assert_eq!((report.bn_before, report.bn_after), (3, 0));
//!
//! let cases = random_cases(&original, 2, 0, &Default::default())?;
//! let cmp = compare_models(&original, &fused, &cases, tolerance::FLOAT)?;
//! assert!(cmp.passed);
//! qfold::onnx::save(&fused, std::env::temp_dir().join("digits_fused.onnx"), &Default::default())?;
//! # Ok(()) }
//! ```
//!
//! Quantize it from samples held in memory (one `Sample` per run of the model: input name
//! and tensor) and measure the int8 model against the float one:
//!
//! ```
//! # fn main() -> qfold::Result<()> {
//! use qfold::ndarray::Array4;
//! use qfold::onnx::TensorData;
//! use qfold::quant::{quantize, Calibration, QuantizeOptions};
//! use qfold::runtime::Sample;
//!
//! let model = qfold::onnx::load("onnx_models/digits_cnn/model.onnx")?;
//! // 8 digit-like images of 8x8 pixels in [0, 1], batch 4
//! let samples: Vec<Sample> = (0..8)
//!     .map(|k| {
//!         let x = Array4::from_shape_fn((4, 1, 8, 8), |(n, _, i, j)| {
//!             ((i * 8 + j + n + k) % 17) as f32 / 16.0
//!         });
//!         vec![("input".to_string(), TensorData::F32(x.into_dyn()))]
//!     })
//!     .collect();
//! let opts = QuantizeOptions::default(); // uint8 activations, int8 per-channel weights
//! let (int8, _ranges, report) = quantize(&model, Calibration::Samples(&samples), &opts)?;
//! assert_eq!(report.qdq.weights, 5);
//!
//! let cases: Vec<qfold::verify::Case> = samples
//!     .into_iter()
//!     .map(|inputs| qfold::verify::Case {
//!         source: "memory".into(),
//!         inputs,
//!         expected: vec![],
//!         labels: None,
//!     })
//!     .collect();
//! let criterion = qfold::verify::Criterion::MinSqnr { db: 25.0 };
//! let cmp = qfold::verify::compare_models(&model, &int8, &cases, criterion)?;
//! assert!(cmp.passed, "{:?}", cmp.outputs[0].sqnr_db);
//! # Ok(()) }
//! ```

pub mod commands;
pub mod error;
pub mod files;
pub mod fusion;
pub mod graph;
pub mod inspect;
pub mod onnx;
pub mod progress;
pub mod quant;
pub mod report;
pub mod runtime;
pub mod verify;

pub use error::{Error, Result};
/// The ndarray qfold's tensors are made of ([`onnx::TensorData`]).
pub use ndarray;
