//! KID against values computed independently with numpy (`tests/fixtures/kid/
//! make_kid_fixture.py`: torch-fidelity's `mmd2` arithmetic, cross-checked there against
//! clean-fid's, on the subsets progdiff's documented sampling draws), to 1e-6 relative.

use std::path::PathBuf;

use progdiff_kinds::fid::kid::{SplitMix64, kid_subset_values, subset_indices};
use progdiff_kinds::fid::{Features, KidOptions, kernel_inception_distance};
use serde_json::Value;

fn reference() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kid/reference.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn features(v: &Value) -> Features {
    let rows: Vec<Vec<f32>> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect())
        .collect();
    let (n, d) = (rows.len(), rows[0].len());
    Features::new(rows.concat(), n, d).unwrap()
}

fn reversed(f: &Features) -> Features {
    let rows: Vec<&[f32]> = f.values.chunks_exact(f.dim).rev().collect();
    Features::new(rows.concat(), f.len(), f.dim).unwrap()
}

fn indices(v: &Value) -> Vec<usize> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect()
}

fn assert_rel(actual: f64, expected: f64, what: &str) {
    let rel = (actual - expected).abs() / expected.abs();
    assert!(rel <= 1e-6, "{what}: {actual} vs numpy {expected} (relative error {rel:e})");
}

#[test]
fn splitmix64_stream_matches_the_fixture() {
    let r = reference();
    let mut rng = SplitMix64::new(0);
    for v in r["splitmix64_seed0"].as_array().unwrap() {
        assert_eq!(rng.next(), v.as_u64().unwrap());
    }
}

#[test]
fn kid_matches_numpy_on_fixed_features() {
    let r = reference();
    let a = features(&r["a"]);
    let b = features(&r["b"]);
    for case in r["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let other =
            if case["b_is_a_reversed"].as_bool().unwrap() { reversed(&a) } else { b.clone() };
        let opts = KidOptions {
            subsets: case["subsets"].as_u64().unwrap() as usize,
            subset_size: case["subset_size"].as_u64().unwrap() as usize,
            seed: case["seed"].as_u64().unwrap(),
        };
        let m = case["m"].as_u64().unwrap() as usize;
        // The subsets are the documented ones.
        let mut rng = SplitMix64::new(opts.seed);
        assert_eq!(
            subset_indices(a.len(), m, &mut rng),
            indices(&case["first_subset_a"]),
            "{name}"
        );
        assert_eq!(
            subset_indices(other.len(), m, &mut rng),
            indices(&case["first_subset_b"]),
            "{name}"
        );
        let values = kid_subset_values(&a, &other, &opts).unwrap();
        let expected: Vec<f64> =
            case["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(values.len(), expected.len());
        for (i, (v, e)) in values.iter().zip(&expected).enumerate() {
            assert_rel(*v, *e, &format!("{name}: subset {i}"));
        }
        let kid = kernel_inception_distance(&a, &other, &opts).unwrap();
        assert_eq!(kid.subset_size, m, "{name}");
        assert_rel(kid.mean, case["mean"].as_f64().unwrap(), &format!("{name}: mean"));
        assert_rel(kid.std, case["std"].as_f64().unwrap(), &format!("{name}: std"));
    }
}
