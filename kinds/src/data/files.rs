//! Finding a dataset's files: resolving manifest-relative paths, expanding a directory or a
//! file-name pattern, walking image folders, and ordering names the way people number them.

use std::cmp::Ordering;
use std::collections::HashSet;
use std::fs;
use std::path::{Component, Path, PathBuf};

use super::DataError;

/// `path` as written in the manifest, resolved against the manifest's directory, without `.`
/// components (so messages and cache labels read `dir/file`, not `dir/./file`).
pub fn resolve(base_dir: &Path, path: &Path) -> PathBuf {
    let joined = if path.is_absolute() { path.to_path_buf() } else { base_dir.join(path) };
    joined.components().filter(|c| *c != Component::CurDir).collect()
}

/// The files `path` names: the file itself; every file directly inside a directory whose name
/// ends in `.{ext}`; or, when the last component holds `*` or `?`, every file in the parent
/// directory whose name matches that pattern. Sorted in natural order (`batch_2` before
/// `batch_10`).
pub fn expand(path: &Path, ext: &str) -> Result<Vec<PathBuf>, DataError> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let mut files = Vec::new();
    if name.contains(['*', '?']) {
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        for entry in read_dir_sorted(dir)? {
            let entry_name = entry.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if entry.is_file() && glob_match(name, entry_name) {
                files.push(entry);
            }
        }
        if files.is_empty() {
            return Err(DataError::NoFiles {
                message: format!("`{}`: no file matches the pattern", path.display()),
            });
        }
    } else if path.is_dir() {
        for entry in read_dir_sorted(path)? {
            let matches = entry.extension().and_then(|e| e.to_str()).is_some_and(|e| e == ext);
            if matches && entry.is_file() {
                files.push(entry);
            }
        }
        if files.is_empty() {
            return Err(DataError::NoFiles {
                message: format!("`{}`: directory holds no `.{ext}` file", path.display()),
            });
        }
    } else {
        fs::metadata(path).map_err(|e| DataError::io(path, e))?;
        files.push(path.to_path_buf());
    }
    files.sort_by(|a, b| natural_cmp(&a.to_string_lossy(), &b.to_string_lossy()));
    Ok(files)
}

/// Every file under `dir` (recursively, following links, each directory once even when links
/// form a cycle) whose extension is one of `exts` (case-insensitive), sorted by path in natural
/// order.
pub fn walk(dir: &Path, exts: &[&str]) -> Result<Vec<PathBuf>, DataError> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let real = fs::canonicalize(&d).map_err(|e| DataError::io(&d, e))?;
        if !seen.insert(real) {
            continue;
        }
        for entry in read_dir_sorted(&d)? {
            if entry.is_dir() {
                stack.push(entry);
            } else if entry
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| exts.iter().any(|x| x.eq_ignore_ascii_case(e)))
            {
                out.push(entry);
            }
        }
    }
    out.sort_by(|a, b| natural_cmp(&a.to_string_lossy(), &b.to_string_lossy()));
    Ok(out)
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let rd = fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    let mut out = Vec::new();
    for entry in rd {
        out.push(entry.map_err(|e| DataError::io(dir, e))?.path());
    }
    out.sort();
    Ok(out)
}

/// Shell-style match of a file name against `*` (any run) and `?` (one character).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Compares strings with runs of ASCII digits taken as numbers: `b2 < b10`.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let da = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let db = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (trim_zeros(&a[..da]), trim_zeros(&b[..db]));
                let ord = na.len().cmp(&nb.len()).then_with(|| na.cmp(nb)).then(da.cmp(&db));
                if ord != Ordering::Equal {
                    return ord;
                }
                a = &a[da..];
                b = &b[db..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let z = d.iter().take_while(|&&c| c == b'0').count();
    &d[z..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches_names() {
        assert!(glob_match("train_data_batch_*.npz", "train_data_batch_10.npz"));
        assert!(glob_match("*", "x"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(!glob_match("*.npz", "x.npy"));
        assert!(glob_match("*a*b", "xaxxb"));
    }

    #[test]
    fn natural_order_numbers_runs() {
        let mut v = vec!["b_10", "b_2", "b_1", "a", "b_02"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v, ["a", "b_1", "b_2", "b_02", "b_10"]);
    }
}
