//! qfold turns float ONNX models into fused and quantized ONNX models and proves every rewrite
//! by executing it in tract.
//!
//! ```no_run
//! # fn main() -> qfold::Result<()> {
//! let model = qfold::onnx::load("onnx_models/conformance/conv2d_basic/model.onnx")?;
//! let graph = qfold::graph::Graph::of_model(&model);
//! graph.check()?;
//! qfold::onnx::save(&model, "/tmp/copy.onnx", &Default::default())?;
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
