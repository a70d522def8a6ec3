//! Helpers shared by the integration tests: where the committed models are, scratch folders,
//! and the CLI binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use qfold::onnx::proto::{Message, ModelProto};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `onnx_models/`.
pub fn models_dir() -> PathBuf {
    root().join("onnx_models")
}

/// Every committed case folder holding a `model.onnx` (conformance, fusion, trap), sorted.
pub fn all_case_dirs() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for base in [models_dir(), models_dir().join("conformance")] {
        for e in std::fs::read_dir(&base).expect("onnx_models is readable") {
            let p = e.expect("dir entry").path();
            if p.join("model.onnx").is_file() {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The conformance case folders, sorted by name.
pub fn conformance_dirs() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(models_dir().join("conformance"))
        .expect("conformance corpus is readable")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.join("model.onnx").is_file())
        .collect();
    out.sort();
    out
}

/// The folder of conformance case `name`.
pub fn conformance(name: &str) -> PathBuf {
    models_dir().join("conformance").join(name)
}

/// Case name of a case folder.
pub fn case_name(dir: &Path) -> String {
    dir.file_name().unwrap().to_string_lossy().to_string()
}

/// A scratch folder under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let k = COUNTER.fetch_add(1, Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("qfold-test-{tag}-{}-{k}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }

    /// File names in the folder, sorted.
    pub fn listing(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .expect("read temp dir")
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies a folder recursively.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).expect("create copy target");
    for e in std::fs::read_dir(src).expect("read copy source") {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).expect("copy file");
        }
    }
}

/// Decodes a model file as a plain message (external data left as it is).
pub fn read_proto(path: &Path) -> ModelProto {
    ModelProto::parse_from_bytes(&std::fs::read(path).expect("read model")).expect("decode model")
}

/// Encodes a message into a file.
pub fn write_proto(m: &impl Message, path: &Path) {
    std::fs::write(path, m.write_to_bytes().expect("encode")).expect("write");
}

/// The qfold binary with `args`, run to completion.
pub fn qfold(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qfold"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("run qfold")
}

/// stdout and stderr of a run as text.
pub fn texts(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}
