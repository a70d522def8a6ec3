//! Calibration and evaluation data in the forms users have: folders and single files of
//! images (preprocessed), `.npy` with the samples on the model's own batch axis, float64
//! arrays, `.npz` keys, and the messages when they do not fit. Fixtures are written here, a
//! few KB each.

mod common;

use std::path::{Path, PathBuf};

use common::{model_of, models_dir, node_of, run_qfold, value_info, TempDir};
use ndarray::{ArrayD, IxDyn};
use qfold::onnx::proto::tensor_shape_proto::dimension::Value as Dim;
use qfold::onnx::proto::type_proto;
use qfold::onnx::{ElemType, Model, TensorData};
use qfold::verify::{open_data, ChannelOrder, Preprocess};

fn digits() -> PathBuf {
    models_dir().join("digits_cnn/model.onnx")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The digits CNN with its input's batch axis fixed to 1 (`[1, 1, 8, 8]`), saved in `dir`.
fn digits_batch1(dir: &Path) -> PathBuf {
    let mut m = qfold::onnx::load(digits()).unwrap();
    let input = &mut m.graph_mut().input[0];
    let Some(type_proto::Value::TensorType(t)) = input.type_.as_mut().unwrap().value.as_mut()
    else {
        panic!("tensor input")
    };
    t.shape.as_mut().unwrap().dim[0].value = Some(Dim::DimValue(1));
    let p = dir.join("b1.onnx");
    qfold::onnx::save(&m, &p, &Default::default()).unwrap();
    p
}

/// `n` digits rows `[n, 1, 8, 8]` from the committed calibration set.
fn digit_rows(n: usize) -> ArrayD<f32> {
    let x: ArrayD<f32> =
        ndarray_npy::read_npy(models_dir().join("digits_cnn/calib/input.npy")).unwrap();
    x.slice_axis(ndarray::Axis(0), ndarray::Slice::from(0..n))
        .to_owned()
}

fn quantize_json(args: &[&str]) -> serde_json::Value {
    let (code, stdout, stderr) = run_qfold(args);
    assert_eq!(code, 0, "{args:?}\n{stdout}\n{stderr}");
    serde_json::from_str(&stdout).unwrap()
}

fn refused(args: &[&str], needles: &[&str]) -> String {
    let (code, stdout, stderr) = run_qfold(args);
    assert_eq!(code, 2, "{args:?}\nstdout: {stdout}\nstderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "'{n}' not in {stderr}");
    }
    stderr
}

fn notes(v: &serde_json::Value) -> Vec<String> {
    v["notes"]
        .as_array()
        .map(|a| a.iter().map(|n| n.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// An RGB image `w` x `h` whose pixel (x, y) is `f(x, y)`.
fn rgb(path: &Path, w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) {
    image::RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y)))
        .save(path)
        .unwrap();
}

#[test]
fn a_png_folder_calibrates_the_digits_cnn_with_the_hand_computed_values() {
    let tmp = TempDir::new("df-png");
    let dir = tmp.join("imgs");
    std::fs::create_dir(&dir).unwrap();
    // a.png: 8x8, pixel (3, 2) = (200, 100, 50), the rest (10, 20, 30).
    rgb(&dir.join("a.png"), 8, 8, |x, y| {
        if (x, y) == (3, 2) {
            [200, 100, 50]
        } else {
            [10, 20, 30]
        }
    });
    // b.png: 16x20 uniform (30, 60, 90): resized (shorter side 8) and cropped to 8x8.
    rgb(&dir.join("b.png"), 16, 20, |_, _| [30, 60, 90]);
    // c.png: grayscale 8x8 of 255.
    image::GrayImage::from_fn(8, 8, |_, _| image::Luma([255]))
        .save(dir.join("c.png"))
        .unwrap();
    let m = qfold::onnx::load(digits()).unwrap();
    let pre = Preprocess {
        resize: Some(8),
        crop: Some((8, 8)),
        mean: Some(vec![0.5]),
        std: Some(vec![0.25]),
        ..Default::default()
    };
    let src = open_data(&m, &dir, &pre).unwrap();
    assert_eq!(src.len(), 3);
    let value = |k: usize, y: usize, x: usize| -> f32 {
        let c = src.read(k).unwrap();
        let TensorData::F32(t) = &c.inputs[0].1 else {
            panic!("float input")
        };
        assert_eq!(t.shape(), &[1, 1, 8, 8]);
        t[[0, 0, y, x]]
    };
    // One channel: luma with ITU-R 601 weights, rounded as PIL: (200*299 + 100*587 + 50*114
    // + 500) / 1000 = 124; then (124/255 - 0.5) / 0.25.
    let hand = (124.0f32 / 255.0 - 0.5) / 0.25;
    assert!((value(0, 2, 3) - hand).abs() < 1e-6, "{}", value(0, 2, 3));
    // (10*299 + 20*587 + 30*114 + 500) / 1000 = 18
    assert!((value(0, 0, 0) - (18.0 / 255.0 - 0.5) / 0.25).abs() < 1e-6);
    // A uniform image keeps its value through the resize: (30, 60, 90) -> 54.
    assert!((value(1, 4, 4) - (54.0 / 255.0 - 0.5) / 0.25).abs() < 1e-6);
    assert!((value(2, 7, 7) - (1.0 - 0.5) / 0.25).abs() < 1e-6);
    let notes = src.notes();
    assert!(
        notes
            .iter()
            .any(|n| n.contains("2 of 3 images were in color: converted to 1 channel")),
        "{notes:?}"
    );

    // The CLI calibrates on them, every image a sample, and evaluates on them.
    let out = tmp.join("q.onnx");
    let v = quantize_json(&[
        "quantize",
        s(&digits()),
        "-o",
        s(&out),
        "--calib",
        s(&dir),
        "--resize",
        "8",
        "--crop",
        "8",
        "--mean",
        "0.5",
        "--std",
        "0.25",
        "--json",
    ]);
    assert_eq!(v["quantization"]["calibration_samples"], 3);
    assert_eq!(
        v["evaluation"]["source"],
        "the calibration data (no --eval given)"
    );
    assert_eq!(v["evaluation"]["comparison"]["samples"], 3);
    assert!(out.exists());
}

#[test]
fn three_channel_images_follow_channel_order_and_layout() {
    let tmp = TempDir::new("df-rgb");
    let dir = tmp.join("imgs");
    std::fs::create_dir(&dir).unwrap();
    rgb(&dir.join("x.png"), 4, 4, |x, y| {
        [(10 * x) as u8, (10 * y) as u8, 200]
    });
    let relu = |shape: &[usize]| -> Model {
        model_of(
            vec![node_of("Relu", "r", &["x"], &["y"], vec![])],
            vec![],
            value_info("x", ElemType::F32, shape),
            "y",
        )
    };
    // NCHW, BGR: channel 0 is blue. Pixel (x=3, y=1) = (30, 10, 200).
    let pre = Preprocess {
        channel_order: Some(ChannelOrder::Bgr),
        scale: Some(1.0),
        ..Default::default()
    };
    let src = open_data(&relu(&[1, 3, 4, 4]), &dir, &pre).unwrap();
    let c = src.read(0).unwrap();
    let TensorData::F32(t) = &c.inputs[0].1 else {
        panic!()
    };
    assert_eq!(t.shape(), &[1, 3, 4, 4]);
    assert_eq!(
        [t[[0, 0, 1, 3]], t[[0, 1, 1, 3]], t[[0, 2, 1, 3]]],
        [200.0, 10.0, 30.0]
    );
    // NHWC is read off the declared shape [1, 4, 4, 3]; RGB by default, /255.
    let src = open_data(&relu(&[1, 4, 4, 3]), &dir, &Preprocess::default()).unwrap();
    let c = src.read(0).unwrap();
    let TensorData::F32(t) = &c.inputs[0].1 else {
        panic!()
    };
    assert_eq!(t.shape(), &[1, 4, 4, 3]);
    assert_eq!(t[[0, 1, 3, 0]], 30.0 / 255.0); // as ToTensor: exactly x / 255 in f32
    assert_eq!(t[[0, 1, 3, 2]], 200.0 / 255.0);
    // A model whose height and width are symbolic needs a size.
    let mut m = relu(&[1, 3, 4, 4]);
    let Some(type_proto::Value::TensorType(tt)) = m.graph_mut().input[0]
        .type_
        .as_mut()
        .unwrap()
        .value
        .as_mut()
    else {
        panic!()
    };
    for d in &mut tt.shape.as_mut().unwrap().dim[2..] {
        d.value = Some(Dim::DimParam("hw".into()));
    }
    let err = open_data(&m, &dir, &Preprocess::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("--preprocess"), "{err}");
    assert!(err.contains("--crop"), "{err}");
}

#[test]
fn an_npy_on_the_batch_axis_of_a_batch1_model_gives_one_sample_per_row() {
    let tmp = TempDir::new("df-batch");
    let model = digits_batch1(tmp.path());
    let x = digit_rows(12);
    let npy = tmp.join("calib.npy");
    ndarray_npy::write_npy(&npy, &x).unwrap();
    let m = qfold::onnx::load(&model).unwrap();
    let src = open_data(&m, &npy, &Preprocess::default()).unwrap();
    assert_eq!(src.len(), 12);
    // Sample k is row k, read from the file by itself.
    for k in [0, 7, 11] {
        let c = src.read(k).unwrap();
        let TensorData::F32(t) = &c.inputs[0].1 else {
            panic!()
        };
        assert_eq!(t.shape(), &[1, 1, 8, 8]);
        assert_eq!(
            t.index_axis(ndarray::Axis(0), 0),
            x.index_axis(ndarray::Axis(0), k)
        );
    }
    let v = quantize_json(&[
        "quantize",
        s(&model),
        "-o",
        s(&tmp.join("q.onnx")),
        "--calib",
        s(&npy),
        "--json",
    ]);
    assert_eq!(v["quantization"]["calibration_samples"], 12);
    assert_eq!(v["evaluation"]["comparison"]["samples"], 12);
    // The same rows stacked on a new axis, [12, 1, 1, 8, 8], are the same 12 samples.
    let stacked = x
        .clone()
        .into_shape_with_order(IxDyn(&[12, 1, 1, 8, 8]))
        .unwrap();
    ndarray_npy::write_npy(&npy, &stacked).unwrap();
    let src = open_data(&m, &npy, &Preprocess::default()).unwrap();
    assert_eq!(src.len(), 12);
    let TensorData::F32(t) = &src.read(7).unwrap().inputs[0].1 else {
        panic!()
    };
    assert_eq!(
        t.index_axis(ndarray::Axis(0), 0),
        x.index_axis(ndarray::Axis(0), 7)
    );
}

#[test]
fn float64_arrays_are_cast_with_a_note() {
    let tmp = TempDir::new("df-f64");
    let x = digit_rows(6);
    let npy = tmp.join("calib.npy");
    ndarray_npy::write_npy(&npy, &x.mapv(f64::from)).unwrap();
    let m = qfold::onnx::load(digits()).unwrap();
    let src = open_data(&m, &npy, &Preprocess::default()).unwrap();
    let TensorData::F32(t) = &src.read(5).unwrap().inputs[0].1 else {
        panic!("cast to float32")
    };
    assert_eq!(
        t.index_axis(ndarray::Axis(0), 0),
        x.index_axis(ndarray::Axis(0), 5)
    );
    let v = quantize_json(&[
        "quantize",
        s(&digits()),
        "-o",
        s(&tmp.join("q.onnx")),
        "--calib",
        s(&npy),
        "--json",
    ]);
    assert_eq!(v["quantization"]["calibration_samples"], 6);
    let n = notes(&v);
    assert!(
        n.iter()
            .any(|n| n.contains("double values cast to float (the type of input 'input')")),
        "{n:?}"
    );
}

#[test]
fn npz_keys_and_single_files() {
    let tmp = TempDir::new("df-npz");
    let x = digit_rows(4);
    let write_npz = |p: &Path, names: &[&str]| {
        let mut z = ndarray_npy::NpzWriter::new(std::fs::File::create(p).unwrap());
        for n in names {
            z.add_array(*n, &x).unwrap();
        }
        z.finish().unwrap();
    };
    let q = tmp.join("q.onnx");
    // A single-input model takes a single-array .npz whatever its key.
    let one = tmp.join("one.npz");
    write_npz(&one, &["arr_0"]);
    let v = quantize_json(&[
        "quantize",
        s(&digits()),
        "-o",
        s(&q),
        "--calib",
        s(&one),
        "--json",
    ]);
    assert_eq!(v["quantization"]["calibration_samples"], 4);
    // With several arrays, none named after the input: the keys found and the fix.
    let two = tmp.join("two.npz");
    write_npz(&two, &["arr_0", "other"]);
    refused(
        &["quantize", s(&digits()), "-o", s(&q), "--calib", s(&two)],
        &[
            "two.npz: no array named 'input' (keys: arr_0, other)",
            "np.savez(f, input=...)",
        ],
    );
    // A single image file.
    let png = tmp.join("one.png");
    rgb(&png, 8, 8, |x, y| [(x * 30) as u8, (y * 30) as u8, 0]);
    let v = quantize_json(&[
        "quantize",
        s(&digits()),
        "-o",
        s(&q),
        "--calib",
        s(&png),
        "--json",
    ]);
    assert_eq!(v["quantization"]["calibration_samples"], 1);
}

#[test]
fn data_that_do_not_fit_are_refused_with_the_file_the_shapes_and_the_fix() {
    let tmp = TempDir::new("df-bad");
    let q = tmp.join("q.onnx");
    let model = digits_batch1(tmp.path());
    // 7x8 images for an 8x8 model.
    let npy = tmp.join("wrong.npy");
    ndarray_npy::write_npy(&npy, &ArrayD::<f32>::zeros(IxDyn(&[5, 1, 7, 8]))).unwrap();
    refused(
        &["quantize", s(&model), "-o", s(&q), "--calib", s(&npy)],
        &[
            "wrong.npy: shape [5, 1, 7, 8] for input 'input', which is declared [1, 1, 8, 8]",
            "give [S, 1, 8, 8] (S samples on the batch axis) or [S, 1, 1, 8, 8]",
        ],
    );
    // Integers for a float input.
    ndarray_npy::write_npy(&npy, &ArrayD::<i64>::zeros(IxDyn(&[5, 1, 8, 8]))).unwrap();
    refused(
        &["quantize", s(&model), "-o", s(&q), "--calib", s(&npy)],
        &[
            "wrong.npy: int64 values for input 'input', which is float",
            "astype(np.float32)",
        ],
    );
    // A corrupt PNG among good ones: named, exit 2, nothing written.
    let dir = tmp.join("imgs");
    std::fs::create_dir(&dir).unwrap();
    rgb(&dir.join("a.png"), 8, 8, |_, _| [1, 2, 3]);
    std::fs::write(dir.join("b.png"), b"\x89PNG\r\n\x1a\nnot an image").unwrap();
    refused(
        &["quantize", s(&model), "-o", s(&q), "--calib", s(&dir)],
        &["b.png: cannot decode this image"],
    );
    assert!(!q.exists());
}

#[cfg(unix)]
#[test]
fn an_image_linked_out_of_its_folder_is_refused() {
    let tmp = TempDir::new("df-link");
    let dir = tmp.join("imgs");
    std::fs::create_dir(&dir).unwrap();
    rgb(&tmp.join("outside.png"), 8, 8, |_, _| [1, 2, 3]);
    rgb(&dir.join("a.png"), 8, 8, |_, _| [1, 2, 3]);
    std::os::unix::fs::symlink("../outside.png", dir.join("b.png")).unwrap();
    refused(
        &[
            "quantize",
            s(&digits()),
            "-o",
            s(&tmp.join("q.onnx")),
            "--calib",
            s(&dir),
        ],
        &["b.png", "outside the folder"],
    );
}

#[test]
fn labels_and_indices_beside_arrays_are_reported() {
    let tmp = TempDir::new("df-labels");
    let src_dir = models_dir().join("digits_cnn/eval");
    let dir = tmp.join("eval");
    std::fs::create_dir(&dir).unwrap();
    for f in ["input.npy", "labels.npy", "indices.npy"] {
        std::fs::copy(src_dir.join(f), dir.join(f)).unwrap();
    }
    let v = quantize_json(&[
        "quantize",
        s(&digits()),
        "-o",
        s(&tmp.join("q.onnx")),
        "--calib",
        s(&models_dir().join("digits_cnn/calib")),
        "--eval",
        s(&dir),
        "--json",
    ]);
    // 512 rows on the symbolic batch axis: 512 runs of one row, all labelled.
    assert_eq!(v["evaluation"]["comparison"]["samples"], 512);
    assert_eq!(v["evaluation"]["labelled"], 512);
    let acc = v["evaluation"]["float_accuracy"].as_f64().unwrap();
    assert!((acc - 509.0 / 512.0).abs() < 1e-9, "{acc}");
    let n = notes(&v);
    assert!(
        n.iter().any(|n| n.contains("labels.npy: 512 labels used")),
        "{n:?}"
    );
    assert!(
        n.iter().any(|n| n.contains("indices.npy: not read")),
        "{n:?}"
    );
}
