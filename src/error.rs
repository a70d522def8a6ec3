//! The one error type of the library. Every message names the file, node or tensor involved.

use std::path::PathBuf;

/// Result alias used across qfold.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in qfold, each variant naming what it is about.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read, written or renamed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Bytes that are not a valid ONNX protobuf message.
    #[error("{what}: not a valid ONNX model: {reason}")]
    Decode { what: String, reason: String },
    /// A model that cannot be encoded (for example over protobuf's 2 GiB limit).
    #[error("{what}: cannot encode: {reason}")]
    Encode { what: String, reason: String },
    /// External data of a tensor is missing, out of range, or points outside the model folder.
    #[error("tensor '{tensor}': external data: {reason}")]
    ExternalData { tensor: String, reason: String },
    /// A tensor whose content does not match its declared type and shape.
    #[error("tensor '{tensor}': {reason}")]
    Tensor { tensor: String, reason: String },
    /// A node that is malformed or cannot be handled.
    #[error("node '{node}' ({op_type}): {reason}")]
    Node {
        node: String,
        op_type: String,
        reason: String,
    },
    /// The graph as a whole is inconsistent (dangling input, duplicate producer, cycle...).
    #[error("graph '{graph}': {reason}")]
    Graph { graph: String, reason: String },
    /// A rewrite that could not be applied; the model was not changed.
    #[error("patch '{patch}': {reason}")]
    Patch { patch: String, reason: String },
    /// A model or input set that tract refused or failed to run.
    #[error("tract: {context}: {reason}")]
    Runtime { context: String, reason: String },
    /// Model inputs that do not fit the model (missing, wrong type, wrong shape).
    #[error("input '{input}': {reason}")]
    Input { input: String, reason: String },
    /// An invalid option or argument.
    #[error("{0}")]
    Usage(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn tensor(tensor: &str, reason: impl Into<String>) -> Self {
        Error::Tensor {
            tensor: tensor.to_string(),
            reason: reason.into(),
        }
    }

    pub(crate) fn graph(graph: &str, reason: impl Into<String>) -> Self {
        Error::Graph {
            graph: graph.to_string(),
            reason: reason.into(),
        }
    }

    pub(crate) fn runtime(context: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Error::Runtime {
            context: context.into(),
            reason: format!("{reason:#}"),
        }
    }

    pub(crate) fn input(input: &str, reason: impl Into<String>) -> Self {
        Error::Input {
            input: input.to_string(),
            reason: reason.into(),
        }
    }
}
