//! PyTorch's test_fuse_eager.py, test by test, on the ONNX exports of its models. Each test
//! asserts structure (op types and counts where PyTorch asserts module types) and numbers: the
//! fused model in tract against PyTorch's own fuse_modules output, and against tract's run of
//! the original.

mod common;

use common::*;
use qfold::fusion::{fuse, FuseOptions, Fuser, GroupKind};
use qfold::graph::{Graph, Names, Patch};

fn eval_fuse(name: &str) -> (RefCase, qfold::onnx::Model, qfold::fusion::FuseReport) {
    let rc = load_case(name);
    let mut fused = rc.model.clone();
    let opts = FuseOptions {
        only: fuse_lists(&rc.provenance),
        ..FuseOptions::default()
    };
    let report = fuse(&mut fused, &opts).expect("the reference lists fuse");
    (rc, fused, report)
}

fn assert_matches_torch_and_original(rc: &RefCase, fused: &qfold::onnx::Model) {
    let out = run(fused, &rc.case);
    assert_close(
        &expected(&rc.case),
        &out,
        FUSION_TOL,
        "fused vs PyTorch fuse_modules",
    );
    let orig = run(&rc.model, &rc.case);
    assert_close(&orig, &out, FUSION_TOL, "fused vs original in tract");
    let unfused = read_pb(&rc.dir.join("unfused_output_0.pb"));
    assert_close(
        &[unfused],
        &out,
        FUSION_TOL,
        "fused vs PyTorch unfused eval",
    );
}

fn kinds(r: &qfold::fusion::FuseReport) -> Vec<GroupKind> {
    r.groups.iter().map(|g| g.kind).collect()
}

#[test]
fn test_fuse_module_train() {
    // fuse_modules_qat: groups recorded on the nodes, nothing folded, outputs bit-identical.
    let rc = load_case("fusion_model_for_fusion");
    let mut qat = rc.model.clone();
    let opts = FuseOptions {
        only: fuse_lists(&rc.provenance),
        qat: true,
        ..FuseOptions::default()
    };
    let r = fuse(&mut qat, &opts).unwrap();
    assert_eq!(kinds(&r), [GroupKind::ConvBnRelu, GroupKind::ConvBn]);
    assert!(r.groups.iter().all(|g| !g.folded));
    assert_eq!(count(&qat, "BatchNormalization"), 3);
    assert_eq!(
        group_of(node(&qat, "/conv1/Conv")).as_deref(),
        Some("/conv1/Conv+/bn1/BatchNormalization+/relu1/Relu")
    );
    assert_eq!(
        group_of(node(&qat, "/relu1/Relu")),
        group_of(node(&qat, "/bn1/BatchNormalization"))
    );
    assert_eq!(
        group_of(node(&qat, "/sub1/bn/BatchNormalization")).as_deref(),
        Some("/sub1/conv/Conv+/sub1/bn/BatchNormalization")
    );
    // sub2 (Conv + ReLU) is not in the lists: untouched, like nn.Conv2d / nn.ReLU in PyTorch.
    assert_eq!(group_of(node(&qat, "/sub2/conv/Conv")), None);
    assert_eq!(group_of(node(&qat, "/sub2/relu/Relu")), None);
    let a = run(&rc.model, &rc.case);
    let b = run(&qat, &rc.case);
    assert_eq!(a, b, "QAT fusion must not change a single bit");

    // Then the eval conversion folds the same groups.
    let (rc, fused, r) = eval_fuse("fusion_model_for_fusion");
    assert_eq!(kinds(&r), [GroupKind::ConvBnRelu, GroupKind::ConvBn]);
    assert_eq!(
        count(&fused, "BatchNormalization"),
        1,
        "bn3 is not in the lists"
    );
    assert_eq!(
        count(&fused, "Relu"),
        rc_count(&rc, "Relu"),
        "Relu nodes stay in the float graph"
    );
    assert_matches_torch_and_original(&rc, &fused);
}

fn rc_count(rc: &RefCase, op: &str) -> usize {
    count(&rc.model, op)
}

#[test]
fn test_fusion_sequential_model_eval() {
    let (rc, fused, r) = eval_fuse("fusion_sequential");
    assert_eq!(
        kinds(&r),
        [
            GroupKind::ConvRelu,
            GroupKind::ConvBnRelu,
            GroupKind::ConvBnRelu,
            GroupKind::ConvBnRelu,
            GroupKind::LinearRelu
        ]
    );
    assert_eq!(count(&fused, "BatchNormalization"), 0);
    assert_eq!(count(&fused, "Conv"), 4);
    assert_eq!(count(&fused, "Relu"), rc_count(&rc, "Relu"));
    for i in 0..3 {
        let conv = format!("/features/features.{i}/features.{i}.0/Conv");
        let relu = format!("/features/features.{i}/features.{i}.2/Relu");
        assert_eq!(group_of(node(&fused, &conv)), group_of(node(&fused, &relu)));
        assert!(group_of(node(&fused, &conv))
            .unwrap()
            .contains("BatchNormalization"));
    }
    assert_eq!(
        group_of(node(&fused, "/classifier/classifier.0/Gemm")).as_deref(),
        Some("/classifier/classifier.0/Gemm+/classifier/classifier.1/Relu")
    );
    assert_matches_torch_and_original(&rc, &fused);
}

#[test]
fn test_fusion_conv_with_bias() {
    let rc = load_case("fusion_conv_with_bias");
    // QAT: outputs equal the unfused reference exactly.
    let mut qat = rc.model.clone();
    let opts = FuseOptions {
        only: fuse_lists(&rc.provenance),
        qat: true,
        ..FuseOptions::default()
    };
    fuse(&mut qat, &opts).unwrap();
    assert_eq!(run(&rc.model, &rc.case), run(&qat, &rc.case));
    assert_eq!(count(&qat, "BatchNormalization"), 2);
    // Eval: the biased convolutions absorb the BN.
    let (rc, fused, r) = eval_fuse("fusion_conv_with_bias");
    assert_eq!(kinds(&r), [GroupKind::ConvBnRelu, GroupKind::ConvBn]);
    assert_eq!(count(&fused, "BatchNormalization"), 0);
    assert_eq!(node(&fused, "/conv1/Conv").input.len(), 3);
    assert_matches_torch_and_original(&rc, &fused);
}

#[test]
fn test_fusion_linear_bn_eval() {
    let (rc, fused, r) = eval_fuse("fusion_linear_bn");
    assert_eq!(kinds(&r), [GroupKind::LinearBn]);
    assert_eq!(count(&fused, "BatchNormalization"), 0);
    let gemm = node(&fused, "/fc/Gemm");
    assert_eq!(
        gemm.output,
        ["output"],
        "the fused Gemm produces the graph output"
    );
    assert_matches_torch_and_original(&rc, &fused);
}

#[test]
fn test_fusion_convtranspose_bn_eval() {
    let (rc, fused, r) = eval_fuse("fusion_convtranspose_bn");
    assert_eq!(kinds(&r), [GroupKind::ConvTransposeBn; 3]);
    assert_eq!(count(&fused, "BatchNormalization"), 0);
    assert_eq!(count(&fused, "ConvTranspose"), 3);
    assert_matches_torch_and_original(&rc, &fused);
}

/// The custom fuser of the reference test: replace the module by Identity.
struct ToIdentity;

impl Fuser for ToIdentity {
    fn name(&self) -> &str {
        "to_identity"
    }
    fn pattern(&self) -> Vec<String> {
        vec!["Gemm".into()]
    }
    fn fuse(&self, g: &Graph, chain: &[usize], _names: &mut Names) -> qfold::Result<Patch> {
        let gemm = g.node(chain[0]);
        let mut id = gemm.clone();
        id.op_type = "Identity".into();
        id.input.truncate(1);
        id.attribute.clear();
        let mut p = Patch::new("identity");
        p.replace_node(chain[0], id);
        Ok(p)
    }
}

#[test]
fn test_fuse_function_customization() {
    let rc = load_case("fusion_single_layer_linear");
    let mut m = rc.model.clone();
    let fc1 = rc.provenance["module_nodes"]["fc1"][0]
        .as_str()
        .unwrap()
        .to_string();
    let opts = FuseOptions {
        only: vec![vec!["fc1".into()]],
        fusers: vec![std::sync::Arc::new(ToIdentity)],
        ..FuseOptions::default()
    };
    let r = fuse(&mut m, &opts).unwrap();
    assert_eq!(r.groups[0].fuser.as_deref(), Some("to_identity"));
    assert_eq!(node(&m, &fc1).op_type, "Identity");
    assert_eq!(count(&m, "Gemm"), 0);
    let want = read_pb(&rc.dir.join("custom_fuser_output_0.pb"));
    assert_eq!(run(&m, &rc.case), [want]);
    // Without the custom fuser a lone Linear is not a pattern: an error, model unchanged.
    let mut m2 = rc.model.clone();
    let err = fuse(
        &mut m2,
        &FuseOptions {
            only: vec![vec!["fc1".into()]],
            ..FuseOptions::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("no fuser for Gemm"), "{err}");
    assert_eq!(m2, rc.model);
}

#[test]
fn test_forward_hooks_preserved() {
    // The fused node keeps the first node's name and inputs and produces the last node's
    // output, so what observed the chain's input and output still sees them.
    for qat in [false, true] {
        let rc = load_case("fusion_model_for_fusion");
        let orig = &rc.model;
        let conv1 = node(orig, "/conv1/Conv").clone();
        let bn1 = node(orig, "/bn1/BatchNormalization").clone();
        let relu1 = node(orig, "/relu1/Relu").clone();
        let sub_conv = node(orig, "/sub1/conv/Conv").clone();
        let sub_bn = node(orig, "/sub1/bn/BatchNormalization").clone();
        let mut m = orig.clone();
        fuse(
            &mut m,
            &FuseOptions {
                only: fuse_lists(&rc.provenance),
                qat,
                ..FuseOptions::default()
            },
        )
        .unwrap();
        let c = node(&m, "/conv1/Conv");
        assert_eq!(c.input[0], conv1.input[0]);
        let r = node(&m, "/relu1/Relu");
        assert_eq!(r.output, relu1.output);
        let s = node(&m, "/sub1/conv/Conv");
        assert_eq!(s.input[0], sub_conv.input[0]);
        if !qat {
            assert_eq!(c.output, bn1.output);
            assert_eq!(r.input[0], bn1.output[0]);
            assert_eq!(s.output, sub_bn.output);
            // No value_info or node refers to the removed intermediates.
            for gone in [&conv1.output[0], &sub_conv.output[0]] {
                assert!(m.graph().value_info.iter().all(|v| &v.name != gone));
                assert!(m.graph().node.iter().all(|n| !n.input.contains(gone)));
            }
        }
        assert_eq!(m.graph().output, orig.graph().output);
        Graph::of_model(&m).check().unwrap();
    }
}

#[test]
fn test_fuse_modules_with_nested_hooks() {
    let rc = load_case("fusion_sequential");
    let mut m = rc.model.clone();
    let r = fuse(
        &mut m,
        &FuseOptions {
            only: vec![vec![
                "features.0.0".into(),
                "features.0.1".into(),
                "features.0.2".into(),
            ]],
            ..FuseOptions::default()
        },
    )
    .unwrap();
    assert_eq!(kinds(&r), [GroupKind::ConvBnRelu]);
    assert!(r.groups[0].folded);
    assert_eq!(count(&m, "BatchNormalization"), 2);
    assert!(group_of(node(&m, "/features/features.0/features.0.0/Conv")).is_some());
    assert!(group_of(node(&m, "/features/features.1/features.1.0/Conv")).is_none());
    assert_close(
        &run(&rc.model, &rc.case),
        &run(&m, &rc.case),
        FUSION_TOL,
        "partial fusion",
    );
}

#[test]
fn automatic_mode_folds_every_bn_pytorch_folds() {
    for name in [
        "fusion_model_for_fusion",
        "fusion_sequential",
        "fusion_linear_bn",
        "fusion_conv_with_bias",
        "fusion_convtranspose_bn",
    ] {
        let rc = load_case(name);
        let mut m = rc.model.clone();
        let r = fuse(&mut m, &FuseOptions::default()).unwrap();
        let want = rc.provenance["bn_after_fuse_auto"].as_u64().unwrap() as usize;
        assert_eq!(count(&m, "BatchNormalization"), want, "{name}");
        assert_eq!(r.bn_after, want);
        assert_eq!(
            r.bn_before,
            rc.provenance["bn_count"].as_u64().unwrap() as usize
        );
        let unfused = read_pb(&rc.dir.join("unfused_output_0.pb"));
        assert_close(&[unfused], &run(&m, &rc.case), FUSION_TOL, name);
    }
}

#[test]
fn explicit_lists_that_are_not_chains_fail_and_change_nothing() {
    let rc = load_case("fusion_model_for_fusion");
    let cases: [(&[&str], &str); 4] = [
        (&["conv1", "relu1"], "not a chain"),
        (&["nope", "bn1"], "neither a node name nor a module path"),
        (
            &["conv1", "bn1", "relu1", "sub1.conv"],
            "no fuser for Conv -> BatchNormalization -> Relu -> Conv",
        ),
        (&["sub2.conv", "sub2.relu", "fc"], "not a chain"),
    ];
    for (list, want) in cases {
        let mut m = rc.model.clone();
        let opts = FuseOptions {
            only: vec![
                vec!["sub1.conv".into(), "sub1.bn".into()],
                list.iter().map(|s| s.to_string()).collect(),
            ],
            ..FuseOptions::default()
        };
        let err = fuse(&mut m, &opts).unwrap_err().to_string();
        assert!(err.contains(want), "{list:?}: {err}");
        assert_eq!(
            m, rc.model,
            "a failed explicit fusion leaves the model unchanged"
        );
    }
}

#[test]
fn fused_models_are_valid_and_round_trip() {
    let (_, fused, _) = eval_fuse("fusion_sequential");
    let dir = std::env::temp_dir().join(format!("qfold-fusion-rt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("fused.onnx");
    qfold::onnx::save(&fused, &p, &Default::default()).unwrap();
    let back = qfold::onnx::load(&p).unwrap();
    assert_eq!(back.proto, fused.proto);
    Graph::of_model(&back).check().unwrap();
    std::fs::remove_dir_all(&dir).ok();
}
