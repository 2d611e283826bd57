//! Small operations on fixed-size vectors `[f32; DIM]`.
//!
//! They are written as plain loops over arrays whose length is known at
//! compile time, which the compiler unrolls and vectorises.

/// <a, b>.
#[inline]
pub fn dot<const DIM: usize>(a: &[f32; DIM], b: &[f32; DIM]) -> f32 {
    // Four partial sums break the dependency chain of one accumulator so the
    // loop can be vectorised; the order is fixed, so results are
    // deterministic.
    let mut acc = [0.0f32; 4];
    let mut i = 0;
    while i + 4 <= DIM {
        acc[0] += a[i] * b[i];
        acc[1] += a[i + 1] * b[i + 1];
        acc[2] += a[i + 2] * b[i + 2];
        acc[3] += a[i + 3] * b[i + 3];
        i += 4;
    }
    while i < DIM {
        acc[0] += a[i] * b[i];
        i += 1;
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3])
}

/// |a|^2.
#[inline]
pub fn norm_sq<const DIM: usize>(a: &[f32; DIM]) -> f32 {
    dot(a, a)
}

/// |a - b|^2.
#[inline]
pub fn dist_sq<const DIM: usize>(a: &[f32; DIM], b: &[f32; DIM]) -> f32 {
    let mut s = 0.0;
    for i in 0..DIM {
        let d = a[i] - b[i];
        s += d * d;
    }
    s
}

/// y += s * x.
#[inline]
pub fn axpy<const DIM: usize>(s: f32, x: &[f32; DIM], y: &mut [f32; DIM]) {
    for i in 0..DIM {
        y[i] += s * x[i];
    }
}

/// Whether every component is finite.
#[inline]
pub fn all_finite(a: &[f32]) -> bool {
    a.iter().all(|x| x.is_finite())
}

/// Whether every component of every row is finite.
#[inline]
pub fn rows_finite<const DIM: usize>(rows: &[[f32; DIM]]) -> bool {
    rows.iter().all(|r| all_finite(r))
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_relative_eq;

    #[test]
    fn dot_matches_sequential_sum() {
        let a: [f32; 7] = [1.0, -2.0, 3.0, 0.5, 0.25, -1.5, 2.0];
        let b: [f32; 7] = [0.5, 1.0, -1.0, 2.0, 4.0, 1.0, -0.5];
        // 0.5 - 2 - 3 + 1 + 1 - 1.5 - 1 = -5
        assert_relative_eq!(dot(&a, &b), -5.0, epsilon = 1e-6);
        assert_relative_eq!(norm_sq(&[3.0f32, 4.0]), 25.0);
        assert_relative_eq!(dist_sq(&[1.0f32, 1.0], &[4.0, 5.0]), 25.0);
        let mut y = [1.0f32, 1.0];
        axpy(2.0, &[1.0, -1.0], &mut y);
        assert_eq!(y, [3.0, -1.0]);
        assert!(!all_finite(&[1.0, f32::NAN]));
    }
}
