//! Side stores: state a stage keeps beyond one key, e.g. the prune stage's memory banks
//! (`v1/prune-banks/<digest>/`), which a later instance with another key (more `rounds`) resumes
//! from.
//!
//! The cache does not know what is inside a side-store directory, only who uses it: a stage that
//! uses one writes an empty file `owners/<key>` into it, named by its own key (the name of its
//! work area), before it writes anything else there. `gc` keeps a directory while one of its
//! owners is kept (a key it was told to keep, or one a running stage holds), and removes it
//! otherwise: a directory no kept stage instance claims is state nothing will resume from. While
//! writers are active, directories changed within [`GcOptions::min_age`](crate::GcOptions) are
//! spared, like young objects, since a starting stage may not have claimed its directory yet.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use tracing::debug;

use crate::cache::{Cache, disk_size, read_dir_sorted, remove_path};
use crate::digest::Digest;
use crate::error::Result;
use crate::gc::{GcOptions, GcReport};

/// The side stores under the bucket, by directory name.
pub const SIDE_STORES: &[&str] = &["prune-banks"];

/// The directory in a side-store entry that names its owners.
pub const OWNERS_DIR: &str = "owners";

impl Cache {
    /// The entries (directories) of every side store.
    pub(crate) fn side_store_dirs(&self) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for store in SIDE_STORES {
            out.extend(read_dir_sorted(&self.dir(store))?.into_iter().filter(|p| p.is_dir()));
        }
        Ok(out)
    }

    /// `gc`'s part for side stores: removes the entries none of whose owners is `live`.
    pub(crate) fn gc_side_stores(
        &self,
        live: &BTreeSet<Digest>,
        quiescent: bool,
        options: &GcOptions,
        report: &mut GcReport,
    ) -> Result<()> {
        let now = SystemTime::now();
        for dir in self.side_store_dirs()? {
            let owners = owners(&dir)?;
            if owners.iter().any(|k| live.contains(k)) {
                report.side_dirs_kept += 1;
                continue;
            }
            if !quiescent {
                let age = newest_mtime(&dir).map(|t| now.duration_since(t).unwrap_or_default());
                if age.is_none_or(|age| age < options.min_age) {
                    report.side_dirs_kept += 1;
                    continue;
                }
            }
            debug!(dir = %dir.display(), owners = owners.len(), "gc: side-store entry unclaimed");
            report.side_dirs_removed += 1;
            report.bytes_freed += disk_size(&dir);
            if !options.dry_run {
                remove_path(&dir)?;
            }
        }
        Ok(())
    }
}

/// The keys named in `<dir>/owners/` (other names are ignored).
pub(crate) fn owners(dir: &Path) -> Result<BTreeSet<Digest>> {
    Ok(read_dir_sorted(&dir.join(OWNERS_DIR))?
        .iter()
        .filter_map(|p| p.file_name()?.to_str()?.parse().ok())
        .collect())
}

/// The newest mtime of `dir` and its direct entries (a new round file, a new owner).
fn newest_mtime(dir: &Path) -> Option<SystemTime> {
    let own = std::fs::symlink_metadata(dir).and_then(|m| m.modified()).ok();
    let entries = read_dir_sorted(dir).unwrap_or_default();
    entries
        .iter()
        .filter_map(|p| std::fs::symlink_metadata(p).and_then(|m| m.modified()).ok())
        .chain(own)
        .max()
}
