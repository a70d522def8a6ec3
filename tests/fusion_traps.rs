//! The hand-built trap cases: each folds exactly, or is skipped with its stated reason.

mod common;

use common::*;
use qfold::fusion::{fuse, FuseOptions};
use qfold::onnx::ElemType;
use qfold::verify::tolerance;

fn trap_names() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(models_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("trap_"))
        .collect();
    v.sort();
    v
}

/// The reason qfold must give for each case the provenance marks `skip`.
fn skip_reason(case: &str) -> &'static str {
    match case {
        "trap_bn_before_conv" => "pads its input",
        "trap_bn_graph_output" => "is a graph output",
        "trap_bn_multi_consumer" => "has 2 consumers",
        "trap_bn_training_mode" => "training_mode = 1",
        "trap_conv_relu_bn" => "follows a Relu",
        other => panic!("no expected reason for {other}"),
    }
}

#[test]
fn every_trap_folds_exactly_or_is_skipped_with_its_reason() {
    let names = trap_names();
    assert!(names.len() >= 25, "trap cases missing: {names:?}");
    for name in names {
        let rc = load_case(&name);
        let expect = rc.provenance["expect"].as_str().unwrap().to_string();
        let mut m = rc.model.clone();
        let r = fuse(&mut m, &FuseOptions::default()).unwrap();
        match expect.as_str() {
            "fold" | "optional" => {
                assert_eq!(count(&m, "BatchNormalization"), 0, "{name}: {r:#?}");
                assert!(r.groups.iter().any(|g| g.folded), "{name}");
                let tol = tolerance::for_model(&rc.model);
                let out = run(&m, &rc.case);
                assert_close(
                    &expected(&rc.case),
                    &out,
                    tol,
                    &format!("{name} vs reference"),
                );
                assert_close(
                    &run(&rc.model, &rc.case),
                    &out,
                    tol,
                    &format!("{name} vs original"),
                );
            }
            "skip" => {
                assert_eq!(count(&m, "BatchNormalization"), 1, "{name}");
                let want = skip_reason(&name);
                assert!(
                    r.skipped.iter().any(|s| s.reason.contains(want)),
                    "{name}: expected a skip saying '{want}', got {:#?}",
                    r.skipped
                );
                assert!(r.groups.iter().all(|g| !g.folded), "{name}");
                // The explicit form of the same chain is an error with the same reason.
                let chain: Vec<String> = r
                    .skipped
                    .iter()
                    .find(|s| s.reason.contains(want))
                    .unwrap()
                    .nodes
                    .clone();
                if chain.len() > 1 {
                    let mut m2 = rc.model.clone();
                    let err = fuse(
                        &mut m2,
                        &FuseOptions {
                            only: vec![chain],
                            ..Default::default()
                        },
                    )
                    .unwrap_err()
                    .to_string();
                    assert!(
                        err.contains(want)
                            || err.contains("consumers")
                            || err.contains("graph output"),
                        "{name}: {err}"
                    );
                    assert_eq!(m2, rc.model);
                }
            }
            other => panic!("{name}: unknown expectation {other}"),
        }
    }
}

#[test]
fn shared_weight_is_cloned_not_edited() {
    let rc = load_case("trap_shared_weight");
    let g = rc.model.graph();
    let convs: Vec<_> = g.node.iter().filter(|n| n.op_type == "Conv").collect();
    assert_eq!(
        convs[0].input[1], convs[1].input[1],
        "the case shares one weight"
    );
    let shared = convs[0].input[1].clone();
    let before = g
        .initializer
        .iter()
        .find(|t| t.name == shared)
        .unwrap()
        .clone();
    let mut m = rc.model.clone();
    fuse(&mut m, &FuseOptions::default()).unwrap();
    let after = m
        .graph()
        .initializer
        .iter()
        .find(|t| t.name == shared)
        .unwrap();
    assert_eq!(&before, after, "the shared initializer is untouched");
    let ws: Vec<&String> = m
        .graph()
        .node
        .iter()
        .filter(|n| n.op_type == "Conv")
        .map(|n| &n.input[1])
        .collect();
    assert_ne!(ws[0], ws[1], "the folded Conv reads its own copy");
}

#[test]
fn folded_parameters_keep_their_dtype() {
    let rc = load_case("trap_f16");
    let mut m = rc.model.clone();
    fuse(&mut m, &FuseOptions::default()).unwrap();
    for t in &m.graph().initializer {
        assert_eq!(t.data_type, ElemType::F16.onnx_code(), "{}", t.name);
    }
}

#[test]
fn gemm_beta_becomes_one_and_c_keeps_its_shape() {
    for (case, c_shape) in [
        ("trap_gemm_c_mn", vec![4i64, 5]),
        ("trap_gemm_c_n", vec![5]),
        ("trap_gemm_c_none", vec![5]),
        ("trap_gemm_c_scalar", vec![5]),
        ("trap_gemm_c_1n", vec![5]),
    ] {
        let rc = load_case(case);
        let mut m = rc.model.clone();
        fuse(&mut m, &FuseOptions::default()).unwrap();
        let gemm = m.graph().node.iter().find(|n| n.op_type == "Gemm").unwrap();
        let beta = gemm.attribute.iter().find(|a| a.name == "beta").unwrap();
        assert_eq!(beta.f, 1.0, "{case}");
        let c = m
            .graph()
            .initializer
            .iter()
            .find(|t| t.name == gemm.input[2])
            .unwrap();
        assert_eq!(c.dims, c_shape, "{case}");
    }
}

#[test]
fn graph_output_name_is_preserved() {
    let rc = load_case("trap_bn_output_is_graph_output");
    let mut m = rc.model.clone();
    fuse(&mut m, &FuseOptions::default()).unwrap();
    assert_eq!(m.graph().output, rc.model.graph().output);
    let conv = m.graph().node.iter().find(|n| n.op_type == "Conv").unwrap();
    assert_eq!(conv.output[0], rc.model.graph().output[0].name);
}

#[test]
fn constant_node_parameters_fold_and_are_swept() {
    let rc = load_case("trap_constant_params");
    assert!(count(&rc.model, "Constant") >= 5);
    let mut m = rc.model.clone();
    fuse(&mut m, &FuseOptions::default()).unwrap();
    assert_eq!(
        count(&m, "Constant"),
        0,
        "the BN and weight Constant nodes are swept"
    );
    assert_eq!(m.graph().node.len(), 1);
}

#[test]
fn unnamed_nodes_form_one_conv_bn_relu_group() {
    let path = models_dir().join("conformance/constant_nodes/model.onnx");
    let mut m = qfold::onnx::load(path).unwrap();
    assert!(m.graph().node.iter().all(|n| n.name.is_empty()));
    let r = fuse(&mut m, &FuseOptions::default()).unwrap();
    assert_eq!(r.groups.len(), 1, "{r:#?}");
    assert_eq!(r.groups[0].kind, qfold::fusion::GroupKind::ConvBnRelu);
    assert_eq!(r.groups[0].nodes.len(), 3);
}

#[test]
fn module_paths_resolve_through_name_scopes_metadata() {
    // A dynamo-style export: node names carry no scope, the module path is in metadata.
    let rc = load_case("trap_conv1d_bn");
    let mut m = rc.model.clone();
    for (node, scopes) in [
        ("conv", "['', 'block', 'block.conv']"),
        ("bn", "['', 'block', 'block.bn']"),
    ] {
        let n = m
            .graph_mut()
            .node
            .iter_mut()
            .find(|n| n.name == node)
            .unwrap();
        let mut kv = qfold::onnx::proto::StringStringEntryProto::new();
        kv.key = "pkg.torch.onnx.name_scopes".into();
        kv.value = scopes.into();
        n.metadata_props.push(kv);
        n.name = format!("node_{node}_7");
    }
    let mut fused = m.clone();
    let r = fuse(
        &mut fused,
        &FuseOptions {
            only: vec![vec!["block.conv".into(), "block.bn".into()]],
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(r.groups[0].nodes, ["node_conv_7", "node_bn_7"]);
    assert_eq!(count(&fused, "BatchNormalization"), 0);
    let err = fuse(
        &mut m.clone(),
        &FuseOptions {
            only: vec![vec!["block.relu".into()]],
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("block.relu"), "{err}");
}
