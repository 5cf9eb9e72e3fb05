//! The evaluation's figures (paper, Section 4.1), as plain functions on plain data so each is
//! unit-tested on hand-made cases:
//!
//! - [`exact_match`]: Char-Acc / BG-Acc, the share of frames whose whole multi-hot label vector
//!   is predicted exactly;
//! - [`micro_f1`]: Char-F1, F1 over every (frame, character) decision pooled;
//! - [`macro_f1`]: BG-F1, the mean over background classes of each class's F1 (for one label
//!   per frame micro F1 equals accuracy, so the macro average is the figure that adds
//!   something: it weighs rare backgrounds like common ones);
//! - [`frechet_distance`] of two [`Gaussian`]s fitted to feature vectors ([`Gaussian::fit`]):
//!   the FID formula, used here in the evaluation classifier's feature space ("FID
//!   (classifier features)"), never with Inception-v3's, so its values are not comparable with
//!   published FIDs; its matrix square root comes from [`symmetric_eigen`] (cyclic Jacobi,
//!   f64);
//! - [`mean_cosine`]: CLIP text-image and image-image similarity of paired embeddings.

/// Share of rows of `pred` equal to the matching row of `truth` (0 for no rows).
pub fn exact_match(pred: &[Vec<bool>], truth: &[Vec<bool>]) -> f64 {
    assert_eq!(pred.len(), truth.len(), "exact_match: row counts differ");
    if pred.is_empty() {
        return 0.0;
    }
    let right = pred.iter().zip(truth).filter(|(p, t)| p == t).count();
    right as f64 / pred.len() as f64
}

/// Micro-averaged F1 of multi-hot predictions: `2 TP / (2 TP + FP + FN)` over all labels of
/// all rows. 1 when there is nothing to find and nothing was predicted.
pub fn micro_f1(pred: &[Vec<bool>], truth: &[Vec<bool>]) -> f64 {
    assert_eq!(pred.len(), truth.len(), "micro_f1: row counts differ");
    let (mut tp, mut fp, mut fneg) = (0usize, 0usize, 0usize);
    for (p, t) in pred.iter().zip(truth) {
        assert_eq!(p.len(), t.len(), "micro_f1: label counts differ");
        for (&a, &b) in p.iter().zip(t) {
            match (a, b) {
                (true, true) => tp += 1,
                (true, false) => fp += 1,
                (false, true) => fneg += 1,
                _ => {}
            }
        }
    }
    let denom = 2 * tp + fp + fneg;
    if denom == 0 {
        1.0
    } else {
        2.0 * tp as f64 / denom as f64
    }
}

/// Macro-averaged F1 of single-label predictions over `classes` classes: the mean of each
/// class's `2 TP / (2 TP + FP + FN)` over the classes that occur in `truth` or `pred` (as
/// scikit-learn's `f1_score(average="macro")`); `None` predictions count as a miss. 0 for no
/// rows.
pub fn macro_f1(pred: &[Option<usize>], truth: &[usize], classes: usize) -> f64 {
    assert_eq!(pred.len(), truth.len(), "macro_f1: row counts differ");
    let (mut tp, mut fp, mut fneg) = (
        vec![0usize; classes],
        vec![0usize; classes],
        vec![0usize; classes],
    );
    for (p, &t) in pred.iter().zip(truth) {
        match *p {
            Some(p) if p == t => tp[t] += 1,
            Some(p) => {
                fp[p] += 1;
                fneg[t] += 1;
            }
            None => fneg[t] += 1,
        }
    }
    let seen: Vec<f64> = (0..classes)
        .filter(|&k| tp[k] + fp[k] + fneg[k] > 0)
        .map(|k| 2.0 * tp[k] as f64 / (2 * tp[k] + fp[k] + fneg[k]) as f64)
        .collect();
    if seen.is_empty() {
        0.0
    } else {
        seen.iter().sum::<f64>() / seen.len() as f64
    }
}

/// A class index as a one-hot row of `n` (all false for `None` or an index out of range).
pub fn one_hot(index: Option<usize>, n: usize) -> Vec<bool> {
    (0..n).map(|i| Some(i) == index).collect()
}

/// Mean cosine similarity of paired rows (`a[i]` with `b[i]`); `None` for no rows or a width
/// mismatch.
pub fn mean_cosine(a: &[Vec<f32>], b: &[Vec<f32>]) -> Option<f64> {
    if a.is_empty() || a.len() != b.len() {
        return None;
    }
    let mut sum = 0.0;
    for (x, y) in a.iter().zip(b) {
        if x.len() != y.len() {
            return None;
        }
        let dot: f64 = x.iter().zip(y).map(|(&p, &q)| p as f64 * q as f64).sum();
        let nx: f64 = x.iter().map(|&p| (p as f64).powi(2)).sum::<f64>().sqrt();
        let ny: f64 = y.iter().map(|&q| (q as f64).powi(2)).sum::<f64>().sqrt();
        sum += dot / (nx * ny).max(1e-12);
    }
    Some(sum / a.len() as f64)
}

/// A square matrix, row-major, in f64.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    /// Rows (= columns).
    pub n: usize,
    /// `n * n` values, row-major.
    pub data: Vec<f64>,
}

impl Matrix {
    /// The `n x n` zero matrix.
    pub fn zeros(n: usize) -> Self {
        Self {
            n,
            data: vec![0.0; n * n],
        }
    }

    /// From rows (must be square).
    pub fn from_rows(rows: &[Vec<f64>]) -> Self {
        let n = rows.len();
        assert!(rows.iter().all(|r| r.len() == n), "matrix must be square");
        Self {
            n,
            data: rows.concat(),
        }
    }

    /// Element `(i, j)`.
    pub fn at(&self, i: usize, j: usize) -> f64 {
        self.data[i * self.n + j]
    }

    fn set(&mut self, i: usize, j: usize, v: f64) {
        self.data[i * self.n + j] = v;
    }

    /// The trace.
    pub fn trace(&self) -> f64 {
        (0..self.n).map(|i| self.at(i, i)).sum()
    }

    /// `self * other`.
    pub fn matmul(&self, other: &Matrix) -> Matrix {
        let n = self.n;
        let mut out = Matrix::zeros(n);
        for i in 0..n {
            for k in 0..n {
                let a = self.at(i, k);
                if a == 0.0 {
                    continue;
                }
                for j in 0..n {
                    out.data[i * n + j] += a * other.data[k * n + j];
                }
            }
        }
        out
    }
}

/// Eigenvalues and eigenvectors of a symmetric matrix by cyclic Jacobi rotations (f64): returns
/// `(values, vectors)` with eigenvector `k` in column `k` of `vectors`, so that
/// `A = V diag(values) V^T`. Sweeps until the off-diagonal mass is below `1e-14` of the total
/// (at most 100 sweeps); the input is symmetrised first.
pub fn symmetric_eigen(a: &Matrix) -> (Vec<f64>, Matrix) {
    let n = a.n;
    let mut m = a.clone();
    for i in 0..n {
        for j in 0..i {
            let s = 0.5 * (m.at(i, j) + m.at(j, i));
            m.set(i, j, s);
            m.set(j, i, s);
        }
    }
    let mut v = Matrix::zeros(n);
    for i in 0..n {
        v.set(i, i, 1.0);
    }
    let total: f64 = m.data.iter().map(|x| x * x).sum::<f64>().max(1e-300);
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| m.at(i, j).powi(2))
            .sum();
        if off <= 1e-28 * total || off == 0.0 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = m.at(p, q);
                if apq.abs() < 1e-300 {
                    continue;
                }
                let (app, aqq) = (m.at(p, p), m.at(q, q));
                // The rotation that zeroes (p, q) (Golub & Van Loan, Algorithm 8.4.1).
                let theta = (aqq - app) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (m.at(k, p), m.at(k, q));
                    m.set(k, p, c * akp - s * akq);
                    m.set(k, q, s * akp + c * akq);
                }
                for k in 0..n {
                    let (apk, aqk) = (m.at(p, k), m.at(q, k));
                    m.set(p, k, c * apk - s * aqk);
                    m.set(q, k, s * apk + c * aqk);
                }
                for k in 0..n {
                    let (vkp, vkq) = (v.at(k, p), v.at(k, q));
                    v.set(k, p, c * vkp - s * vkq);
                    v.set(k, q, s * vkp + c * vkq);
                }
            }
        }
    }
    ((0..n).map(|i| m.at(i, i)).collect(), v)
}

/// The symmetric positive semi-definite square root of a symmetric matrix:
/// `V diag(sqrt(max(lambda, 0))) V^T` (negative eigenvalues from rounding are clipped).
pub fn sqrtm_psd(a: &Matrix) -> Matrix {
    let (values, v) = symmetric_eigen(a);
    let n = a.n;
    let mut out = Matrix::zeros(n);
    for (k, &l) in values.iter().enumerate() {
        let r = l.max(0.0).sqrt();
        if r == 0.0 {
            continue;
        }
        for i in 0..n {
            let vi = v.at(i, k) * r;
            for j in 0..n {
                out.data[i * n + j] += vi * v.at(j, k);
            }
        }
    }
    out
}

/// Mean and covariance of a set of feature vectors.
#[derive(Debug, Clone, PartialEq)]
pub struct Gaussian {
    /// The mean.
    pub mean: Vec<f64>,
    /// The covariance (unbiased, `n - 1`; zero for a single vector).
    pub cov: Matrix,
    /// Vectors it was fitted to.
    pub count: usize,
}

impl Gaussian {
    /// Fits rows of equal width; `None` for no rows.
    pub fn fit(rows: &[Vec<f32>]) -> Option<Self> {
        let first = rows.first()?;
        let d = first.len();
        let n = rows.len();
        let mut mean = vec![0.0; d];
        for r in rows {
            assert_eq!(r.len(), d, "Gaussian::fit: rows of different widths");
            for (m, &x) in mean.iter_mut().zip(r) {
                *m += x as f64;
            }
        }
        mean.iter_mut().for_each(|m| *m /= n as f64);
        let mut cov = Matrix::zeros(d);
        for r in rows {
            let c: Vec<f64> = r.iter().zip(&mean).map(|(&x, m)| x as f64 - m).collect();
            for i in 0..d {
                for j in 0..d {
                    cov.data[i * d + j] += c[i] * c[j];
                }
            }
        }
        let denom = n.saturating_sub(1).max(1) as f64;
        cov.data.iter_mut().for_each(|x| *x /= denom);
        Some(Self {
            mean,
            cov,
            count: n,
        })
    }
}

/// The Frechet distance between two Gaussians:
/// `|mu1 - mu2|^2 + Tr(C1) + Tr(C2) - 2 Tr((C1 C2)^(1/2))`, with
/// `Tr((C1 C2)^(1/2)) = Tr((S C2 S)^(1/2))` for `S = C1^(1/2)` (the same eigenvalues, and
/// `S C2 S` is symmetric, so [`sqrtm_psd`] applies). Clamped at 0 against rounding.
pub fn frechet_distance(a: &Gaussian, b: &Gaussian) -> f64 {
    assert_eq!(
        a.mean.len(),
        b.mean.len(),
        "frechet_distance: widths differ"
    );
    let diff: f64 = a
        .mean
        .iter()
        .zip(&b.mean)
        .map(|(x, y)| (x - y).powi(2))
        .sum();
    let s = sqrtm_psd(&a.cov);
    let inner = s.matmul(&b.cov).matmul(&s);
    let (values, _) = symmetric_eigen(&inner);
    let tr_sqrt: f64 = values.iter().map(|l| l.max(0.0).sqrt()).sum();
    (diff + a.cov.trace() + b.cov.trace() - 2.0 * tr_sqrt).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * (1.0 + b.abs())
    }

    fn rows(v: &[&[u8]]) -> Vec<Vec<bool>> {
        v.iter()
            .map(|r| r.iter().map(|&x| x == 1).collect())
            .collect()
    }

    #[test]
    fn exact_match_needs_the_whole_vector() {
        let truth = rows(&[&[1, 0, 1], &[0, 1, 0], &[0, 0, 0], &[1, 1, 0]]);
        let pred = rows(&[&[1, 0, 1], &[0, 1, 1], &[0, 0, 0], &[1, 0, 0]]);
        assert_eq!(exact_match(&pred, &truth), 0.5);
        assert_eq!(exact_match(&truth, &truth), 1.0);
        assert_eq!(exact_match(&[], &[]), 0.0);
    }

    #[test]
    fn micro_f1_pools_every_decision() {
        // TP: row0 two, row1 one, row3 one = 4; FP: row1 one = 1; FN: row3 one = 1.
        let truth = rows(&[&[1, 0, 1], &[0, 1, 0], &[0, 0, 0], &[1, 1, 0]]);
        let pred = rows(&[&[1, 0, 1], &[0, 1, 1], &[0, 0, 0], &[1, 0, 0]]);
        assert!(close(micro_f1(&pred, &truth), 8.0 / 10.0, 1e-12));
        assert_eq!(micro_f1(&rows(&[&[0, 0]]), &rows(&[&[0, 0]])), 1.0);
        assert_eq!(micro_f1(&rows(&[&[1, 0]]), &rows(&[&[0, 1]])), 0.0);
        // Single-label one-hot rows: micro F1 equals accuracy.
        let t: Vec<Vec<bool>> = [0, 1, 2, 1].iter().map(|&i| one_hot(Some(i), 3)).collect();
        let p: Vec<Vec<bool>> = [0, 2, 2, 1].iter().map(|&i| one_hot(Some(i), 3)).collect();
        assert!(close(micro_f1(&p, &t), exact_match(&p, &t), 1e-12));
        assert_eq!(one_hot(None, 2), vec![false, false]);
    }

    #[test]
    fn macro_f1_averages_the_classes_seen() {
        // truth 0 0 1 2, pred 0 1 1 -: class 0 TP 1 FN 1 -> 2/3; class 1 TP 1 FP 1 -> 2/3;
        // class 2 FN 1 -> 0; class 3 never seen, not averaged.
        let f = macro_f1(&[Some(0), Some(1), Some(1), None], &[0, 0, 1, 2], 4);
        assert!(close(f, (2.0 / 3.0 + 2.0 / 3.0) / 3.0, 1e-12), "{f}");
        assert_eq!(macro_f1(&[Some(1), Some(0)], &[1, 0], 2), 1.0);
        assert_eq!(macro_f1(&[], &[], 3), 0.0);
    }

    #[test]
    fn cosine_of_hand_made_pairs() {
        let a = vec![vec![1.0, 0.0], vec![1.0, 1.0], vec![2.0, 0.0]];
        let b = vec![vec![2.0, 0.0], vec![-1.0, -1.0], vec![0.0, 3.0]];
        // 1, -1, 0
        assert!(close(mean_cosine(&a, &b).unwrap(), 0.0, 1e-12));
        assert!(close(mean_cosine(&a[..1], &b[..1]).unwrap(), 1.0, 1e-12));
        assert_eq!(mean_cosine(&[], &[]), None);
        assert_eq!(mean_cosine(&a[..1], &[vec![1.0]]), None);
    }

    #[test]
    fn jacobi_finds_the_eigen_decomposition_of_a_hand_computed_case() {
        // [[2, 1], [1, 2]]: eigenvalues 1 and 3, vectors (1, -1) / sqrt 2 and (1, 1) / sqrt 2.
        let a = Matrix::from_rows(&[vec![2.0, 1.0], vec![1.0, 2.0]]);
        let (mut values, v) = symmetric_eigen(&a);
        let k3 = if values[0] > values[1] { 0 } else { 1 };
        assert!(close(v.at(0, k3).abs(), 0.5f64.sqrt(), 1e-12));
        assert!(close(v.at(0, k3) * v.at(1, k3), 0.5, 1e-12));
        values.sort_by(f64::total_cmp);
        assert!(close(values[0], 1.0, 1e-12) && close(values[1], 3.0, 1e-12));
        // Its square root, by hand: V diag(1, sqrt 3) V^T = [[a, b], [b, a]] with
        // a = (1 + sqrt 3) / 2, b = (sqrt 3 - 1) / 2.
        let r = sqrtm_psd(&a);
        let (ea, eb) = ((1.0 + 3f64.sqrt()) / 2.0, (3f64.sqrt() - 1.0) / 2.0);
        for (got, want) in r.data.iter().zip([ea, eb, eb, ea]) {
            assert!(close(*got, want, 1e-12), "{:?}", r.data);
        }
    }

    #[test]
    fn jacobi_reconstructs_a_larger_matrix_and_its_square_root_squares_back() {
        // B B^T for a fixed 6x6 B: symmetric positive semi-definite with distinct eigenvalues.
        let n = 6;
        let b: Vec<Vec<f64>> = (0..n)
            .map(|i| {
                (0..n)
                    .map(|j| ((i * 7 + j * 3) % 11) as f64 - 5.0 + 0.1 * i as f64)
                    .collect()
            })
            .collect();
        let bt: Vec<Vec<f64>> = (0..n).map(|j| (0..n).map(|i| b[i][j]).collect()).collect();
        let a = Matrix::from_rows(&b).matmul(&Matrix::from_rows(&bt));
        let (values, v) = symmetric_eigen(&a);
        let mut recon = Matrix::zeros(n);
        for (k, &l) in values.iter().enumerate() {
            for i in 0..n {
                for j in 0..n {
                    recon.data[i * n + j] += v.at(i, k) * l * v.at(j, k);
                }
            }
        }
        let scale = a.data.iter().map(|x| x.abs()).fold(0.0, f64::max);
        for (x, y) in recon.data.iter().zip(&a.data) {
            assert!((x - y).abs() < 1e-10 * scale);
        }
        let r = sqrtm_psd(&a);
        for (x, y) in r.matmul(&r).data.iter().zip(&a.data) {
            assert!((x - y).abs() < 1e-9 * scale);
        }
        assert!(close(
            r.trace(),
            values.iter().map(|l| l.max(0.0).sqrt()).sum(),
            1e-10
        ));
    }

    #[test]
    fn frechet_distance_of_hand_computed_gaussians() {
        let g = |mean: Vec<f64>, cov: Vec<Vec<f64>>| Gaussian {
            mean,
            cov: Matrix::from_rows(&cov),
            count: 0,
        };
        // Same Gaussian: 0.
        let a = g(vec![1.0, 2.0], vec![vec![2.0, 1.0], vec![1.0, 2.0]]);
        assert!(frechet_distance(&a, &a).abs() < 1e-9);
        // Diagonal covariances: |dmu|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
        let p = g(vec![0.0, 0.0], vec![vec![4.0, 0.0], vec![0.0, 1.0]]);
        let q = g(vec![3.0, 4.0], vec![vec![1.0, 0.0], vec![0.0, 9.0]]);
        // 25 + (2 - 1)^2 + (1 - 3)^2 = 30
        assert!(close(frechet_distance(&p, &q), 30.0, 1e-10));
        assert!(close(frechet_distance(&q, &p), 30.0, 1e-10));
        // Non-commuting covariances: C1 = I, C2 = [[2, 1], [1, 2]]; Tr sqrt(C2) = 1 + sqrt 3,
        // so d = 2 + 4 - 2 (1 + sqrt 3).
        let i = g(vec![0.0, 0.0], vec![vec![1.0, 0.0], vec![0.0, 1.0]]);
        let c = g(vec![0.0, 0.0], vec![vec![2.0, 1.0], vec![1.0, 2.0]]);
        assert!(close(
            frechet_distance(&i, &c),
            6.0 - 2.0 * (1.0 + 3f64.sqrt()),
            1e-10
        ));
    }

    #[test]
    fn gaussian_fit_and_fid_of_samples() {
        let rows = vec![vec![1.0f32, 0.0], vec![3.0, 2.0], vec![2.0, 4.0]];
        let g = Gaussian::fit(&rows).unwrap();
        assert_eq!(g.mean, vec![2.0, 2.0]);
        // deviations (-1, -2), (1, 0), (0, 2): cov = [[2, 2], [2, 8]] / 2
        assert_eq!(g.cov.data, vec![1.0, 1.0, 1.0, 4.0]);
        assert!(frechet_distance(&g, &g) < 1e-9);
        let shifted: Vec<Vec<f32>> = rows.iter().map(|r| vec![r[0] + 3.0, r[1]]).collect();
        let h = Gaussian::fit(&shifted).unwrap();
        assert!(close(frechet_distance(&g, &h), 9.0, 1e-9));
        assert!(Gaussian::fit(&[]).is_none());
        assert_eq!(Gaussian::fit(&rows[..1]).unwrap().cov.data, vec![0.0; 4]);
    }
}
