//! Files and resources under hostile input (issue 13): every file a model or a data set refers
//! to stays inside its folder and is a regular file; outputs never replace an input, never
//! follow a planted link, never leave temporary files behind (failures and signals included);
//! allocations sized by a file or a flag are checked first. Each case: exit code 2, a message
//! naming the culprit, every file unchanged and no leftover in the folders.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use qfold::onnx::proto::{
    attribute_proto::AttributeType, tensor_proto::DataLocation,
    tensor_shape_proto::dimension::Value as Dim, type_proto, AttributeProto, ModelProto,
};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// What a folder holds, recursively: file bytes, link targets, other kinds by name.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(base).unwrap().to_path_buf();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let v = if m.file_type().is_symlink() {
                format!("link -> {}", std::fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                walk(base, &p, out);
                "dir".into()
            } else if m.is_file() && m.len() > 1 << 26 {
                // Too big to read (the sparse 1 TiB file): its size and time.
                format!("{} bytes, modified {:?}", m.len(), m.modified().unwrap())
            } else if m.is_file() {
                let b = std::fs::read(&p).unwrap();
                format!("{} bytes, {:x}", b.len(), fnv(&b))
            } else {
                "special".into()
            };
            out.insert(rel, v);
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Runs qfold, killing it after `secs` (a blocked run fails the test instead of hanging it).
fn run_bounded(args: &[&str], secs: u64) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_qfold"))
        .args(args)
        .current_dir(root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > Duration::from_secs(secs) {
            child.kill().unwrap();
            panic!("{args:?} still running after {secs} s (blocked?)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = child.wait_with_output().unwrap();
    let (out, err) = texts(&o);
    (o.status.code().unwrap_or(-1), out, err)
}

/// Runs the CLI; asserts exit 2, no panic, every needle in stderr, and `dir` unchanged.
fn refused(dir: &Path, args: &[&str], needles: &[&str]) -> String {
    let before = snapshot(dir);
    let (code, stdout, stderr) = run_bounded(args, 30);
    assert_eq!(code, 2, "{args:?}\nstdout: {stdout}\nstderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    assert!(
        common::without_progress(&stderr).starts_with("error: "),
        "{args:?}: {stderr}"
    );
    for n in needles {
        assert!(stderr.contains(n), "{args:?}: '{n}' not in {stderr}");
    }
    assert_eq!(snapshot(dir), before, "{args:?} changed the folder");
    stderr
}

fn mkfifo(p: &Path) {
    let st = Command::new("mkfifo").arg(p).status().unwrap();
    assert!(st.success());
}

/// `dir/d/` holding a copy of the external_data case: model.onnx and weights.bin.
fn external_case(dir: &Path) -> PathBuf {
    let d = dir.join("d");
    std::fs::create_dir_all(&d).unwrap();
    for f in ["model.onnx", "weights.bin"] {
        std::fs::copy(conformance("external_data").join(f), d.join(f)).unwrap();
    }
    d
}

/// The external_data model with every external location set to `location`.
fn with_location(location: &str) -> ModelProto {
    let mut m = read_proto(&conformance("external_data").join("model.onnx"));
    for t in &mut m.graph.as_mut().unwrap().initializer {
        for kv in &mut t.external_data {
            if kv.key == "location" {
                kv.value = location.into();
            }
        }
    }
    m
}

// ---- reads outside the model folder ----

#[test]
fn symlinks_out_of_the_model_folder_are_refused() {
    let tmp = TempDir::new("fs-links");
    let d = external_case(tmp.path());
    let out = tmp.join("leak.onnx");
    // A file link to a system file, a directory link, a link to the parent folder's copy.
    std::os::unix::fs::symlink("/etc/passwd", d.join("link.bin")).unwrap();
    std::os::unix::fs::symlink("/etc", d.join("etc")).unwrap();
    std::fs::copy(d.join("weights.bin"), tmp.join("weights.bin")).unwrap();
    std::os::unix::fs::symlink("../weights.bin", d.join("up.bin")).unwrap();
    for (k, (location, target)) in [
        ("link.bin", "/etc/passwd"),
        ("etc/passwd", "/etc/passwd"),
        ("up.bin", "weights.bin"),
    ]
    .into_iter()
    .enumerate()
    {
        let model = d.join(format!("m{k}.onnx"));
        write_proto(&with_location(location), &model);
        let err = refused(
            tmp.path(),
            &["fuse", s(&model), "-o", s(&out)],
            &[
                "tensor 'w'",
                &format!("location '{location}'"),
                target,
                "outside the folder",
            ],
        );
        assert!(!err.contains("root:"), "{err}");
        refused(
            tmp.path(),
            &["inspect", s(&model)],
            &["tensor 'w'", "outside"],
        );
    }
}

#[test]
fn a_constant_node_tensor_through_a_symlink_is_refused() {
    let tmp = TempDir::new("fs-const");
    let d = external_case(tmp.path());
    std::os::unix::fs::symlink("/etc/passwd", d.join("link.bin")).unwrap();
    // `w` moves from the initializers to a Constant node whose tensor is external data.
    let mut m = read_proto(&conformance("external_data").join("model.onnx"));
    let g = m.graph.as_mut().unwrap();
    let i = g.initializer.iter().position(|t| t.name == "w").unwrap();
    let mut w = g.initializer.remove(i);
    for kv in &mut w.external_data {
        if kv.key == "location" {
            kv.value = "link.bin".into();
        }
    }
    let mut a = AttributeProto::new();
    a.name = "value".into();
    a.type_ = AttributeType::TENSOR.into();
    a.t = Some(w).into();
    g.node
        .insert(0, node_of("Constant", "const_w", &[], &["w"], vec![a]));
    let model = d.join("const.onnx");
    write_proto(&m, &model);
    refused(
        tmp.path(),
        &["fuse", s(&model), "-o", s(&tmp.join("leak.onnx"))],
        &[
            "tensor 'w'",
            "location 'link.bin'",
            "/etc/passwd",
            "outside",
        ],
    );
}

// ---- non-regular files as inputs ----

#[test]
fn a_device_or_a_fifo_as_the_model_is_refused_without_blocking() {
    let tmp = TempDir::new("fs-fifo-model");
    let fifo = tmp.join("fifo.onnx");
    mkfifo(&fifo);
    refused(
        tmp.path(),
        &["inspect", s(&fifo)],
        &["fifo.onnx", "is a FIFO, not a regular file"],
    );
    refused(
        tmp.path(),
        &["inspect", "/dev/zero"],
        &["/dev/zero", "is a character device, not a regular file"],
    );
    refused(tmp.path(), &["inspect", s(tmp.path())], &["is a directory"]);
}

#[test]
fn a_fifo_as_external_data_is_refused_without_blocking() {
    let tmp = TempDir::new("fs-fifo-ext");
    let d = external_case(tmp.path());
    std::fs::remove_file(d.join("weights.bin")).unwrap();
    mkfifo(&d.join("weights.bin"));
    refused(
        tmp.path(),
        &[
            "fuse",
            s(&d.join("model.onnx")),
            "-o",
            s(&tmp.join("o.onnx")),
        ],
        &["tensor 'w'", "weights.bin", "is a FIFO"],
    );
}

/// A `.npy` file of f32 `values` with `shape` written in its header.
fn npy(shape: &str, values: &[f32]) -> Vec<u8> {
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend((header.len() as u16).to_le_bytes());
    b.extend(header.as_bytes());
    for v in values {
        b.extend(v.to_le_bytes());
    }
    b
}

#[test]
fn a_fifo_as_npy_input_is_refused_without_blocking() {
    let tmp = TempDir::new("fs-fifo-npy");
    let relu = conformance("relu").join("model.onnx");
    let fifo = tmp.join("x.npy");
    mkfifo(&fifo);
    refused(
        tmp.path(),
        &["check", s(&relu), s(&relu), "--npy", s(&fifo)],
        &["x.npy", "is a FIFO"],
    );
    // The same FIFO found in a calibration folder.
    refused(
        tmp.path(),
        &[
            "quantize",
            s(&relu),
            "-o",
            s(&tmp.join("q.onnx")),
            "--calib",
            s(tmp.path()),
        ],
        &["x.npy", "is a FIFO"],
    );
}

#[test]
fn a_calibration_file_linked_out_of_its_folder_is_refused() {
    let tmp = TempDir::new("fs-calib-link");
    let relu = conformance("relu").join("model.onnx");
    let calib = tmp.join("calib");
    std::fs::create_dir(&calib).unwrap();
    std::fs::write(tmp.join("outside.npy"), npy("(2, 3, 4)", &[0.5; 24])).unwrap();
    std::os::unix::fs::symlink("../outside.npy", calib.join("x.npy")).unwrap();
    refused(
        tmp.path(),
        &[
            "quantize",
            s(&relu),
            "-o",
            s(&tmp.join("q.onnx")),
            "--calib",
            s(&calib),
        ],
        &["x.npy", "outside the folder"],
    );
}

// ---- outputs that would replace an input ----

#[test]
fn every_alias_of_the_input_model_is_refused_as_output() {
    let tmp = TempDir::new("fs-alias");
    let d = external_case(tmp.path());
    let m = d.join("model.onnx");
    std::fs::create_dir(d.join("sub")).unwrap();
    std::os::unix::fs::symlink("model.onnx", d.join("alias.onnx")).unwrap();
    std::fs::hard_link(&m, d.join("hard.onnx")).unwrap();
    for out in ["model.onnx", "sub/../model.onnx", "alias.onnx", "hard.onnx"] {
        let out = d.join(out);
        for cmd in [
            vec!["fuse", s(&m), "-o", s(&out)],
            vec!["quantize", s(&m), "-o", s(&out), "--calib-random", "2"],
            vec!["convert", s(&m), "-o", s(&out)],
        ] {
            refused(
                tmp.path(),
                &cmd,
                &[
                    &format!("-o {}", out.display()),
                    "is the input model",
                    "--in-place",
                ],
            );
        }
    }
}

#[test]
fn save_ranges_onto_the_input_is_refused() {
    let tmp = TempDir::new("fs-ranges");
    let m = tmp.join("model.onnx");
    std::fs::copy(conformance("relu").join("model.onnx"), &m).unwrap();
    let out = tmp.join("q.onnx");
    refused(
        tmp.path(),
        &[
            "quantize",
            s(&m),
            "-o",
            s(&out),
            "--calib-random",
            "2",
            "--save-ranges",
            s(&m),
        ],
        &["--save-ranges", "model.onnx", "file of the input model"],
    );
    refused(
        tmp.path(),
        &[
            "quantize",
            s(&m),
            "-o",
            s(&out),
            "--calib-random",
            "2",
            "--save-ranges",
            s(&out),
        ],
        &["--save-ranges", "also the output model"],
    );
}

#[test]
fn the_inputs_external_data_file_is_refused_as_output() {
    let tmp = TempDir::new("fs-data-out");
    let d = external_case(tmp.path());
    let m = d.join("model.onnx");
    refused(
        tmp.path(),
        &["fuse", s(&m), "-o", s(&d.join("weights.bin"))],
        &["weights.bin", "external data file of the input model"],
    );
    // a.onnx keeps its weights in b.onnx.data: writing b.onnx would replace them.
    write_proto(&with_location("b.onnx.data"), &d.join("a.onnx"));
    std::fs::rename(d.join("weights.bin"), d.join("b.onnx.data")).unwrap();
    refused(
        tmp.path(),
        &["fuse", s(&d.join("a.onnx")), "-o", s(&d.join("b.onnx"))],
        &["-o", "b.onnx.data", "input model's external data file"],
    );
    // Even with --in-place, which only allows replacing the model itself.
    refused(
        tmp.path(),
        &[
            "fuse",
            s(&d.join("a.onnx")),
            "-o",
            s(&d.join("b.onnx")),
            "--in-place",
        ],
        &["b.onnx.data", "input model's external data file"],
    );
}

#[test]
fn in_place_replaces_the_model_and_keeps_the_data_consistent() {
    let tmp = TempDir::new("fs-inplace");
    let d = external_case(tmp.path());
    let m = d.join("model.onnx");
    let weights = std::fs::read(d.join("weights.bin")).unwrap();
    let (code, _, err) = run_qfold(&["fuse", s(&m), "--in-place"]);
    assert_eq!(code, 0, "{err}");
    // The new model's data is model.onnx.data; the old data file is left as it was.
    assert_eq!(std::fs::read(d.join("weights.bin")).unwrap(), weights);
    let first = qfold::onnx::load(&m).unwrap();
    // Again: now the input's data file is model.onnx.data itself, replaced only when complete.
    let (code, _, err) = run_qfold(&["fuse", s(&m), "-o", s(&m), "--in-place"]);
    assert_eq!(code, 0, "{err}");
    let second = qfold::onnx::load(&m).unwrap();
    assert_eq!(first.proto, second.proto);
    let mut names: Vec<String> = snapshot(&d)
        .keys()
        .map(|p| p.display().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["model.onnx", "model.onnx.data", "weights.bin"]);
}

// ---- outputs that are not regular files ----

#[test]
fn an_existing_directory_or_fifo_at_the_output_is_refused_up_front() {
    let tmp = TempDir::new("fs-outdir");
    let d = external_case(tmp.path());
    let m = d.join("model.onnx");
    let dir = tmp.join("existing_dir");
    std::fs::create_dir(&dir).unwrap();
    refused(
        tmp.path(),
        &["fuse", s(&m), "-o", s(&dir)],
        &["existing_dir", "is a directory"],
    );
    assert!(!tmp.join("existing_dir.data").exists());
    let fifo = tmp.join("fifo.onnx");
    mkfifo(&fifo);
    refused(
        tmp.path(),
        &["fuse", s(&m), "-o", s(&fifo)],
        &["fifo.onnx", "is a FIFO"],
    );
    // The output's data file is checked as well.
    std::fs::create_dir(tmp.join("x.onnx.data")).unwrap();
    refused(
        tmp.path(),
        &["fuse", s(&m), "-o", s(&tmp.join("x.onnx"))],
        &["x.onnx.data", "is a directory"],
    );
}

#[test]
fn a_missing_output_folder_is_refused_before_loading() {
    let tmp = TempDir::new("fs-nofolder");
    // The model does not exist either: the output is checked first.
    refused(
        tmp.path(),
        &[
            "fuse",
            s(&tmp.join("absent.onnx")),
            "-o",
            s(&tmp.join("no/such/out.onnx")),
        ],
        &["out.onnx", "output folder", "does not exist"],
    );
}

#[test]
fn a_planted_temporary_symlink_redirects_nothing() {
    let tmp = TempDir::new("fs-planted");
    let d = external_case(tmp.path());
    let model = qfold::onnx::load(d.join("model.onnx")).unwrap();
    let victim = tmp.join("victim.txt");
    std::fs::write(&victim, b"precious").unwrap();
    // The names the old writer used, for this very process (the library runs in it).
    let pid = std::process::id();
    let out = tmp.join("out.onnx");
    let planted = [
        tmp.join(format!(".out.onnx.qfold-{pid}.tmp")),
        tmp.join(format!(".out.onnx.data.qfold-{pid}.tmp")),
    ];
    for p in &planted {
        std::os::unix::fs::symlink(&victim, p).unwrap();
    }
    qfold::onnx::save(&model, &out, &Default::default()).unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    for p in &planted {
        assert_eq!(std::fs::read_link(p).unwrap(), victim);
    }
    let back = qfold::onnx::load(&out).unwrap();
    assert_eq!(back.proto, model.proto);
    let names = tmp.listing();
    assert_eq!(names.len(), 6, "{names:?}"); // d, victim, 2 planted, out, out.data
}

// ---- no leftovers on failure or signal ----

/// Waits until a `.qfold.tmp` file appears in `dir`.
fn wait_for_temp(dir: &Path, child: &mut Child) {
    let start = Instant::now();
    while !tmp_files(dir).iter().any(|n| n.ends_with(".qfold.tmp")) {
        assert!(child.try_wait().unwrap().is_none(), "qfold ended early");
        assert!(start.elapsed() < Duration::from_secs(30), "no temp file");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tmp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect()
}

#[test]
fn sigterm_and_sigint_during_a_save_remove_the_temporary_files() {
    for (sig, code) in [("TERM", 143), ("INT", 130)] {
        let tmp = TempDir::new("fs-signal");
        let d = external_case(tmp.path());
        let out = tmp.join("out.onnx");
        let mut child = Command::new(env!("CARGO_BIN_EXE_qfold"))
            .args(["fuse", s(&d.join("model.onnx")), "-o", s(&out)])
            .env("QFOLD_TEST_PAUSE_BEFORE_COMMIT_MS", "20000")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_temp(tmp.path(), &mut child);
        let st = Command::new("kill")
            .args([&format!("-{sig}"), &child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(code), "SIG{sig}");
        assert_eq!(tmp_files(tmp.path()), ["d"], "SIG{sig} left files");
    }
}

#[test]
fn a_file_size_limit_during_a_save_leaves_nothing() {
    let tmp = TempDir::new("fs-xfsz");
    let d = external_case(tmp.path());
    let out = tmp.join("out.onnx");
    // 4 blocks (2 or 4 KiB): the 12 KiB external data file passes it (SIGXFSZ, then EFBIG).
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -f 4 && exec '{}' fuse '{}' -o '{}'",
            env!("CARGO_BIN_EXE_qfold"),
            d.join("model.onnx").display(),
            out.display()
        ))
        .output()
        .unwrap();
    let (_, err) = texts(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("out.onnx.data") && err.contains("too large"),
        "{err}"
    );
    assert_eq!(tmp_files(tmp.path()), ["d"]);
}

// ---- allocations sized by what a file or a flag declares ----

#[test]
fn a_one_tib_sparse_external_file_is_refused_before_allocating() {
    let tmp = TempDir::new("fs-sparse");
    let d = external_case(tmp.path());
    let big = std::fs::File::create(d.join("big.bin")).unwrap();
    big.set_len(1 << 40).unwrap();
    let mut m = with_location("big.bin");
    let w = &mut m.graph.as_mut().unwrap().initializer[0];
    assert_eq!(w.data_location.value(), DataLocation::EXTERNAL as i32);
    for kv in &mut w.external_data {
        match kv.key.as_str() {
            "offset" => kv.value = "0".into(),
            "length" => kv.value = (1u64 << 40).to_string(),
            _ => {}
        }
    }
    let name = w.name.clone();
    let model = d.join("sparse.onnx");
    write_proto(&m, &model);
    refused(
        tmp.path(),
        &["inspect", s(&model)],
        &[
            &format!("tensor '{name}'"),
            "length 1099511627776",
            "MAX_EXTERNAL_TENSOR_BYTES",
        ],
    );
}

#[test]
fn an_npy_header_larger_than_its_data_is_refused() {
    let tmp = TempDir::new("fs-npy");
    let relu = conformance("relu").join("model.onnx");
    let bad = npy("(274877906944,)", &[1.0; 16]);
    let p = tmp.join("x.npy");
    std::fs::write(&p, &bad).unwrap();
    refused(
        tmp.path(),
        &["check", s(&relu), s(&relu), "--npy", s(&p)],
        &["x.npy", "shape [274877906944]", "only 64 bytes"],
    );
    std::fs::remove_file(&p).unwrap();
    // The same array inside an .npz.
    let npz = tmp.join("x.npz");
    let mut z = zip::ZipWriter::new(std::fs::File::create(&npz).unwrap());
    z.start_file(
        "x.npy",
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored),
    )
    .unwrap();
    z.write_all(&bad).unwrap();
    z.finish().unwrap();
    refused(
        tmp.path(),
        &["check", s(&relu), s(&relu), "--inputs", s(tmp.path())],
        &["x.npz", "array 'x.npy'", "shape [274877906944]"],
    );
}

#[test]
fn huge_random_sample_counts_are_refused() {
    let tmp = TempDir::new("fs-count");
    let relu = conformance("relu").join("model.onnx");
    let out = tmp.join("q.onnx");
    refused(
        tmp.path(),
        &[
            "quantize",
            s(&relu),
            "-o",
            s(&out),
            "--calib-random",
            "1000000000",
        ],
        &["--calib-random 1000000000", "at most 1000000"],
    );
    refused(
        tmp.path(),
        &[
            "check",
            s(&relu),
            s(&relu),
            "--random",
            "18446744073709551615",
        ],
        &["--random 18446744073709551615", "at most 1000000"],
    );
    refused(
        tmp.path(),
        &[
            "fuse",
            s(&relu),
            "-o",
            s(&out),
            "--check",
            "--random",
            "18446744073709551615",
        ],
        &["--random", "at most 1000000"],
    );
}

#[test]
fn a_huge_random_input_shape_is_refused_at_once() {
    let tmp = TempDir::new("fs-shape");
    let mut m = read_proto(&conformance("relu").join("model.onnx"));
    let x = &mut m.graph.as_mut().unwrap().input[0];
    let Some(type_proto::Value::TensorType(t)) = x.type_.as_mut().unwrap().value.as_mut() else {
        panic!("relu's input is a tensor");
    };
    let dims = &mut t.shape.as_mut().unwrap().dim;
    dims.truncate(2);
    dims[0].value = Some(Dim::DimValue(1));
    dims[1].value = Some(Dim::DimValue(1 << 28));
    let p = tmp.join("wide.onnx");
    write_proto(&m, &p);
    let start = Instant::now();
    refused(
        tmp.path(),
        &[
            "quantize",
            s(&p),
            "-o",
            s(&tmp.join("q.onnx")),
            "--calib-random",
            "2",
        ],
        &["input 'x'", "[1, 268435456]", "MAX_RANDOM_BYTES"],
    );
    assert!(start.elapsed() < Duration::from_secs(10));
}
