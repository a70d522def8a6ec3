//! Stable JSON reports: every report `qfold <command> --json` prints (and the Python package
//! returns) is one JSON object whose `"schema"` key names its kind and version, such as
//! `"qfold.quantize/1"`. Fields are named (no unnamed pairs), enums use the CLI's spellings,
//! and an error under `--json` is an object too ([`error_json`], schema `"qfold.error/1"`).
//!
//! A schema's version changes only when a field is removed, renamed or changes meaning;
//! new fields may appear within a version. README's "JSON reports" section lists them.

use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};

use crate::error::Error;

/// A report with a schema name.
pub trait Report: Serialize {
    /// `qfold.<command>/<version>`.
    const SCHEMA: &'static str;
}

#[derive(Serialize)]
struct Versioned<'a, R: Serialize> {
    schema: &'static str,
    #[serde(flatten)]
    report: &'a R,
}

/// The report as one JSON object, `"schema"` first; `pretty` indents it.
pub fn to_json<R: Report>(report: &R, pretty: bool) -> String {
    let v = Versioned {
        schema: R::SCHEMA,
        report,
    };
    let s = if pretty {
        serde_json::to_string_pretty(&v)
    } else {
        serde_json::to_string(&v)
    };
    // Reports hold strings, numbers, maps with string keys and sequences only.
    s.expect("reports serialize to JSON")
}

/// The kind of an error, for scripts: `io`, `decode`, `encode`, `external_data`, `tensor`,
/// `node`, `graph`, `patch`, `runtime`, `input` or `usage`.
pub fn error_kind(e: &Error) -> &'static str {
    match e {
        Error::Io { .. } => "io",
        Error::Decode { .. } => "decode",
        Error::Encode { .. } => "encode",
        Error::ExternalData { .. } => "external_data",
        Error::Tensor { .. } => "tensor",
        Error::Node { .. } => "node",
        Error::Graph { .. } => "graph",
        Error::Patch { .. } => "patch",
        Error::Runtime { .. } => "runtime",
        Error::Input { .. } => "input",
        Error::Usage(_) => "usage",
    }
}

/// What the error is about (the file, node, tensor or input it names), when it names one.
fn error_subject(e: &Error) -> Option<String> {
    Some(match e {
        Error::Io { path, .. } => path.display().to_string(),
        Error::Decode { what, .. } | Error::Encode { what, .. } => what.clone(),
        Error::ExternalData { tensor, .. } | Error::Tensor { tensor, .. } => tensor.clone(),
        Error::Node { node, .. } => node.clone(),
        Error::Graph { graph, .. } => graph.clone(),
        Error::Patch { patch, .. } => patch.clone(),
        Error::Runtime { context, .. } => context.clone(),
        Error::Input { input, .. } => input.clone(),
        Error::Usage(_) => return None,
    })
}

/// An error report (schema `qfold.error/1`): the command, the exit code, the error's kind,
/// what it is about and the full message (as printed without `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct ErrorReport {
    pub command: String,
    pub exit_code: i32,
    pub kind: &'static str,
    pub subject: Option<String>,
    pub message: String,
}

impl Report for ErrorReport {
    const SCHEMA: &'static str = "qfold.error/1";
}

impl ErrorReport {
    pub fn new(command: &str, e: &Error, exit_code: i32) -> ErrorReport {
        ErrorReport {
            command: command.to_string(),
            exit_code,
            kind: error_kind(e),
            subject: error_subject(e),
            message: e.to_string(),
        }
    }
}

/// `error` as a `qfold.error/1` object, pretty-printed.
pub fn error_json(command: &str, e: &Error, exit_code: i32) -> String {
    to_json(&ErrorReport::new(command, e, exit_code), true)
}

/// Serializers for fields held as tuples, so JSON names each member.
pub(crate) mod ser {
    use super::*;
    use std::collections::BTreeMap;

    struct Named<'a, A, B> {
        keys: (&'static str, &'static str),
        pair: (&'a A, &'a B),
    }

    impl<A: Serialize, B: Serialize> Serialize for Named<'_, A, B> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut m = s.serialize_map(Some(2))?;
            m.serialize_entry(self.keys.0, self.pair.0)?;
            m.serialize_entry(self.keys.1, self.pair.1)?;
            m.end()
        }
    }

    fn pairs<S: Serializer, A: Serialize, B: Serialize>(
        v: &[(A, B)],
        keys: (&'static str, &'static str),
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut q = s.serialize_seq(Some(v.len()))?;
        for (a, b) in v {
            q.serialize_element(&Named { keys, pair: (a, b) })?;
        }
        q.end()
    }

    /// `[(domain, version)]` as `[{"domain", "version"}]`.
    pub fn opsets<S: Serializer>(v: &[(String, i64)], s: S) -> Result<S::Ok, S::Error> {
        pairs(v, ("domain", "version"), s)
    }

    /// `[(rule, nodes)]` as `[{"rule", "nodes"}]`.
    pub fn rules<S: Serializer>(v: &[(String, Vec<String>)], s: S) -> Result<S::Ok, S::Error> {
        pairs(v, ("rule", "nodes"), s)
    }

    /// `[(node, op_type)]` as `[{"node", "op_type"}]`.
    pub fn node_ops<S: Serializer>(v: &[(String, String)], s: S) -> Result<S::Ok, S::Error> {
        pairs(v, ("node", "op_type"), s)
    }

    /// `[(node, reason)]` as `[{"node", "reason"}]`.
    pub fn node_reasons<S: Serializer>(v: &[(String, String)], s: S) -> Result<S::Ok, S::Error> {
        pairs(v, ("node", "reason"), s)
    }

    /// `Some((from, to))` as `{"from", "to"}`.
    pub fn opset_change<S: Serializer>(v: &Option<(i64, i64)>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some((a, b)) => Named {
                keys: ("from", "to"),
                pair: (a, b),
            }
            .serialize(s),
            None => s.serialize_none(),
        }
    }

    /// `{value: (scale, zero_point)}` as `{value: {"scale", "zero_point"}}`.
    pub fn scale_zero_points<S: Serializer>(
        v: &BTreeMap<String, (f32, i32)>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(v.len()))?;
        for (k, (scale, zp)) in v {
            m.serialize_entry(
                k,
                &Named {
                    keys: ("scale", "zero_point"),
                    pair: (scale, zp),
                },
            )?;
        }
        m.end()
    }
}
