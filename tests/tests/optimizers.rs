//! Optimiser steps against `fixtures/optim/optim.json`, written by
//! `fixtures/optim/gen.py` (NumPy float64) from the update rules alone.
//! Every case runs through `Optimizer::step` and the `ParamVisitor` path a
//! model uses: dense tensors for SGD, Adam and Adagrad; sparse tables with
//! touched rows for the lazy variants; SGD at learning rate 1 to observe
//! the clipped gradient.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use negcache::layers::ParamVisitor;
use negcache::optim::{Optimizer, OptimizerKind};
use serde_json::Value;

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn f(v: &Value, k: &str) -> f32 {
    v[k].as_f64().unwrap() as f32
}

/// One parameter tensor with its gradient and two state slots.
struct Tensor {
    value: Vec<f32>,
    grad: Vec<f32>,
    state: [Vec<f32>; 2],
    touched: Option<Vec<bool>>,
    cols: usize,
}

impl Tensor {
    fn show(&mut self, v: &mut dyn ParamVisitor) {
        let [a, b] = &mut self.state;
        let mut st: [&mut [f32]; 2] = [a, b];
        match &self.touched {
            None => v.dense(&mut self.value, &mut self.grad, &mut st),
            Some(t) => v.sparse(self.cols, &mut self.value, &mut self.grad, &mut st, t),
        }
    }
}

#[test]
fn optimiser_steps_match_the_independent_reference() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/optim/optim.json");
    let root: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(root["format"], "negcache-optim-v1");
    let mut checked = std::collections::BTreeMap::<String, usize>::new();
    for case in root["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let kind = case["optimizer"].as_str().unwrap();
        let h = &case["hyper"];
        let (abs, rel) = (f(&case["tolerance"], "abs"), f(&case["tolerance"], "rel"));
        let (opt_kind, clip, sparse) = match kind {
            "sgd" => {
                (OptimizerKind::Sgd { momentum: f(h, "momentum"), weight_decay: f(h, "weight_decay") }, 0.0, false)
            }
            "adam" | "lazy_adam_rows" => (
                OptimizerKind::Adam {
                    beta1: f(h, "beta1"),
                    beta2: f(h, "beta2"),
                    eps: f(h, "eps"),
                    weight_decay: h.get("weight_decay").map_or(0.0, |x| x.as_f64().unwrap() as f32),
                },
                0.0,
                kind.starts_with("lazy"),
            ),
            "adagrad" | "lazy_adagrad_rows" => (
                OptimizerKind::Adagrad { eps: f(h, "eps"), initial_accumulator: f(h, "initial_accumulator") },
                0.0,
                kind.starts_with("lazy"),
            ),
            "clip_global_norm" => (OptimizerKind::Sgd { momentum: 0.0, weight_decay: 0.0 }, f(h, "max_norm"), false),
            other => panic!("{name}: unknown optimiser {other}"),
        };
        let grads: Vec<Vec<f32>> = case["grads"].as_array().unwrap().iter().map(floats).collect();
        let n = grads[0].len();
        let params0 = floats(&case["params0"]);
        let is_clip = kind == "clip_global_norm";
        let cols = if sparse { h["cols"].as_u64().unwrap() as usize } else { n.max(1) };
        let mut t = Tensor {
            value: if is_clip { vec![0.0; n] } else { params0 },
            grad: vec![0.0; n],
            state: [vec![0.0; n], vec![0.0; n]],
            touched: sparse.then(|| vec![false; n / cols]),
            cols,
        };
        let mut opt = Optimizer::new(opt_kind, clip);
        opt.init_state(2, &mut |v| t.show(v)).unwrap();
        for (s, g) in grads.iter().enumerate() {
            t.grad.copy_from_slice(g);
            if let Some(touched) = &mut t.touched {
                touched.fill(false);
                for r in case["touched"][s].as_array().unwrap() {
                    touched[r.as_u64().unwrap() as usize] = true;
                }
            }
            let before = t.value.clone();
            let lr = if is_clip { 1.0 } else { case["lrs"][s].as_f64().unwrap() as f32 };
            opt.step(lr, &mut |v| t.show(v)).unwrap();
            let want = floats(&case["expected"][s]);
            let got: Vec<f32> =
                if is_clip { before.iter().zip(&t.value).map(|(b, a)| b - a).collect() } else { t.value.clone() };
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= abs + rel * w.abs(), "{name} step {s} [{i}]: got {g}, want {w}");
            }
        }
        *checked.entry(kind.to_owned()).or_default() += 1;
    }
    assert_eq!(checked.len(), 6, "{checked:?}");
    assert!(checked.values().all(|&c| c >= 3), "{checked:?}");
}
