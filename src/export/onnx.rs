//! The inference network of one prediction strategy as an ONNX graph (opset 17, IR version 8).
//!
//! Input `image` `[N, C, S, S]` f32: the model's input in [0, 1] after decoding, resizing and the evaluation crop
//! (the metadata property `asge.input` says how, as `asge predict` does it). Output `logits` `[N, classes]`.
//! Inside the graph, exactly as the engine computes it (docs/method.md):
//! - the per-sample RMS norm `x / (sqrt(mean_{c,h,w} x^2) + e^-50)`;
//! - per layer: Conv 3x3 (pad 1, bias), Relu; the goodness where the strategy reads it: `y*y` reshaped to
//!   `[N, C, H*W]` times a constant `[H*W, P*P]` matrix whose column `(i, j)` holds `1/|bin_ij|` (`1` for the sum
//!   reduction) on the pixels of bin `(i, j)` (adaptive pooling's bins, overlapping ones included: a pixel in
//!   two bins has an entry in both columns), reshaped channel-major to `[N, C*P*P]`, then `g R + b` (Gemm);
//! - between layers: the 2x2 pool (AveragePool, or `sqrt(AveragePool(y*y))` for RMS pooling) and the RMS norm;
//! - fusion: the heads on the global average of each of layers 2..L's normalised outputs, summed.
//!
//! Layers after the one a strategy reads are left out (`best` on layer 3 of 7 exports three layers).

use super::proto::{self, field as f, Msg};
use crate::data::input::InputSpec;
use crate::eval::Strategy;
use crate::model::{GoodnessReduce, ModelSpec, Params, PoolKind, Tensor};

pub const OPSET: i64 = 17;
pub const IR_VERSION: i64 = 8;

/// A graph under construction: nodes, initializers, unique names.
struct Graph {
    nodes: Vec<Msg>,
    inits: Vec<Msg>,
    next: usize,
}

enum Attr {
    Int(i64),
    Ints(Vec<i64>),
}

impl Graph {
    fn name(&mut self, base: &str) -> String {
        self.next += 1;
        format!("{base}_{}", self.next)
    }

    fn node(&mut self, op: &str, inputs: &[&str], attrs: &[(&str, Attr)], out: Option<&str>) -> String {
        let out = out.map(String::from).unwrap_or_else(|| self.name(&op.to_ascii_lowercase()));
        let mut n = Msg::new();
        for i in inputs {
            n = n.str(f::NODE_INPUT, i);
        }
        n = n.str(f::NODE_OUTPUT, &out).str(f::NODE_NAME, &format!("{op}:{out}")).str(f::NODE_OP_TYPE, op);
        for (name, a) in attrs {
            let mut m = Msg::new().str(f::ATTR_NAME, name);
            m = match a {
                Attr::Int(v) => m.int(f::ATTR_I, *v).int(f::ATTR_TYPE, proto::ATTR_INT),
                Attr::Ints(vs) => {
                    let mut m = m;
                    for v in vs {
                        m = m.int(f::ATTR_INTS, *v);
                    }
                    m.int(f::ATTR_TYPE, proto::ATTR_INTS)
                }
            };
            n = n.msg(f::NODE_ATTRIBUTE, &m);
        }
        self.nodes.push(n);
        out
    }

    fn init_f32(&mut self, name: &str, dims: &[usize], data: &[f32]) -> String {
        assert_eq!(dims.iter().product::<usize>(), data.len(), "{name}: shape and data");
        let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.init_raw(name, dims, proto::FLOAT, &raw)
    }

    /// A model tensor as an initializer, by its name and shape in the parameter table.
    fn param(&mut self, spec: &ModelSpec, params: &Params, t: Tensor) -> String {
        self.init_f32(&t.name(), &t.shape(spec), params.get(t))
    }

    fn init_i64(&mut self, name: &str, data: &[i64]) -> String {
        let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.init_raw(name, &[data.len()], proto::INT64, &raw)
    }

    fn init_raw(&mut self, name: &str, dims: &[usize], dtype: i64, raw: &[u8]) -> String {
        let mut t = Msg::new();
        for &d in dims {
            t = t.int(f::TENSOR_DIMS, d as i64);
        }
        t = t.int(f::TENSOR_DATA_TYPE, dtype).str(f::TENSOR_NAME, name).bytes(f::TENSOR_RAW_DATA, raw);
        self.inits.push(t);
        name.to_string()
    }

    /// `x / (sqrt(mean_{c,h,w} x^2) + eps)`, per sample.
    fn rms_norm(&mut self, x: &str, eps: &str) -> String {
        let sq = self.node("Mul", &[x, x], &[], None);
        let ms =
            self.node("ReduceMean", &[&sq], &[("axes", Attr::Ints(vec![1, 2, 3])), ("keepdims", Attr::Int(1))], None);
        let rms = self.node("Sqrt", &[&ms], &[], None);
        let den = self.node("Add", &[&rms, eps], &[], None);
        self.node("Div", &[x, &den], &[], None)
    }
}

/// The `[H*W, P*P]` matrix that pools squared activations into the goodness cells: entry `(h*W + w, i*P + j)` is
/// `1/|bin_ij|` (or 1 for the sum) when pixel `(h, w)` lies in bin `(i, j)`.
pub fn pooling_matrix(h: usize, w: usize, p: usize, reduce: GoodnessReduce) -> Vec<f32> {
    let g = crate::model::PatchGrid::new(p, h, w);
    let cells = p * p;
    let mut m = vec![0.0f32; h * w * cells];
    for i in 0..p {
        for j in 0..p {
            let v = match reduce {
                GoodnessReduce::Mean => 1.0 / g.area(i, j) as f32,
                GoodnessReduce::Sum => 1.0,
            };
            for r in g.rows[i].0..g.rows[i].1 {
                for c in g.cols[j].0..g.cols[j].1 {
                    m[(r * w + c) * cells + i * p + j] = v;
                }
            }
        }
    }
    m
}

fn value_info(name: &str, elem: i64, dims: &[Result<usize, &str>]) -> Msg {
    let mut shape = Msg::new();
    for d in dims {
        let dim = match d {
            Ok(v) => Msg::new().int(f::DIM_VALUE, *v as i64),
            Err(p) => Msg::new().str(f::DIM_PARAM, p),
        };
        shape = shape.msg(f::SHAPE_DIM, &dim);
    }
    let tensor = Msg::new().int(f::TENSOR_TYPE_ELEM, elem).msg(f::TENSOR_TYPE_SHAPE, &shape);
    let ty = Msg::new().msg(f::TYPE_TENSOR, &tensor);
    Msg::new().str(f::VALUE_NAME, name).msg(f::VALUE_TYPE, &ty)
}

/// The ONNX model of `strategy` (`last`, `best` reading layer `best_layer` (0-based), or `fusion`).
pub fn build(
    spec: &ModelSpec,
    params: &Params,
    input: &InputSpec,
    strategy: Strategy,
    best_layer: usize,
    doc: &str,
) -> Vec<u8> {
    let mut g = Graph { nodes: Vec::new(), inits: Vec::new(), next: 0 };
    let n_layers = spec.layers.len();
    let (upto, read) = match strategy {
        Strategy::Best => (best_layer, Some(best_layer)),
        Strategy::Fusion => (n_layers - 1, None),
        _ => (n_layers - 1, Some(n_layers - 1)),
    };
    let eps = g.init_f32("rms_eps", &[], &[crate::kernel_abi::RMS_EPS]);
    let mut x = g.rms_norm("image", &eps);
    let mut head_logits = Vec::new();
    let classes = spec.classes;
    for (i, l) in spec.layers.iter().enumerate().take(upto + 1) {
        let w = g.param(spec, params, Tensor::ConvW(i));
        let b = g.param(spec, params, Tensor::ConvB(i));
        let z = g.node(
            "Conv",
            &[&x, &w, &b],
            &[
                ("kernel_shape", Attr::Ints(vec![3, 3])),
                ("pads", Attr::Ints(vec![1, 1, 1, 1])),
                ("strides", Attr::Ints(vec![1, 1])),
            ],
            None,
        );
        let y = g.node("Relu", &[&z], &[], None);
        if read == Some(i) {
            let sq = g.node("Mul", &[&y, &y], &[], None);
            let s1 = g.init_i64(&format!("layers.{i}.shape_chw"), &[0, l.c_out as i64, (l.h * l.w) as i64]);
            let flat = g.node("Reshape", &[&sq, &s1], &[], None);
            let m = g.init_f32(
                &format!("layers.{i}.goodness_pool"),
                &[l.h * l.w, l.p * l.p],
                &pooling_matrix(l.h, l.w, l.p, spec.goodness),
            );
            let cells = g.node("MatMul", &[&flat, &m], &[], None);
            let s2 = g.init_i64(&format!("layers.{i}.shape_d"), &[0, l.goodness_dim() as i64]);
            let good = g.node("Reshape", &[&cells, &s2], &[], None);
            let r = g.param(spec, params, Tensor::ProjW(i));
            let rb = g.param(spec, params, Tensor::ProjB(i));
            g.node("Gemm", &[&good, &r, &rb], &[], Some("logits"));
            break;
        }
        let pooled = if l.pool {
            let k = [("kernel_shape", Attr::Ints(vec![2, 2])), ("strides", Attr::Ints(vec![2, 2]))];
            match spec.pool_kind {
                PoolKind::Avg => g.node("AveragePool", &[&y], &k, None),
                PoolKind::Rms => {
                    let sq = g.node("Mul", &[&y, &y], &[], None);
                    let m = g.node("AveragePool", &[&sq], &k, None);
                    g.node("Sqrt", &[&m], &[], None)
                }
            }
        } else {
            y
        };
        x = g.rms_norm(&pooled, &eps);
        if read.is_none() && i >= 1 {
            let feat =
                g.node("ReduceMean", &[&x], &[("axes", Attr::Ints(vec![2, 3])), ("keepdims", Attr::Int(0))], None);
            let hw = g.param(spec, params, Tensor::HeadW(i));
            let hb = g.param(spec, params, Tensor::HeadB(i));
            head_logits.push(g.node("Gemm", &[&feat, &hw, &hb], &[("transB", Attr::Int(1))], None));
        }
    }
    if read.is_none() {
        let refs: Vec<&str> = head_logits.iter().map(String::as_str).collect();
        g.node("Sum", &refs, &[], Some("logits"));
    }
    let mut graph = Msg::new().str(f::GRAPH_NAME, &format!("asge_{}", spec.arch));
    for n in &g.nodes {
        graph = graph.msg(f::GRAPH_NODE, n);
    }
    for t in &g.inits {
        graph = graph.msg(f::GRAPH_INITIALIZER, t);
    }
    let s = spec.image_size;
    graph = graph
        .msg(f::GRAPH_INPUT, &value_info("image", proto::FLOAT, &[Err("N"), Ok(spec.in_channels), Ok(s), Ok(s)]))
        .msg(f::GRAPH_OUTPUT, &value_info("logits", proto::FLOAT, &[Err("N"), Ok(classes)]));
    let opset = Msg::new().str(f::OPSET_DOMAIN, "").int(f::OPSET_VERSION, OPSET);
    let strategy_name = serde_json::to_value(strategy).ok().and_then(|v| v.as_str().map(String::from));
    let props = [
        ("asge.strategy", strategy_name.unwrap_or_default()),
        ("asge.layer", read.map(|l| (l + 1).to_string()).unwrap_or_else(|| format!("2..{n_layers}"))),
        ("asge.model", serde_json::to_string(spec).unwrap_or_default()),
        ("asge.input", serde_json::to_string(input).unwrap_or_default()),
    ];
    let mut model = Msg::new()
        .int(f::MODEL_IR_VERSION, IR_VERSION)
        .msg(f::MODEL_OPSET_IMPORT, &opset)
        .str(f::MODEL_PRODUCER_NAME, "asge")
        .str(f::MODEL_PRODUCER_VERSION, env!("CARGO_PKG_VERSION"))
        .str(f::MODEL_DOC_STRING, doc)
        .msg(f::MODEL_GRAPH, &graph);
    for (k, v) in props {
        model = model.msg(f::MODEL_METADATA_PROPS, &Msg::new().str(f::ENTRY_KEY, k).str(f::ENTRY_VALUE, &v));
    }
    model.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_matrix_covers_overlapping_bins() {
        // H = W = 7, P = 2: bins (0,4) and (3,7) overlap on row/column 3.
        let m = pooling_matrix(7, 7, 2, GoodnessReduce::Mean);
        let col = |pix: usize| -> Vec<f32> { m[pix * 4..pix * 4 + 4].to_vec() };
        assert_eq!(col(0), vec![1.0 / 16.0, 0.0, 0.0, 0.0]);
        // Pixel (3, 3) lies in all four cells.
        assert_eq!(col(3 * 7 + 3), vec![1.0 / 16.0; 4]);
        // Every column sums to 1 for the mean.
        for c in 0..4 {
            let s: f32 = (0..49).map(|p| m[p * 4 + c]).sum();
            assert!((s - 1.0).abs() < 1e-6);
        }
    }
}
