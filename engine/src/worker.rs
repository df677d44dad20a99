//! Finding the worker binary (`progdiff-worker`), which links libtorch so that `progdiff` does
//! not have to.

use std::path::PathBuf;

/// The environment variable naming the worker binary explicitly.
pub const WORKER_ENV: &str = "PROGDIFF_WORKER";

/// The worker binary: `$PROGDIFF_WORKER`, or `progdiff-worker` next to the running `progdiff`
/// (also one directory up, for test binaries under `target/<profile>/deps`).
pub fn binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os(WORKER_ENV).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        anyhow::ensure!(p.is_file(), "{WORKER_ENV} names `{}`, which is not a file", p.display());
        return Ok(p);
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    for candidate in [dir.join("progdiff-worker"), dir.join("../progdiff-worker")] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    anyhow::bail!(
        "cannot find the worker binary `progdiff-worker` next to `{}`\nhint: build it with `cargo \
         build --workspace` (or `--bin progdiff-worker`), or point {WORKER_ENV} at it",
        exe.display()
    )
}
