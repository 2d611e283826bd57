//! Element-wise activations.
//!
//! - ReLU: `y = max(x, 0)`, `dy/dx = [x > 0]`.
//! - tanh: `y = tanh(x)`, `dy/dx = 1 - y^2`.
//! - identity: `y = x`.

use crate::math;

/// An element-wise activation function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    /// max(x, 0).
    #[default]
    Relu,
    /// tanh(x).
    Tanh,
    /// x.
    Identity,
}

impl Activation {
    /// `y = f(x)` element-wise.
    pub fn forward(self, x: &[f32], y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = match self {
                Activation::Relu => x.max(0.0),
                Activation::Tanh => math::tanh(x),
                Activation::Identity => x,
            };
        }
    }

    /// `dx = dy * f'(x)` element-wise, given the input `x` and output `y`.
    pub fn backward(self, x: &[f32], y: &[f32], dy: &[f32], dx: &mut [f32]) {
        for i in 0..dx.len() {
            dx[i] = match self {
                Activation::Relu => {
                    if x[i] > 0.0 {
                        dy[i]
                    } else {
                        0.0
                    }
                }
                Activation::Tanh => dy[i] * (1.0 - y[i] * y[i]),
                Activation::Identity => dy[i],
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_relative_eq;

    #[test]
    fn derivatives_match_finite_differences() {
        let xs = [-1.3f32, -0.2, 0.4, 2.0];
        for act in [Activation::Relu, Activation::Tanh, Activation::Identity] {
            let mut y = [0.0; 4];
            act.forward(&xs, &mut y);
            let mut dx = [0.0; 4];
            act.backward(&xs, &y, &[1.0; 4], &mut dx);
            for i in 0..4 {
                let h = 1e-3;
                let (mut a, mut b) = ([0.0f32; 1], [0.0f32; 1]);
                act.forward(&[xs[i] + h], &mut a);
                act.forward(&[xs[i] - h], &mut b);
                assert_relative_eq!(dx[i], (a[0] - b[0]) / (2.0 * h), epsilon = 1e-3);
            }
        }
    }
}
