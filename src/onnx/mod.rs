//! Everything that names the ONNX protobuf types: loading, saving, tensors, attributes.

pub mod attr;
pub mod io;
pub mod tensor;
pub mod wire;

/// The ONNX protobuf messages (IR version 10), re-exported for the rest of the crate.
pub mod proto {
    pub use onnx_protobuf::*;
}

pub use io::{load, load_bytes, load_lazy, save, save_in_place, ExternalData, Model, SaveOptions};
pub use tensor::{ElemType, TensorData};
