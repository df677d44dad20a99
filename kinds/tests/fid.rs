//! FID math against values computed independently with numpy/scipy the way pytorch-fid 0.3.0
//! does (`tests/fixtures/fid/make_fixtures.py`).

use std::path::PathBuf;

use progdiff_kinds::fid::{
    FidError, Statistics, frechet_distance, frechet_distance_with, read_stats, trace_sqrt_product,
    write_stats,
};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fid").join(name)
}

fn json(name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(fixture(name)).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

/// `[N, D]` rows as `(row-major values, N, D)`.
fn matrix(v: &Value) -> (Vec<f64>, usize, usize) {
    let rows: Vec<Vec<f64>> = v.as_array().unwrap().iter().map(floats).collect();
    let (n, d) = (rows.len(), rows[0].len());
    (rows.concat(), n, d)
}

fn case(name: &str) -> Value {
    json("reference.json")["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no case `{name}`"))
        .clone()
}

fn stats(v: &Value) -> Statistics {
    let (rows, n, d) = matrix(v);
    Statistics::from_features(&rows, n, d).unwrap()
}

fn stats_of(c: &Value) -> (Statistics, Statistics) {
    (stats(&c["a"]), stats(&c["b"]))
}

fn assert_rel(actual: f64, expected: f64, tol: f64, what: &str) {
    let rel = (actual - expected).abs() / expected.abs().max(1e-12);
    eprintln!("{what}: {actual} vs {expected} (relative error {rel:e})");
    assert!(rel <= tol, "{what}: {actual} vs {expected} (relative error {rel:e})");
}

#[test]
fn statistics_are_numpy_mean_and_cov_ddof_1() {
    let c = case("well_conditioned");
    let (a, _) = stats_of(&c);
    for (x, y) in a.mu.iter().zip(floats(&c["mu_a"])) {
        assert!((x - y).abs() <= 1e-12 * y.abs().max(1.0), "mu {x} vs {y}");
    }
    for (x, y) in a.sigma.iter().zip(floats(&c["sigma_a"])) {
        assert!((x - y).abs() <= 1e-12 * y.abs().max(1.0), "sigma {x} vs {y}");
    }
}

#[test]
fn statistics_check_shapes() {
    assert!(matches!(Statistics::from_features(&[1.0, 2.0], 1, 2), Err(FidError::Shape(_))));
    assert!(matches!(Statistics::from_features(&[1.0, 2.0, 3.0], 2, 2), Err(FidError::Shape(_))));
    let s = Statistics::from_features(&[1.0, 2.0, 3.0, 6.0], 2, 2).unwrap();
    assert_eq!(s.dim(), 2);
    assert_eq!(s.mu, vec![2.0, 4.0]);
    assert_eq!(s.sigma, vec![2.0, 4.0, 4.0, 8.0]);
}

#[test]
fn frechet_distance_matches_pytorch_fid_well_conditioned() {
    let c = case("well_conditioned");
    let (a, b) = stats_of(&c);
    assert_rel(frechet_distance(&a, &b).unwrap(), c["fid"].as_f64().unwrap(), 1e-6, "fid");
    // Symmetric in its arguments.
    assert_rel(frechet_distance(&b, &a).unwrap(), c["fid"].as_f64().unwrap(), 1e-6, "fid(b, a)");
}

#[test]
fn frechet_distance_matches_pytorch_fid_rank_deficient() {
    // Fewer samples than dimensions: singular covariances, where scipy's sqrtm returns tiny
    // imaginary parts that pytorch-fid drops.
    let c = case("rank_deficient");
    let (a, b) = stats_of(&c);
    assert_rel(frechet_distance(&a, &b).unwrap(), c["fid"].as_f64().unwrap(), 1e-6, "fid");
    assert_rel(frechet_distance(&b, &a).unwrap(), c["fid"].as_f64().unwrap(), 1e-6, "fid(b, a)");
}

#[test]
fn frechet_distance_matches_pytorch_fid_where_it_needs_the_eps_retry() {
    // scipy's sqrtm is not finite on this singular product, so pytorch-fid retries with 1e-6
    // on the diagonals; the symmetric square root is finite here and agrees with the retried
    // value within the tolerance.
    let c = case("needs_eps_retry");
    assert!(c["retried"].as_bool().unwrap());
    let (a, b) = stats_of(&c);
    assert_rel(frechet_distance(&a, &b).unwrap(), c["fid"].as_f64().unwrap(), 1e-6, "fid");
    assert_rel(
        frechet_distance_with(&a, &b, true).unwrap(),
        c["fid_forced_eps"].as_f64().unwrap(),
        1e-6,
        "fid with eps",
    );
}

#[test]
fn eps_path_matches_pytorch_fid_retry_formula() {
    for name in ["well_conditioned", "rank_deficient"] {
        let c = case(name);
        let (a, b) = stats_of(&c);
        assert_rel(
            frechet_distance_with(&a, &b, true).unwrap(),
            c["fid_forced_eps"].as_f64().unwrap(),
            1e-6,
            name,
        );
    }
}

#[test]
fn identical_distributions_give_zero() {
    let c = case("identical");
    let (a, b) = stats_of(&c);
    let d = frechet_distance(&a, &b).unwrap();
    assert!(d.abs() < 1e-9, "{d}");
    assert!(c["fid"].as_f64().unwrap().abs() < 1e-9);
    // With the eps offset pytorch-fid gives -2 * eps * D (to rounding).
    assert_rel(
        frechet_distance_with(&a, &b, true).unwrap(),
        c["fid_forced_eps"].as_f64().unwrap(),
        1e-6,
        "identical with eps",
    );
}

#[test]
fn errors_on_mismatched_dimensions_and_indefinite_covariances() {
    let a = Statistics::new(vec![0.0; 2], vec![1.0, 0.0, 0.0, 1.0]).unwrap();
    let b = Statistics::new(vec![0.0; 1], vec![1.0]).unwrap();
    assert!(matches!(frechet_distance(&a, &b), Err(FidError::Shape(_))));
    assert!(Statistics::new(vec![0.0; 2], vec![1.0]).is_err());
    // An indefinite "covariance": sqrtm of the product has a large imaginary part, whichever
    // side it is on.
    let bad = Statistics::new(vec![0.0; 2], vec![1.0, 0.0, 0.0, -4.0]).unwrap();
    for err in [frechet_distance(&a, &bad).unwrap_err(), frechet_distance(&bad, &a).unwrap_err()] {
        assert!(matches!(err, FidError::Imaginary(i) if (i - 2.0).abs() < 1e-12), "{err}");
        assert!(err.to_string().contains("imaginary component"), "{err}");
    }
    // Statistics built by hand with a wrong-sized sigma are refused, not a panic.
    let broken = Statistics { mu: vec![0.0; 2], sigma: vec![1.0] };
    assert!(matches!(frechet_distance(&a, &broken), Err(FidError::Shape(_))));
}

#[test]
fn non_finite_covariances_are_refused_after_the_retry() {
    let a = Statistics::new(vec![0.0; 2], vec![1.0, 0.0, 0.0, 1.0]).unwrap();
    let nan = Statistics::new(vec![0.0; 2], vec![f64::NAN, 0.0, 0.0, 1.0]).unwrap();
    let err = frechet_distance(&a, &nan).unwrap_err();
    assert!(matches!(err, FidError::NotFinite), "{err}");
    assert!(err.to_string().contains("not finite"), "{err}");
}

#[test]
fn trace_sqrt_product_of_commuting_diagonals() {
    // diag(4, 9) diag(1, 4): sqrtm = diag(2, 6).
    let (real, imag) = trace_sqrt_product(&[4.0, 0.0, 0.0, 9.0], &[1.0, 0.0, 0.0, 4.0], 2);
    assert!((real - 8.0).abs() < 1e-12 && imag == 0.0, "{real} {imag}");
    // A singular factor: diag(4, 0) diag(1, 4) has eigenvalues 4 and 0.
    let (real, imag) = trace_sqrt_product(&[4.0, 0.0, 0.0, 0.0], &[1.0, 0.0, 0.0, 4.0], 2);
    assert!((real - 2.0).abs() < 1e-12 && imag == 0.0, "{real} {imag}");
}

#[test]
fn npz_written_by_numpy_reads_and_round_trips() {
    let expected = json("stats.json");
    let s = read_stats(&fixture("stats.npz")).unwrap();
    assert_eq!(s.mu, floats(&expected["mu"]));
    assert_eq!(s.sigma, floats(&expected["sigma"]));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.npz");
    write_stats(&s, &path).unwrap();
    assert_eq!(read_stats(&path).unwrap(), s);
    let err = read_stats(&fixture("reference.json")).unwrap_err().to_string();
    assert!(err.contains("not a .npz archive"), "{err}");
}
