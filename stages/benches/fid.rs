//! FID benchmarks: feature-extraction throughput of the extractors, and the time of the
//! statistics + Fréchet distance for 2048-d features of 10k samples (the paper's InceptionV3
//! pool3 size). `cargo bench -p progdiff-stages --bench fid`; `FID_BENCH_QUICK=1` for a short run.

use std::time::Instant;

use progdiff_stages::fid::{
    Classifier, ClassifierConfig, Extractor, Target, frechet_distance, statistics_from_features,
};
use tch::{Device, Kind, Tensor};

fn time<T>(label: &str, f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let out = f();
    let s = t.elapsed().as_secs_f64();
    eprintln!("{label}: {s:.3}s");
    (out, s)
}

fn main() {
    let quick = std::env::var_os("FID_BENCH_QUICK").is_some();
    let device = if tch::Cuda::is_available() { Device::Cuda(0) } else { Device::Cpu };
    println!("device: {device:?}, threads: {}", tch::get_num_threads());

    // Feature extraction: the self-trained classifier on 28x28 grayscale (Fashion-MNIST size).
    let n = if quick { 512 } else { 4096 };
    let config = ClassifierConfig {
        in_channels: 1,
        image_size: 28,
        features: 128,
        classes: 10,
        target: Target::Labels,
        train_accuracy: None,
    };
    let e = Extractor::Classifier(Classifier::new(config, device));
    let images = Tensor::randint(256, [n, 1, 28, 28], (Kind::Uint8, Device::Cpu));
    let _ = e.features(&images.narrow(0, 0, 64), 64).unwrap(); // warm-up
    let (_, s) = time("classifier features", || e.features(&images, 256).unwrap());
    println!("classifier extractor (28x28 gray): {:.0} images/s", n as f64 / s);

    // A TorchScript extractor at Inception's input size, when a module is given.
    if let Some(path) = std::env::var_os("FID_BENCH_TORCHSCRIPT") {
        let e = Extractor::torchscript(path.as_ref(), 299, device).unwrap();
        let n = if quick { 64 } else { 512 };
        let images = Tensor::randint(256, [n, 3, 32, 32], (Kind::Uint8, Device::Cpu));
        let _ = e.features(&images.narrow(0, 0, 8), 8).unwrap();
        let (_, s) = time("torchscript features", || e.features(&images, 64).unwrap());
        println!("torchscript extractor (32x32 -> 299): {:.0} images/s", n as f64 / s);
    }

    // Statistics and FID of 2048-d features of 10k samples.
    let (n, d) = if quick { (2000, 512) } else { (10_000, 2048) };
    let a = Tensor::randn([n, d], (Kind::Float, Device::Cpu)).relu();
    let b = (Tensor::randn([n, d], (Kind::Float, Device::Cpu)) * 1.1 + 0.05).relu();
    let ((sa, sb), s_stats) = time("statistics", || {
        (statistics_from_features(&a).unwrap(), statistics_from_features(&b).unwrap())
    });
    let (fid, s_fid) = time("frechet distance", || frechet_distance(&sa, &sb).unwrap());
    println!(
        "FID of {n} x {d} features: statistics {s_stats:.2}s (both sets), distance {s_fid:.2}s \
         (FID {fid:.4})"
    );
}
