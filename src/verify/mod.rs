//! Input sets, comparison metrics and tolerances: what `qfold check` and every `--check`
//! report.
//!
//! Metrics per output, accumulated over all samples: max abs error, max rel error (over
//! elements whose reference magnitude exceeds the absolute tolerance), cosine similarity,
//! SQNR `10 log10(sum ref^2 / sum (ref - out)^2)` in dB, and top-1 agreement for
//! classifier-shaped outputs (`[N, C]` with `C >= 2`).
//!
//! Split along its seams: [`data`] reads input sets, [`source`] serves them one sample at a
//! time ([`SampleSource`], [`open_data`]), [`image`] turns image files into inputs,
//! [`metrics`] accumulates the numbers, [`compare`] runs models in tract and feeds the
//! metrics. Everything is re-exported here.

pub mod compare;
pub mod data;
pub mod image;
pub mod metrics;
pub mod source;

pub use compare::{compare_expected, compare_models};
pub use data::{
    cases_from_arrays, check_random_count, dataset_or_random, declared_inputs, label_rows,
    parse_input_shape, parse_input_shapes, random_cases, read_cases, read_dataset, read_labels,
    read_npy_sample, read_tensor_pb, read_test_data_set, Case, DeclaredInput, MAX_RANDOM_BYTES,
    MAX_RANDOM_ELEMENTS, MAX_RANDOM_SAMPLES,
};
pub use image::{ChannelOrder, Layout, Preprocess, PreprocessPreset};
pub use metrics::{accuracy, tolerance, Comparer, Comparison, Criterion, OutputMetrics};
pub use source::{open_data, realization_factor, Realizations, SampleSource};
