//! Rewrite-engine benchmark (not a test): generates Conv -> BatchNormalization -> Relu chains and
//! QDQ Conv chains of about 1k, 10k, 50k and 100k nodes in memory and times, in process,
//! `fusion::fuse`, quantization's plan + materialize (ranges given, no calibration run) and
//! `qoperator::convert`. Medians of `QFOLD_BENCH_RUNS` runs (default 5); each run works on a
//! fresh copy of the input model, made (and dropped) outside the timed part.
//!
//! ```text
//! cargo bench --bench engine                  # all sizes
//! QFOLD_BENCH_SIZES=1000,10000 cargo bench --bench engine
//! ```
//!
//! Whole-process times (load and save included) come from `tools/bench_engine.py`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ndarray::{ArrayD, IxDyn};
use qfold::onnx::proto::{
    attribute_proto::AttributeType, tensor_shape_proto, type_proto, AttributeProto, GraphProto,
    ModelProto, NodeProto, OperatorSetIdProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use qfold::onnx::{ElemType, Model, TensorData};

/// The allocator the qfold binary uses (see Cargo.toml).
#[cfg(all(unix, not(target_os = "macos")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const C: usize = 4;

fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    let mut n = NodeProto::new();
    n.op_type = op.into();
    n.name = name.into();
    n.input = inputs.iter().map(|s| s.to_string()).collect();
    n.output = outputs.iter().map(|s| s.to_string()).collect();
    n
}

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::INTS.into();
    a.ints = v.to_vec();
    a
}

fn int(name: &str, v: i64) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::INT.into();
    a.i = v;
    a
}

fn value_info(name: &str, shape: &[usize]) -> ValueInfoProto {
    let mut v = ValueInfoProto::new();
    v.name = name.into();
    let mut t = type_proto::Tensor::new();
    t.elem_type = ElemType::F32.onnx_code();
    let mut s = TensorShapeProto::new();
    for &d in shape {
        let mut dim = tensor_shape_proto::Dimension::new();
        dim.value = Some(tensor_shape_proto::dimension::Value::DimValue(d as i64));
        s.dim.push(dim);
    }
    t.shape = Some(s).into();
    let mut tp = TypeProto::new();
    tp.value = Some(type_proto::Value::TensorType(t));
    v.type_ = Some(tp).into();
    v
}

fn model(g: GraphProto) -> Model {
    let mut m = ModelProto::new();
    m.ir_version = 8;
    let mut op = OperatorSetIdProto::new();
    op.version = 13;
    m.opset_import.push(op);
    m.graph = Some(g).into();
    Model::new(m)
}

fn f32s(shape: &[usize], seed: usize) -> TensorData {
    let n: usize = shape.iter().product();
    let v = (0..n)
        .map(|k| 0.5 + ((k * 7 + seed * 13) % 17) as f32 / 17.0)
        .collect();
    TensorData::F32(ArrayD::from_shape_vec(IxDyn(shape), v).unwrap())
}

/// Conv -> BatchNormalization -> Relu, `layers` times (3 nodes a layer).
fn conv_bn_relu_chain(layers: usize) -> Model {
    let mut g = GraphProto::new();
    g.name = "chain".into();
    g.input.push(value_info("x", &[1, C, 8, 8]));
    let mut x = "x".to_string();
    for i in 0..layers {
        let (w, c, n, r) = (
            format!("w{i}"),
            format!("c{i}"),
            format!("n{i}"),
            format!("r{i}"),
        );
        g.initializer.push(f32s(&[C, C, 3, 3], i).to_proto(&w));
        for p in ["s", "b", "m", "v"] {
            g.initializer
                .push(f32s(&[C], i).to_proto(&format!("{p}{i}")));
        }
        let mut conv = node("Conv", &format!("conv{i}"), &[&x, &w], &[&c]);
        conv.attribute.push(ints("pads", &[1, 1, 1, 1]));
        g.node.push(conv);
        let params: Vec<String> = ["s", "b", "m", "v"]
            .iter()
            .map(|p| format!("{p}{i}"))
            .collect();
        g.node.push(node(
            "BatchNormalization",
            &format!("bn{i}"),
            &[&c, &params[0], &params[1], &params[2], &params[3]],
            &[&n],
        ));
        g.node.push(node("Relu", &format!("relu{i}"), &[&n], &[&r]));
        x = r;
    }
    g.output.push(value_info(&x, &[1, C, 8, 8]));
    model(g)
}

/// Q -> (DQ -> Conv(DQ(w)) -> Relu -> Q) x `layers` -> DQ (5 nodes a layer).
fn qdq_chain(layers: usize) -> Model {
    let mut g = GraphProto::new();
    g.name = "qdq".into();
    g.input.push(value_info("x", &[1, C, 8, 8]));
    g.initializer
        .push(TensorData::F32(ndarray::arr0(0.05f32).into_dyn()).to_proto("as"));
    g.initializer
        .push(TensorData::U8(ndarray::arr0(0u8).into_dyn()).to_proto("az"));
    g.node.push(node(
        "QuantizeLinear",
        "q_in",
        &["x", "as", "az"],
        &["q_in"],
    ));
    let mut q = "q_in".to_string();
    for i in 0..layers {
        let w: Vec<i8> = (0..C * C * 9).map(|k| ((k * 31 + i) % 255) as i8).collect();
        g.initializer.push(
            TensorData::I8(ArrayD::from_shape_vec(IxDyn(&[C, C, 3, 3]), w).unwrap())
                .to_proto(&format!("wq{i}")),
        );
        g.initializer.push(
            TensorData::F32(ArrayD::from_elem(IxDyn(&[C]), 0.01f32)).to_proto(&format!("ws{i}")),
        );
        g.initializer
            .push(TensorData::I8(ArrayD::from_elem(IxDyn(&[C]), 0i8)).to_proto(&format!("wz{i}")));
        let (xd, wd, c, r, qo) = (
            format!("xd{i}"),
            format!("wd{i}"),
            format!("c{i}"),
            format!("r{i}"),
            format!("q{i}"),
        );
        g.node.push(node(
            "DequantizeLinear",
            &format!("dqx{i}"),
            &[&q, "as", "az"],
            &[&xd],
        ));
        let mut dqw = node(
            "DequantizeLinear",
            &format!("dqw{i}"),
            &[&format!("wq{i}"), &format!("ws{i}"), &format!("wz{i}")],
            &[&wd],
        );
        dqw.attribute.push(int("axis", 0));
        g.node.push(dqw);
        let mut conv = node("Conv", &format!("conv{i}"), &[&xd, &wd], &[&c]);
        conv.attribute.push(ints("pads", &[1, 1, 1, 1]));
        g.node.push(conv);
        g.node.push(node("Relu", &format!("relu{i}"), &[&c], &[&r]));
        g.node.push(node(
            "QuantizeLinear",
            &format!("q{i}"),
            &[&r, "as", "az"],
            &[&qo],
        ));
        q = qo;
    }
    g.node.push(node(
        "DequantizeLinear",
        "dq_out",
        &[&q, "as", "az"],
        &["y"],
    ));
    g.output.push(value_info("y", &[1, C, 8, 8]));
    model(g)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Median time of `f` on a fresh `setup()` value: the setup (cloning the input model) and the
/// drop of what `f` leaves are not timed.
fn time<I, T>(
    runs: usize,
    mut setup: impl FnMut() -> I,
    mut f: impl FnMut(&mut I) -> T,
) -> Duration {
    median(
        (0..runs)
            .map(|_| {
                let mut input = setup();
                let t = Instant::now();
                let out = std::hint::black_box(f(&mut input));
                let elapsed = t.elapsed();
                drop(out);
                drop(input);
                elapsed
            })
            .collect(),
    )
}

fn main() {
    let runs: usize = std::env::var("QFOLD_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let sizes: Vec<usize> = std::env::var("QFOLD_BENCH_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000, 10_000, 50_000, 100_000]);
    let opts = qfold::quant::QuantizeOptions::default();
    println!("| nodes | fuse | plan + materialize | nodes (QDQ) | convert |");
    println!("|---|---|---|---|---|");
    for &n in &sizes {
        let chain = conv_bn_relu_chain(n.div_ceil(3));
        let fuse = time(
            runs,
            || chain.clone(),
            |m| qfold::fusion::fuse(m, &Default::default()).unwrap(),
        );
        let mut fused = chain.clone();
        qfold::fusion::fuse(&mut fused, &Default::default()).unwrap();
        let plan_opts = opts.plan_options();
        let quantize = time(
            runs,
            || fused.clone(),
            |q| {
                let plan = qfold::quant::plan::plan(q, &plan_opts).unwrap();
                let ranges: BTreeMap<String, (f32, f32)> = plan
                    .calibrated_values()
                    .into_iter()
                    .map(|v| (v, (0.0, 4.0)))
                    .collect();
                qfold::quant::qdq::materialize(q, &plan, &ranges, &opts.qdq_options()).unwrap()
            },
        );
        let qdq = qdq_chain(n.div_ceil(5));
        let qdq_nodes = qdq.graph().node.len();
        let convert = time(
            runs,
            || qdq.clone(),
            |m| qfold::quant::qoperator::convert(m).unwrap(),
        );
        println!(
            "| {} | {:.3} s | {:.3} s | {qdq_nodes} | {:.3} s |",
            chain.graph().node.len(),
            fuse.as_secs_f64(),
            quantize.as_secs_f64(),
            convert.as_secs_f64()
        );
    }
}
