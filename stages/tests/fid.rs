//! FID features on libtorch: the statistics of features against numpy (`make_fixtures.py` in
//! `kinds/tests/fixtures/fid`), and the feature extractors (a TorchScript module traced with
//! PyTorch, the self-trained classifier). The distance and `.npz` files are `progdiff-kinds`'
//! (`kinds/tests/fid.rs`).

use std::path::PathBuf;

use progdiff_stages::fid::{
    Classifier, ClassifierConfig, Extractor, Statistics, Target, load_folder, rotate_quarters,
    statistics_from_features,
};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

fn fixture(name: &str) -> PathBuf {
    // The FID fixtures live with the torch-free FID code (`kinds/tests/fixtures/fid`).
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../kinds/tests/fixtures/fid").join(name)
}

fn json(name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(fixture(name)).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn matrix(v: &Value) -> Tensor {
    let rows: Vec<Vec<f64>> = v.as_array().unwrap().iter().map(floats).collect();
    let (n, d) = (rows.len() as i64, rows[0].len() as i64);
    Tensor::from_slice(&rows.concat()).view([n, d])
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

fn stats_of(c: &Value) -> (Statistics, Statistics) {
    tch::set_num_threads(1);
    (
        statistics_from_features(&matrix(&c["a"])).unwrap(),
        statistics_from_features(&matrix(&c["b"])).unwrap(),
    )
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
fn torchscript_extractor_loads_and_matches_pytorch() {
    tch::set_num_threads(1);
    let meta = json("tiny_extractor.json");
    let size = meta["size"].as_u64().unwrap() as usize;
    let e = Extractor::torchscript(&fixture("tiny_extractor.pt"), size, Device::Cpu).unwrap();
    let probe: Vec<u8> =
        meta["probe"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u8).collect();
    let images = Tensor::from_slice(&probe).view([2, 3, 8, 8]);
    let f = e.features(&images, 1).unwrap();
    assert_eq!(f.size(), vec![2, meta["dim"].as_i64().unwrap()]);
    let expected = matrix(&meta["probe_features"]).to_kind(Kind::Float);
    let err = f64::try_from((&f - &expected).abs().max()).unwrap();
    assert!(err < 1e-5, "max abs error {err}");
    // Grayscale images are repeated to three channels.
    let gray = Tensor::zeros([3, 1, 8, 8], (Kind::Uint8, Device::Cpu));
    assert_eq!(e.features(&gray, 2).unwrap().size(), vec![3, 6]);
    // A missing module names its path.
    let missing = Extractor::torchscript(&fixture("nope.pt"), size, Device::Cpu).unwrap_err();
    assert!(missing.to_string().contains("nope.pt"), "{missing}");
}

#[test]
fn classifier_learns_rotations_and_gives_penultimate_features() {
    tch::set_num_threads(1);
    tch::manual_seed(0);
    let config = ClassifierConfig {
        in_channels: 1,
        image_size: 8,
        features: 16,
        classes: 4,
        target: Target::Rotation,
        train_accuracy: None,
    };
    let mut c = Classifier::new(config.clone(), Device::Cpu);
    // An asymmetric pattern: one bright corner, plus noise.
    let base = Tensor::zeros([1, 1, 8, 8], (Kind::Float, Device::Cpu)) - 1.0;
    let _ = base.narrow(2, 0, 3).narrow(3, 0, 3).fill_(1.0);
    let mut batch = |step: usize| -> anyhow::Result<(Tensor, Tensor)> {
        let k: Vec<i64> = (0..16).map(|i| ((i + step) % 4) as i64).collect();
        let x = base.repeat([16, 1, 1, 1])
            + Tensor::randn([16, 1, 8, 8], (Kind::Float, Device::Cpu)) * 0.1;
        Ok((rotate_quarters(&x, &k), Tensor::from_slice(&k)))
    };
    let acc = c.train(150, 1e-2, &mut batch, &Default::default()).unwrap();
    assert!(acc > 0.9, "accuracy {acc}");
    let images = Tensor::zeros([5, 1, 8, 8], (Kind::Uint8, Device::Cpu));
    let e = Extractor::Classifier(c);
    assert_eq!(e.features(&images, 2).unwrap().size(), vec![5, 16]);
    // Saved weights load back to the same features.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.safetensors");
    let Extractor::Classifier(c) = e else { unreachable!() };
    c.save(&path).unwrap();
    let back = Classifier::load(c.config(), &path, Device::Cpu).unwrap();
    let probe = Tensor::randint(255, [3, 1, 8, 8], (Kind::Uint8, Device::Cpu));
    assert!(c.features(&probe).equal(&back.features(&probe)));
}

#[test]
fn image_folders_load_in_name_order() {
    let dir = tempfile::tempdir().unwrap();
    let images = Tensor::arange(2 * 3 * 4 * 5, (Kind::Int64, Device::Cpu))
        .remainder(256)
        .to_kind(Kind::Uint8)
        .view([2, 3, 4, 5]);
    progdiff_stages::image_io::write_pngs(&images, dir.path()).unwrap();
    let back = load_folder(dir.path(), 3).unwrap();
    assert!(back.equal(&images));
    assert_eq!(load_folder(dir.path(), 1).unwrap().size(), vec![2, 1, 4, 5]);
    let empty = tempfile::tempdir().unwrap();
    let err = load_folder(empty.path(), 3).unwrap_err().to_string();
    assert!(err.contains("has no .png or .jpg images"), "{err}");
}
