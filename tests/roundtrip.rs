//! Lossless model I/O: every committed model, unknown fields, metadata, doc strings and
//! functions survive load + save; external data is kept, inlined or written on request; the
//! 2 GiB limit moves the largest tensors out; saves are atomic.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::*;
use qfold::onnx::proto::{
    tensor_proto::DataLocation, FunctionProto, GraphProto, Message, ModelProto, NodeProto,
    OperatorSetIdProto, StringStringEntryProto, ValueInfoProto,
};
use qfold::onnx::{load, load_bytes, save, ExternalData, Model, SaveOptions, TensorData};

fn opts(external: ExternalData) -> SaveOptions {
    SaveOptions {
        external,
        ..SaveOptions::default()
    }
}

/// Names of the tensors stored as external data in a saved file, with their location.
fn external_tensors(path: &Path) -> Vec<(String, String)> {
    let m = read_proto(path);
    m.graph
        .initializer
        .iter()
        .filter(|t| t.data_location.value() == DataLocation::EXTERNAL as i32)
        .map(|t| {
            let loc = t
                .external_data
                .iter()
                .find(|kv| kv.key == "location")
                .map(|kv| kv.value.clone())
                .unwrap_or_default();
            (t.name.clone(), loc)
        })
        .collect()
}

#[test]
fn every_committed_model_round_trips_to_an_equal_message() {
    let dirs = all_case_dirs();
    // 44 conformance cases, 6 fusion and 25 trap models are committed.
    assert!(dirs.len() >= 75, "only {} models found", dirs.len());
    let tmp = TempDir::new("roundtrip-all");
    let mut inline = 0;
    for dir in &dirs {
        let name = case_name(dir);
        let src = dir.join("model.onnx");
        let model = load(&src).unwrap_or_else(|e| panic!("{name}: {e}"));
        let out = tmp.join(format!("{name}.onnx"));
        save(&model, &out, &SaveOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let back = load(&out).unwrap_or_else(|e| panic!("{name}: reload: {e}"));
        assert_eq!(back.proto, model.proto, "{name}: reloaded message differs");
        assert_eq!(
            back.external, model.external,
            "{name}: external set differs"
        );
        if model.external.is_empty() {
            // Nothing was resolved from external files: the saved file decodes to the very
            // message in the original file.
            assert_eq!(
                read_proto(&out),
                read_proto(&src),
                "{name}: file content differs"
            );
            // Not byte-equal: rust-protobuf writes fields in .proto declaration order (Python in
            // number order) and, with proto3 semantics, drops scalars explicitly set to their
            // default (`doc_string: ""`, `domain: ""`), which ONNX does not distinguish from unset.
            inline += 1;
        }
    }
    assert_eq!(inline, dirs.len() - 1, "all but external_data are inline");
    assert!(
        !tmp.listing().iter().any(|f| f.ends_with(".tmp")),
        "temporary files left: {:?}",
        tmp.listing()
    );
}

/// The unknown-field layout of one message, for comparisons.
fn unknowns(m: &impl Message) -> Vec<(u32, String)> {
    let mut v: Vec<(u32, String)> = m
        .unknown_fields()
        .iter()
        .map(|(k, val)| (k, format!("{val:?}")))
        .collect();
    v.sort();
    v
}

#[test]
fn unknown_fields_survive_load_and_save_byte_for_byte() {
    let mut m = read_proto(&conformance("conv2d_basic").join("model.onnx"));
    // One unknown field per message (rust-protobuf keeps them in a hash map, so several on the
    // same message have no fixed order), on messages at every level.
    m.mut_unknown_fields().add_varint(1001, 42);
    let g = m.graph.as_mut().unwrap();
    g.mut_unknown_fields()
        .add_length_delimited(1002, b"graph extension".to_vec());
    g.node[0]
        .mut_unknown_fields()
        .add_fixed32(1003, 0xdead_beef);
    g.node[0].attribute[0]
        .mut_unknown_fields()
        .add_fixed64(1004, 7);
    g.initializer[0].mut_unknown_fields().add_varint(1005, 5);
    g.input[0].mut_unknown_fields().add_varint(1006, 6);
    m.opset_import[0].mut_unknown_fields().add_varint(1007, 7);
    let mut bytes = m.write_to_bytes().unwrap();
    // And one appended to the encoded bytes by hand: field 1008, wire type 2, "qfold".
    let key = (1008u32 << 3) | 2; // 8066 = 0x1f82 -> varint 0x82 0x3f
    assert_eq!(key, 0x1f82);
    bytes.extend_from_slice(&[0x82, 0x3f, 5, b'q', b'f', b'o', b'l', b'd']);
    let model = load_bytes(&bytes, None, "in memory").unwrap();
    assert_eq!(
        unknowns(&model.proto).len(),
        2,
        "1001 and 1008 on the model"
    );

    let tmp = TempDir::new("unknown");
    let out = tmp.join("model.onnx");
    save(&model, &out, &SaveOptions::default()).unwrap();
    let saved = std::fs::read(&out).unwrap();
    let back = ModelProto::parse_from_bytes(&saved).unwrap();
    assert_eq!(back, model.proto);
    let bg = back.graph.as_ref().unwrap();
    let mg = m.graph.as_ref().unwrap();
    assert_eq!(unknowns(bg), unknowns(mg));
    assert_eq!(unknowns(bg).len(), 1);
    assert_eq!(unknowns(&bg.node[0]), unknowns(&mg.node[0]));
    assert_eq!(unknowns(&bg.node[0].attribute[0]).len(), 1);
    assert_eq!(unknowns(&bg.initializer[0]).len(), 1);
    assert_eq!(unknowns(&bg.input[0]).len(), 1);
    assert_eq!(unknowns(&back.opset_import[0]).len(), 1);
    assert!(
        saved
            .windows(8)
            .any(|w| w == [0x82, 0x3f, 5, b'q', b'f', b'o', b'l', b'd']),
        "the hand-appended field is written back verbatim"
    );
    // Same fields, same order: the model-level pair is the only place where order could move.
    assert_eq!(saved.len(), bytes.len());
}

fn entry(k: &str, v: &str) -> StringStringEntryProto {
    let mut e = StringStringEntryProto::new();
    e.key = k.into();
    e.value = v.into();
    e
}

#[test]
fn metadata_doc_strings_and_functions_round_trip() {
    let mut m = read_proto(&conformance("conv2d_basic").join("model.onnx"));
    m.doc_string = "model doc".into();
    m.producer_name = "qfold-tests".into();
    m.producer_version = "0.0.1".into();
    m.domain = "org.example".into();
    m.model_version = 17;
    m.metadata_props = vec![entry("author", "tests"), entry("license", "MIT")];
    let mut custom = OperatorSetIdProto::new();
    custom.domain = "org.example.fn".into();
    custom.version = 1;
    m.opset_import.push(custom);
    {
        let g = m.graph.as_mut().unwrap();
        g.doc_string = "graph doc".into();
        g.node[0].doc_string = "node doc".into();
        g.node[0].metadata_props = vec![entry("qfold.fusion_group", "conv")];
        g.initializer[0].doc_string = "weight doc".into();
        g.input[0].doc_string = "input doc".into();
        g.output[0].doc_string = "output doc".into();
    }
    let mut f = FunctionProto::new();
    f.name = "Twice".into();
    f.domain = "org.example.fn".into();
    f.input = vec!["a".into()];
    f.output = vec!["b".into()];
    f.attribute = vec!["unused_attr".into()];
    f.doc_string = "b = a + a".into();
    let mut add = NodeProto::new();
    add.op_type = "Add".into();
    add.input = vec!["a".into(), "a".into()];
    add.output = vec!["b".into()];
    f.node.push(add);
    let mut fo = OperatorSetIdProto::new();
    fo.version = 13;
    f.opset_import.push(fo);
    m.functions.push(f);

    let model = load_bytes(&m.write_to_bytes().unwrap(), None, "in memory").unwrap();
    assert_eq!(model.proto, m);
    let tmp = TempDir::new("meta");
    save(&model, tmp.join("m.onnx"), &SaveOptions::default()).unwrap();
    let back = load(tmp.join("m.onnx")).unwrap();
    assert_eq!(back.proto, m);
    assert_eq!(back.proto.metadata_props[1].value, "MIT");
    assert_eq!(back.proto.functions[0].node[0].op_type, "Add");
    assert_eq!(back.graph().node[0].metadata_props[0].value, "conv");
    assert_eq!(back.graph().output[0].doc_string, "output doc");
}

#[test]
fn external_data_is_kept_by_default() {
    let src = conformance("external_data").join("model.onnx");
    let model = load(&src).unwrap();
    let names: Vec<&str> = model.external.iter().map(String::as_str).collect();
    assert_eq!(names, ["b", "gc", "gw", "w"]);
    // Resolved into memory: 216 + 12 + 1200 + 16 bytes.
    let bytes: usize = model
        .graph()
        .initializer
        .iter()
        .map(|t| t.raw_data.len())
        .sum();
    assert_eq!(bytes, 1444);

    let tmp = TempDir::new("ext-keep");
    let out = tmp.join("model.onnx");
    save(&model, &out, &SaveOptions::default()).unwrap();
    assert_eq!(tmp.listing(), ["model.onnx", "model.onnx.data"]);
    let ext = external_tensors(&out);
    assert_eq!(ext.len(), 4);
    assert!(ext.iter().all(|(_, loc)| loc == "model.onnx.data"));
    // Four tensors, each aligned to 4 KiB: the last starts at 12288 and holds 16 bytes.
    let data_len = std::fs::metadata(tmp.join("model.onnx.data"))
        .unwrap()
        .len();
    assert_eq!(data_len, 3 * 4096 + 16);
    let back = load(&out).unwrap();
    assert_eq!(back.proto, model.proto);
    assert_eq!(back.external, model.external);
}

#[test]
fn external_data_never_inlines_everything() {
    let model = load(conformance("external_data").join("model.onnx")).unwrap();
    let tmp = TempDir::new("ext-never");
    let out = tmp.join("model.onnx");
    save(&model, &out, &opts(ExternalData::Never)).unwrap();
    assert_eq!(tmp.listing(), ["model.onnx"]);
    assert!(external_tensors(&out).is_empty());
    let back = load(&out).unwrap();
    assert_eq!(back.proto, model.proto);
    assert!(back.external.is_empty());
}

#[test]
fn external_data_threshold_moves_only_big_tensors() {
    let model = load(conformance("external_data").join("model.onnx")).unwrap();
    let tmp = TempDir::new("ext-threshold");
    let out = tmp.join("model.onnx");
    // w is 216 bytes, gw 1200; b (12) and gc (16) stay inline.
    save(&model, &out, &opts(ExternalData::Threshold(100))).unwrap();
    let ext: Vec<String> = external_tensors(&out).into_iter().map(|(n, _)| n).collect();
    assert_eq!(ext, ["w", "gw"]);
    assert_eq!(
        std::fs::metadata(tmp.join("model.onnx.data"))
            .unwrap()
            .len(),
        4096 + 1200
    );
    let back = load(&out).unwrap();
    assert_eq!(back.proto, model.proto);
    assert_eq!(
        back.external,
        ["gw", "w"].iter().map(|s| s.to_string()).collect()
    );

    // A model that had no external data gets some on request, typed fields included.
    let typed = load(conformance("external_data_typed").join("model.onnx")).unwrap();
    let out = tmp.join("typed.onnx");
    save(&typed, &out, &opts(ExternalData::Threshold(64))).unwrap();
    let ext = external_tensors(&out);
    assert!(!ext.is_empty(), "some typed tensor is at least 64 bytes");
    let back = load(&out).unwrap();
    for t in &typed.graph().initializer {
        let b = back
            .graph()
            .initializer
            .iter()
            .find(|x| x.name == t.name)
            .unwrap();
        // External tensors come back as raw_data, so compare the values, not the fields.
        assert_eq!(
            TensorData::from_proto(b).unwrap(),
            TensorData::from_proto(t).unwrap(),
            "{}",
            t.name
        );
    }
}

/// `y = Concat(x, t1, t2, t3, t4)` with 1-D float initializers of 1000, 2000, 4000 and 8000
/// elements.
fn concat_model() -> Model {
    let mut g = GraphProto::new();
    g.name = "concat".into();
    let mut n = NodeProto::new();
    n.op_type = "Concat".into();
    n.name = "cat".into();
    n.input = vec!["x".into()];
    n.output = vec!["y".into()];
    n.attribute.push(qfold::onnx::attr::make_int("axis", 0));
    for (k, len) in [1000usize, 2000, 4000, 8000].into_iter().enumerate() {
        let name = format!("t{}", k + 1);
        let a = ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[len]), |i| i[0] as f32);
        g.initializer.push(TensorData::F32(a).to_proto(&name));
        n.input.push(name);
    }
    g.node.push(n);
    let mut x = ValueInfoProto::new();
    x.name = "x".into();
    g.input.push(x);
    let mut y = ValueInfoProto::new();
    y.name = "y".into();
    g.output.push(y);
    let mut m = ModelProto::new();
    m.ir_version = 8;
    m.graph = Some(g).into();
    Model::new(m)
}

#[test]
fn over_the_limit_keep_moves_the_largest_tensors_out() {
    let model = concat_model();
    let total = model.proto.compute_size();
    assert!(total > 60_000 && total < 60_400, "{total}");
    let limit = 40_000;
    let tmp = TempDir::new("limit-keep");
    let out = tmp.join("m.onnx");
    let o = SaveOptions {
        inline_limit: Some(limit),
        ..SaveOptions::default()
    };
    save(&model, &out, &o).unwrap();
    // t4 (32000 B) out leaves ~28000 inline, above limit / 2; t3 (16000 B) out leaves ~12000.
    let ext: BTreeSet<String> = external_tensors(&out).into_iter().map(|(n, _)| n).collect();
    assert_eq!(ext, ["t3", "t4"].iter().map(|s| s.to_string()).collect());
    assert!(std::fs::metadata(&out).unwrap().len() <= limit / 2);
    let back = load(&out).unwrap();
    assert_eq!(back.proto, model.proto);

    // Under the limit nothing moves.
    let o = SaveOptions {
        inline_limit: Some(total),
        ..SaveOptions::default()
    };
    save(&model, tmp.join("fits.onnx"), &o).unwrap();
    assert!(external_tensors(&tmp.join("fits.onnx")).is_empty());
    assert!(!tmp.join("fits.onnx.data").exists());
}

#[test]
fn over_the_limit_never_fails_and_writes_nothing() {
    let model = concat_model();
    let tmp = TempDir::new("limit-never");
    let out = tmp.join("m.onnx");
    let o = SaveOptions {
        external: ExternalData::Never,
        inline_limit: Some(40_000),
    };
    let e = save(&model, &out, &o).unwrap_err().to_string();
    assert!(e.contains("m.onnx") && e.contains("2 GiB"), "{e}");
    assert!(tmp.listing().is_empty(), "{:?}", tmp.listing());

    // Threshold that leaves too much inline fails too: only t4 (32000 B) is >= 20000 bytes,
    // and ~28000 stay inline against a 20000 limit.
    let o = SaveOptions {
        external: ExternalData::Threshold(20_000),
        inline_limit: Some(20_000),
    };
    let e = save(&model, &out, &o).unwrap_err().to_string();
    assert!(e.contains("stay inline"), "{e}");
    assert!(tmp.listing().is_empty(), "{:?}", tmp.listing());
}

#[test]
fn save_into_a_missing_folder_fails_naming_the_path() {
    let model = load(conformance("relu").join("model.onnx")).unwrap();
    let tmp = TempDir::new("atomic-missing");
    let out = tmp.join("no_such_folder").join("model.onnx");
    let e = save(&model, &out, &SaveOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains(&out.display().to_string()), "{e}");
    assert!(tmp.listing().is_empty(), "{:?}", tmp.listing());
}

#[test]
fn failed_save_leaves_the_old_file_intact() {
    let tmp = TempDir::new("atomic-old");
    let out = tmp.join("model.onnx");
    let old = std::fs::read(conformance("relu").join("model.onnx")).unwrap();
    std::fs::write(&out, &old).unwrap();

    // 1. Refused before writing: too big without external data.
    let model = concat_model();
    let o = SaveOptions {
        external: ExternalData::Never,
        inline_limit: Some(1000),
    };
    assert!(save(&model, &out, &o).is_err());
    assert_eq!(std::fs::read(&out).unwrap(), old);
    assert_eq!(tmp.listing(), ["model.onnx"]);

    // 2. Failing halfway: both files are written to temporaries, then the data file cannot be
    // renamed over a folder that holds a file.
    std::fs::create_dir(tmp.join("model.onnx.data")).unwrap();
    std::fs::write(tmp.join("model.onnx.data").join("keep"), b"x").unwrap();
    let ext = load(conformance("external_data").join("model.onnx")).unwrap();
    let e = save(&ext, &out, &SaveOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.onnx.data"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), old);
    assert_eq!(tmp.listing(), ["model.onnx", "model.onnx.data"]);

    // 3. A good save replaces the file and leaves no temporary behind.
    let relu2 = load(conformance("clip").join("model.onnx")).unwrap();
    save(&relu2, &out, &SaveOptions::default()).unwrap();
    assert_eq!(load(&out).unwrap().proto, relu2.proto);
    assert_eq!(tmp.listing(), ["model.onnx", "model.onnx.data"]);
}

#[test]
fn loading_never_modifies_the_input_and_saving_keeps_it() {
    let dir = TempDir::new("input-untouched");
    copy_dir(&conformance("external_data"), dir.path());
    let before_model = std::fs::read(dir.join("model.onnx")).unwrap();
    let before_data = std::fs::read(dir.join("weights.bin")).unwrap();
    let m = load(dir.join("model.onnx")).unwrap();
    save(&m, dir.join("copy.onnx"), &SaveOptions::default()).unwrap();
    assert_eq!(std::fs::read(dir.join("model.onnx")).unwrap(), before_model);
    assert_eq!(std::fs::read(dir.join("weights.bin")).unwrap(), before_data);
}
