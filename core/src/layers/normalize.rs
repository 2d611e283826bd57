//! L2 normalisation `y = x / |x|`.
//!
//! Backward: `dx = (dy - y <y, dy>) / |x|`. A zero vector stays zero and
//! passes no gradient (its direction is undefined).

use crate::math;
use crate::vector::{dot, norm_sq};

/// Normalises `x` into `y`; returns `|x|`.
pub fn forward<const D: usize>(x: &[f32; D], y: &mut [f32; D]) -> f32 {
    let n = math::sqrt(norm_sq(x));
    if n > 0.0 {
        for i in 0..D {
            y[i] = x[i] / n;
        }
    } else {
        *y = [0.0; D];
    }
    n
}

/// `dx` from the output `y`, the input's norm and the upstream `dy`.
pub fn backward<const D: usize>(y: &[f32; D], norm: f32, dy: &[f32; D], dx: &mut [f32; D]) {
    if norm > 0.0 {
        let c = dot(y, dy);
        for i in 0..D {
            dx[i] = (dy[i] - y[i] * c) / norm;
        }
    } else {
        *dx = [0.0; D];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_relative_eq;

    #[test]
    fn gradient_matches_finite_differences() {
        let x = [0.3f32, -1.2, 0.8];
        let c = [0.7f32, 0.1, -0.4];
        let f = |x: &[f32; 3]| {
            let mut y = [0.0; 3];
            forward(x, &mut y);
            dot(&c, &y)
        };
        let mut y = [0.0; 3];
        let n = forward(&x, &mut y);
        assert_relative_eq!(norm_sq(&y), 1.0, epsilon = 1e-6);
        let mut dx = [0.0; 3];
        backward(&y, n, &c, &mut dx);
        for i in 0..3 {
            let h = 1e-3;
            let (mut a, mut b) = (x, x);
            a[i] += h;
            b[i] -= h;
            assert_relative_eq!(dx[i], (f(&a) - f(&b)) / (2.0 * h), epsilon = 1e-3);
        }
        let mut z = [1.0; 3];
        assert_eq!(forward(&[0.0; 3], &mut z), 0.0);
        assert_eq!(z, [0.0; 3]);
    }
}
