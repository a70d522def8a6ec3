//! Structure of each adapter's output and the refusals; the numbers (upgraded model in tract
//! against ONNX Runtime at the old opset) are in `tests/opset_upgrade.rs`.

use super::*;
use crate::graph::testing::*;
use crate::onnx::attr;
use crate::onnx::proto::GraphProto;

fn at(mut m: Model, v: i64) -> Model {
    m.proto.opset_import[0].version = v;
    m
}

fn one(op: &str, attrs: Vec<crate::onnx::proto::AttributeProto>, opset: i64) -> Model {
    at(
        model(
            vec![node(op, "n", &["x"], &["y"], attrs)],
            vec![],
            value_info("x", ElemType::F32, &[1, 3, 4, 5]),
            "y",
        ),
        opset,
    )
}

fn err(m: &Model, to: i64) -> String {
    let mut up = m.clone();
    let e = upgrade(&mut up, to).unwrap_err().to_string();
    assert_eq!(up.proto, m.proto, "unchanged on failure");
    e
}

fn the_node(m: &Model) -> &NodeProto {
    node_named(m, "n")
}

#[test]
fn downgrade_old_sources_and_new_targets_are_refused() {
    let m = one("Relu", vec![], 11);
    assert!(err(&m, 10).contains("downgrade"), "{}", err(&m, 10));
    assert!(err(&one("Relu", vec![], 6), 13).contains("from opset 7 on"));
    assert!(err(&m, 19).contains("opset 18 at most"));
    let mut same = m.clone();
    let r = upgrade(&mut same, 11).unwrap();
    assert_eq!((r.from, r.to, r.rewritten.len()), (11, 11, 0));
}

#[test]
fn an_op_without_adapter_is_named_with_the_adapted_ops() {
    let m = one("ImageScaler", vec![float("scale", 2.0)], 8);
    let e = err(&m, 13);
    assert!(
        e.contains("node 'n' (ImageScaler)") && e.contains("removed") && e.contains("Clip"),
        "{e}"
    );
    // Crossing nothing it changed at, the op is left alone.
    let mut up = one("ImageScaler", vec![float("scale", 2.0)], 7);
    upgrade(&mut up, 9).unwrap();
    assert_eq!(up.opset(), Some(9));
}

#[test]
fn clip_bounds_become_inputs_of_the_input_type() {
    let mut m = one("Clip", vec![float("max", 6.0)], 10);
    let r = upgrade(&mut m, 11).unwrap();
    assert_eq!(r.by_op.get("Clip"), Some(&1));
    let n = the_node(&m);
    assert!(n.attribute.is_empty());
    assert_eq!(n.input.len(), 3);
    assert_eq!(n.input[1], "", "no min: absent");
    assert_eq!(
        init(&m, &n.input[2])
            .to_f64()
            .iter()
            .copied()
            .collect::<Vec<_>>(),
        [6.0]
    );
    assert_eq!(init(&m, &n.input[2]).elem_type(), ElemType::F32);
    // A Clip-6 node with inputs is malformed: named.
    let bad = at(
        model(
            vec![node("Clip", "n", &["x", "lo"], &["y"], vec![])],
            vec![("lo", f32_scalar(0.0))],
            value_info("x", ElemType::F32, &[2]),
            "y",
        ),
        10,
    );
    assert!(err(&bad, 13).contains("node 'n' (Clip): it has 2 inputs"));
}

#[test]
fn pad_slice_topk_move_their_attributes_to_inputs() {
    let mut m = one(
        "Pad",
        vec![ints("pads", &[0, 0, 1, 2, 0, 0, 1, 2]), float("value", 1.5)],
        9,
    );
    upgrade(&mut m, 13).unwrap();
    let n = the_node(&m).clone();
    assert_eq!(n.input.len(), 3);
    assert_eq!(
        init(&m, &n.input[1]).to_i64().unwrap(),
        [0, 0, 1, 2, 0, 0, 1, 2]
    );
    assert_eq!(
        init(&m, &n.input[2])
            .to_f64()
            .iter()
            .copied()
            .collect::<Vec<_>>(),
        [1.5]
    );
    let mut m = one(
        "Pad",
        vec![
            ints("pads", &[0, 0, 1, 2, 0, 0, 1, 2]),
            string("mode", "reflect"),
        ],
        9,
    );
    upgrade(&mut m, 11).unwrap();
    assert_eq!(
        the_node(&m).input.len(),
        2,
        "no constant_value in reflect mode"
    );
    assert!(err(&one("Pad", vec![ints("pads", &[1, 1])], 9), 11).contains("2 pads for a rank-4"));

    let mut m = one(
        "Slice",
        vec![ints("starts", &[1]), ints("ends", &[3]), ints("axes", &[2])],
        9,
    );
    upgrade(&mut m, 10).unwrap();
    let n = the_node(&m).clone();
    assert!(n.attribute.is_empty());
    let got: Vec<Vec<i64>> = n.input[1..]
        .iter()
        .map(|t| init(&m, t).to_i64().unwrap())
        .collect();
    assert_eq!(got, [vec![1], vec![3], vec![2]]);

    let mut m = one("TopK", vec![int("k", 2), int("axis", 3)], 9);
    upgrade(&mut m, 13).unwrap();
    let n = the_node(&m).clone();
    assert_eq!(init(&m, &n.input[1]).to_i64().unwrap(), [2]);
    assert_eq!(n.attribute.len(), 1);
}

#[test]
fn dropout_ratio_becomes_an_input_and_a_used_mask_is_refused() {
    let mut m = one("Dropout", vec![float("ratio", 0.3)], 9);
    m.graph_mut().node[0].output.push("mask".into());
    let r = upgrade(&mut m.clone(), 12).unwrap();
    assert_eq!(r.rewritten.len(), 1);
    let mut up = m.clone();
    upgrade(&mut up, 12).unwrap();
    let n = the_node(&up);
    assert_eq!(n.output, ["y"], "the unused mask is dropped");
    assert_eq!(n.input.len(), 2);
    add_output(&mut m, "mask");
    assert!(err(&m, 12).contains("its mask 'mask' is used"));
    // From 10 the mask is bool already, and at 11 the ratio is still an attribute.
    let mut m = one("Dropout", vec![float("ratio", 0.3)], 10);
    let r = upgrade(&mut m, 11).unwrap();
    assert!(r.rewritten.is_empty());
}

#[test]
fn batch_normalization_spatial_is_dropped_or_refused() {
    let params = || {
        vec![
            ("s", f32v(&[1.0, 2.0, 3.0])),
            ("b", f32v(&[0.0, 0.1, 0.2])),
            ("mu", f32v(&[0.5, 0.5, 0.5])),
            ("var", f32v(&[1.0, 1.0, 1.0])),
        ]
    };
    let bn = |spatial: i64, shape: &[usize]| {
        at(
            model(
                vec![node(
                    "BatchNormalization",
                    "n",
                    &["x", "s", "b", "mu", "var"],
                    &["y"],
                    vec![int("spatial", spatial), int("is_test", 1)],
                )],
                params(),
                value_info("x", ElemType::F32, shape),
                "y",
            ),
            7,
        )
    };
    let mut m = bn(1, &[1, 3, 2, 2]);
    let r = upgrade(&mut m, 13).unwrap();
    assert!(the_node(&m).attribute.is_empty(), "{r:?}");
    let mut m = bn(0, &[4, 3]);
    upgrade(&mut m, 9).unwrap();
    assert!(the_node(&m).attribute.is_empty());
    assert!(err(&bn(0, &[1, 3, 2, 2]), 9).contains("spatial = 0"));
    // Below 9 the node is left as it is.
    let mut m = bn(0, &[1, 3, 2, 2]);
    upgrade(&mut m, 8).unwrap();
    assert_eq!(the_node(&m).attribute.len(), 2);
}

#[test]
fn upsample_becomes_resize_with_the_opset_10_rounding() {
    let up = |opset| {
        one(
            "Upsample",
            vec![floats_attr("scales", &[1.0, 1.0, 2.0, 1.5])],
            opset,
        )
    };
    // 7 -> 9: scales to an input, still Upsample.
    let mut m = up(7);
    upgrade(&mut m, 9).unwrap();
    let n = the_node(&m).clone();
    assert_eq!((n.op_type.as_str(), n.input.len()), ("Upsample", 2));
    assert_eq!(init(&m, &n.input[1]).shape(), [4]);
    // 8 -> 10: Resize-10, (x, scales).
    let mut m = up(8);
    upgrade(&mut m, 10).unwrap();
    let n = the_node(&m).clone();
    assert_eq!((n.op_type.as_str(), n.input.len()), ("Resize", 2));
    // 8 -> 11: Resize(x, roi, scales), asymmetric, floor.
    let mut m = up(8);
    upgrade(&mut m, 11).unwrap();
    let n = the_node(&m).clone();
    assert_eq!(n.input.len(), 3);
    assert!(init(&m, &n.input[1]).is_empty());
    let s = |name: &str| attr::string(&n, name).unwrap().unwrap();
    assert_eq!(s("coordinate_transformation_mode"), "asymmetric");
    assert_eq!(s("nearest_mode"), "floor");
    assert_eq!(s("mode"), "nearest");
    // 8 -> 13: no roi.
    let mut m = up(8);
    upgrade(&mut m, 13).unwrap();
    assert_eq!(the_node(&m).input[1], "");
}

#[test]
fn resize_10_nearest_rounding_follows_the_scales() {
    let resize = |scales: &[f32], mode: &str| {
        at(
            model(
                vec![node(
                    "Resize",
                    "n",
                    &["x", "scales"],
                    &["y"],
                    vec![string("mode", mode)],
                )],
                vec![("scales", f32v(scales))],
                value_info("x", ElemType::F32, &[1, 3, 4, 5]),
                "y",
            ),
            10,
        )
    };
    let nearest_mode = |scales: &[f32]| {
        let mut m = resize(scales, "nearest");
        upgrade(&mut m, 13).unwrap();
        attr::string(the_node(&m), "nearest_mode").unwrap().unwrap()
    };
    assert_eq!(nearest_mode(&[1.0, 1.0, 2.0, 1.5]), "floor");
    assert_eq!(nearest_mode(&[1.0, 1.0, 0.6, 0.75]), "ceil");
    assert_eq!(
        nearest_mode(&[1.0, 1.0, 0.5, 1.5]),
        "floor",
        "0.5 lands on whole pixels"
    );
    let e = err(&resize(&[1.0, 1.0, 0.6, 1.5], "nearest"), 13);
    assert!(e.contains("enlarge one axis and shrink another"), "{e}");
    let mut m = resize(&[1.0, 1.0, 0.6, 1.5], "linear");
    upgrade(&mut m, 13).unwrap();
    assert!(attr::find(the_node(&m), "nearest_mode").is_none());
}

#[test]
fn softmax_over_an_inner_axis_is_flattened_and_reshaped() {
    let mut m = one("Softmax", vec![int("axis", 1)], 11);
    let r = upgrade(&mut m, 13).unwrap();
    assert_eq!(ops(&m), ["Shape", "Flatten", "Softmax", "Reshape"], "{r:?}");
    let n = the_node(&m);
    assert_eq!(attr::int(n, "axis", 0).unwrap(), -1);
    assert_eq!(m.graph().node[3].output, ["y"]);
    let mut m = one("LogSoftmax", vec![int("axis", 3)], 12);
    upgrade(&mut m, 13).unwrap();
    assert_eq!(ops(&m), ["LogSoftmax"]);
    let sample = sample("x", &[1, 3, 4, 5], seq(60, 1));
    for op in ["Softmax", "LogSoftmax", "Hardmax"] {
        for axis in [0, 1, 2, 3] {
            let a = one(op, vec![int("axis", axis)], 12);
            let mut b = a.clone();
            upgrade(&mut b, 13).unwrap();
            // tract at opset 12 coerces to 2-D as ONNX did.
            assert_eq!(
                run_f64(&a, &sample),
                run_f64(&b, &sample),
                "{op} axis {axis}"
            );
        }
    }
}

#[test]
fn scatter_is_renamed_and_roi_align_keeps_its_old_default() {
    let m = at(
        model(
            vec![node(
                "Scatter",
                "n",
                &["x", "i", "u"],
                &["y"],
                vec![int("axis", 1)],
            )],
            vec![
                (
                    "i",
                    TensorData::I64(ArrayD::from_shape_vec(IxDyn(&[1, 1]), vec![1]).unwrap()),
                ),
                ("u", f32t(&[1, 1], vec![5.0])),
            ],
            value_info("x", ElemType::F32, &[2, 3]),
            "y",
        ),
        9,
    );
    let mut up = m.clone();
    upgrade(&mut up, 11).unwrap();
    assert_eq!(the_node(&up).op_type, "ScatterElements");
    let mut m = one("RoiAlign", vec![], 10);
    upgrade(&mut m, 16).unwrap();
    assert_eq!(
        attr::string(the_node(&m), "coordinate_transformation_mode")
            .unwrap()
            .as_deref(),
        Some("output_half_pixel")
    );
}

#[test]
fn reduce_axes_move_at_13_and_18_and_split_gets_num_outputs() {
    let mut m = one("ReduceMean", vec![ints("axes", &[2, 3])], 13);
    upgrade(&mut m, 17).unwrap();
    assert_eq!(the_node(&m).input.len(), 1, "ReduceMean's axes move at 18");
    upgrade(&mut m, 18).unwrap();
    assert_eq!(init(&m, &the_node(&m).input[1]).to_i64().unwrap(), [2, 3]);
    let mut m = at(
        model(
            vec![node(
                "Split",
                "n",
                &["x"],
                &["a", "b"],
                vec![int("axis", 2)],
            )],
            vec![],
            value_info("x", ElemType::F32, &[1, 3, 4, 5]),
            "a",
        ),
        11,
    );
    upgrade(&mut m, 18).unwrap();
    assert_eq!(attr::int(the_node(&m), "num_outputs", 0).unwrap(), 2);
}

#[test]
fn a_changed_op_inside_a_subgraph_is_named() {
    let mut body = GraphProto::new();
    body.node.push(node(
        "Clip",
        "inner",
        &["x"],
        &["z"],
        vec![float("min", 0.0)],
    ));
    body.output.push(untyped("z"));
    let mut a = crate::onnx::proto::AttributeProto::new();
    a.name = "then_branch".into();
    a.type_ = crate::onnx::proto::attribute_proto::AttributeType::GRAPH.into();
    a.g = Some(body).into();
    let mut m = one("Relu", vec![], 10);
    let mut iff = node("If", "cond", &["c"], &["w"], vec![a]);
    iff.attribute[0].name = "then_branch".into();
    m.graph_mut().node.push(iff);
    let e = err(&m, 11);
    assert!(
        e.contains("node 'inner' (Clip) in a subgraph of node 'cond'"),
        "{e}"
    );
}

#[test]
fn ir_3_models_declare_the_new_initializers_as_inputs() {
    let mut m = one("TopK", vec![int("k", 2)], 9);
    m.proto.ir_version = 3;
    upgrade(&mut m, 10).unwrap();
    let k = the_node(&m).input[1].clone();
    assert!(m.graph().input.iter().any(|v| v.name == k));
    let g = Graph::of_model(&m);
    assert!(
        g.constant(&k).unwrap().is_some(),
        "still a constant at IR 3"
    );
}

fn floats_attr(name: &str, v: &[f32]) -> crate::onnx::proto::AttributeProto {
    let mut a = crate::onnx::proto::AttributeProto::new();
    a.name = name.into();
    a.type_ = crate::onnx::proto::attribute_proto::AttributeType::FLOATS.into();
    a.floats = v.to_vec();
    a
}
