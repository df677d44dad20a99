//! `progdiff fid`: FID, and KID where both sides have feature vectors, between two image
//! folders or stored statistics (`.npz`), without libtorch in this process.
//!
//! A `.npz` file is read here: pytorch-fid's own files hold `mu` and `sigma` only (FID), the
//! ones progdiff writes (`evaluate`'s `samples.npz`, `fid-extractor`'s `reference.npz`,
//! `--save-stats`) also the feature vectors (`features`), which KID needs. A folder of images is
//! run through a TorchScript extractor by `progdiff-worker stats` (feature extraction needs
//! libtorch), which writes such a file.

use std::path::Path;

use anyhow::Context as _;
use progdiff_kinds::fid::{self, Features, Kid, KidOptions, Statistics};

/// How `progdiff fid` gets features from image folders.
#[derive(Clone, Debug)]
pub struct FidOptions {
    /// A TorchScript extractor (e.g. pytorch-fid's InceptionV3 exported by `torch.jit.trace`).
    pub extractor: Option<std::path::PathBuf>,
    /// Its square input size.
    pub size: usize,
    /// Images per extractor call.
    pub batch_size: usize,
    /// `cpu` or `cuda:N`.
    pub device: String,
}

/// What is known of one side: its statistics, and its feature vectors when they were stored.
#[derive(Clone, Debug)]
pub struct Measured {
    /// Mean and covariance (FID).
    pub stats: Statistics,
    /// The feature vectors (KID), absent in pytorch-fid's own files.
    pub features: Option<Features>,
}

/// The statistics (and feature vectors, when stored) of `path`: a `.npz` file (read here), or a
/// folder of images run through the extractor by `progdiff-worker stats`.
pub fn measured_of(path: &Path, opts: &FidOptions) -> anyhow::Result<Measured> {
    if path.is_file() {
        return Ok(Measured { stats: fid::read_stats(path)?, features: fid::read_features(path)? });
    }
    anyhow::ensure!(
        path.is_dir(),
        "`{}` is neither a statistics file nor a folder",
        path.display()
    );
    let module = opts.extractor.as_ref().context(
        "computing statistics of an image folder needs a feature extractor\nhint: pass \
         `--extractor inception.pt` (a TorchScript module; see the README)",
    )?;
    let tmp = tempfile::Builder::new().prefix("progdiff-stats-").suffix(".npz").tempfile()?;
    let worker = crate::worker::binary()?;
    let status = std::process::Command::new(&worker)
        .arg("stats")
        .arg(path)
        .arg(tmp.path())
        .arg("--extractor")
        .arg(module)
        .args(["--size", &opts.size.to_string()])
        .args(["--batch-size", &opts.batch_size.to_string()])
        .args(["--device", &opts.device])
        .status()
        .with_context(|| format!("starting `{}`", worker.display()))?;
    anyhow::ensure!(
        status.success(),
        "computing the statistics of `{}` failed ({status})",
        path.display()
    );
    Ok(Measured { stats: fid::read_stats(tmp.path())?, features: fid::read_features(tmp.path())? })
}

/// Writes `m` as a `.npz` file (with its feature vectors when it has them).
pub fn save(m: &Measured, path: &Path) -> anyhow::Result<()> {
    Ok(fid::write_stats_with_features(&m.stats, m.features.as_ref(), path)?)
}

/// The distances between `a` and `b`.
#[derive(Clone, Debug)]
pub struct Distances {
    /// FID.
    pub fid: f64,
    /// KID, or why there is none (a side without feature vectors).
    pub kid: Result<Kid, String>,
}

/// FID between `a` and `b`, and KID when both have feature vectors.
pub fn distances(
    (a, a_name): (&Measured, &Path),
    (b, b_name): (&Measured, &Path),
    kid: &KidOptions,
) -> anyhow::Result<Distances> {
    let fid = fid::frechet_distance(&a.stats, &b.stats)?;
    let kid = match (&a.features, &b.features) {
        (Some(fa), Some(fb)) => Ok(fid::kernel_inception_distance(fa, fb, kid)?),
        _ => {
            let without = if a.features.is_none() { a_name } else { b_name };
            Err(format!(
                "no KID: `{}` holds statistics only (pytorch-fid's format), not the feature \
                 vectors KID needs\nhint: progdiff's own `.npz` files hold them (`evaluate`'s \
                 `samples.npz`, `fid-extractor`'s `reference.npz`, `progdiff fid --save-stats`)",
                without.display()
            ))
        }
    };
    Ok(Distances { fid, kid })
}
