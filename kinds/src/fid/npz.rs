//! pytorch-fid's statistics files: a numpy `.npz` archive with float64 arrays `mu` (`[D]`) and
//! `sigma` (`[D, D]`), as `np.savez_compressed(path, mu=mu, sigma=sigma)` writes them; progdiff
//! may add the feature vectors themselves as a float32 array `features` (`[N, D]`), which
//! pytorch-fid does not read and KID needs.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;

use zip::write::FileOptions;
use zip::{CompressionMethod, ZipArchive, ZipWriter};

use super::{Features, FidError, Statistics};

/// The `.npz` member holding the feature vectors.
pub const FEATURES_ARRAY: &str = "features";

/// Reads `mu` and `sigma` from a pytorch-fid `.npz` file (stored or deflated members; float64
/// or float32, C or Fortran order).
pub fn read_stats(path: &Path) -> Result<Statistics, FidError> {
    let err = |message: String| FidError::Stats { path: path.to_path_buf(), message };
    let file = File::open(path).map_err(|e| err(e.to_string()))?;
    let mut zip = ZipArchive::new(file).map_err(|e| err(format!("not a .npz archive: {e}")))?;
    let mut array = |name: &str| -> Result<(Vec<usize>, Vec<f64>), FidError> {
        let mut member = zip
            .by_name(&format!("{name}.npy"))
            .map_err(|_| err(format!("has no array `{name}`")))?;
        let mut bytes = Vec::new();
        member.read_to_end(&mut bytes).map_err(|e| err(e.to_string()))?;
        parse_npy(&bytes).map_err(|m| err(format!("array `{name}`: {m}")))
    };
    let (mu_shape, mu) = array("mu")?;
    let (sigma_shape, sigma) = array("sigma")?;
    let d = match mu_shape[..] {
        [d] => d,
        _ => return Err(err(format!("`mu` must be 1-d, got shape {mu_shape:?}"))),
    };
    if sigma_shape != [d, d] {
        return Err(err(format!("`sigma` must be [{d}, {d}], got shape {sigma_shape:?}")));
    }
    Statistics::new(mu, sigma)
}

/// Writes `stats` as pytorch-fid does (`mu.npy`, `sigma.npy`, float64, deflated), readable by
/// `numpy.load` and pytorch-fid's `--save-stats` consumers.
pub fn write_stats(stats: &Statistics, path: &Path) -> Result<(), FidError> {
    write_stats_with_features(stats, None, path)
}

/// [`write_stats`], and with `features` also the feature vectors as the float32 array
/// `features` (`[N, D]`), for KID.
pub fn write_stats_with_features(
    stats: &Statistics,
    features: Option<&Features>,
    path: &Path,
) -> Result<(), FidError> {
    let err = |e: String| FidError::Stats { path: path.to_path_buf(), message: e };
    if let Some(f) = features
        && f.dim != stats.dim()
    {
        return Err(err(format!(
            "the features are {}-d but the statistics {}-d",
            f.dim,
            stats.dim()
        )));
    }
    let file = File::create(path).map_err(|e| err(e.to_string()))?;
    let mut zip = ZipWriter::new(BufWriter::new(file));
    let options = FileOptions::default().compression_method(CompressionMethod::Deflated);
    let d = stats.dim();
    let mut members = vec![
        ("mu.npy".to_string(), npy_bytes(&[d], "<f8", &stats.mu, |v, o| o.extend(v.to_le_bytes()))),
        (
            "sigma.npy".to_string(),
            npy_bytes(&[d, d], "<f8", &stats.sigma, |v, o| o.extend(v.to_le_bytes())),
        ),
    ];
    if let Some(f) = features {
        members.push((
            format!("{FEATURES_ARRAY}.npy"),
            npy_bytes(&[f.len(), f.dim], "<f4", &f.values, |v, o| o.extend(v.to_le_bytes())),
        ));
    }
    for (name, bytes) in members {
        zip.start_file(name, options).map_err(|e| err(e.to_string()))?;
        zip.write_all(&bytes).map_err(|e| err(e.to_string()))?;
    }
    let mut inner = zip.finish().map_err(|e| err(e.to_string()))?;
    inner.flush().map_err(|e| err(e.to_string()))?;
    Ok(())
}

/// The feature vectors of a statistics file that has them (the `features` array progdiff
/// writes; float32 or float64, stored as float32), `None` for one without (pytorch-fid's own
/// files).
pub fn read_features(path: &Path) -> Result<Option<Features>, FidError> {
    let err = |message: String| FidError::Stats { path: path.to_path_buf(), message };
    let file = File::open(path).map_err(|e| err(e.to_string()))?;
    let mut zip = ZipArchive::new(file).map_err(|e| err(format!("not a .npz archive: {e}")))?;
    let mut member = match zip.by_name(&format!("{FEATURES_ARRAY}.npy")) {
        Ok(m) => m,
        Err(zip::result::ZipError::FileNotFound) => return Ok(None),
        Err(e) => return Err(err(e.to_string())),
    };
    let mut bytes = Vec::new();
    member.read_to_end(&mut bytes).map_err(|e| err(e.to_string()))?;
    let (shape, values) =
        parse_npy(&bytes).map_err(|m| err(format!("array `{FEATURES_ARRAY}`: {m}")))?;
    let [n, d] = shape[..] else {
        return Err(err(format!("`{FEATURES_ARRAY}` must be [N, D], got shape {shape:?}")));
    };
    let values = values.into_iter().map(|v| v as f32).collect();
    Features::new(values, n, d).map(Some).map_err(|e| err(e.to_string()))
}

/// A version 1.0 `.npy` file of `data` with `shape` and numpy type `descr`, each value written
/// by `put`.
fn npy_bytes<T: Copy>(
    shape: &[usize],
    descr: &str,
    data: &[T],
    put: impl Fn(T, &mut Vec<u8>),
) -> Vec<u8> {
    let dims = match shape {
        [d] => format!("({d},)"),
        _ => format!("({})", shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {dims}, }}");
    // magic (6) + version (2) + length (2) + header + '\n', padded to a multiple of 64.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + std::mem::size_of_val(data));
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for &v in data {
        put(v, &mut out);
    }
    out
}

/// Shape and values (as float64, C order) of a float `.npy` file.
fn parse_npy(bytes: &[u8]) -> Result<(Vec<usize>, Vec<f64>), String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a .npy array".into());
    }
    let (len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => {
            (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12)
        }
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = bytes
        .get(start..start + len)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or("truncated .npy header")?;
    let value = |key: &str| -> Option<&str> {
        let at = header.find(&format!("'{key}'"))? + key.len() + 2;
        let rest = header[at..].trim_start().strip_prefix(':')?.trim_start();
        let end = if rest.starts_with('(') {
            rest.find(')')? + 1
        } else {
            rest.find(',').unwrap_or(rest.len())
        };
        Some(rest[..end].trim())
    };
    let descr = value("descr").ok_or("no `descr` in the .npy header")?.trim_matches('\'');
    let fortran = value("fortran_order") == Some("True");
    let shape: Vec<usize> = value("shape")
        .ok_or("no `shape` in the .npy header")?
        .trim_matches(|c| c == '(' || c == ')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<usize>().map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let count: usize = shape.iter().product();
    let data = &bytes[start + len..];
    let mut values: Vec<f64> = match descr {
        "<f8" => read_le::<8>(data, count, |b| f64::from_le_bytes(b.try_into().unwrap()))?,
        ">f8" => read_le::<8>(data, count, |b| f64::from_be_bytes(b.try_into().unwrap()))?,
        "<f4" => read_le::<4>(data, count, |b| f32::from_le_bytes(b.try_into().unwrap()) as f64)?,
        other => return Err(format!("unsupported dtype `{other}`, expected float64 or float32")),
    };
    if fortran && shape.len() == 2 {
        let (r, c) = (shape[0], shape[1]);
        let mut c_order = vec![0.0; count];
        for i in 0..r {
            for j in 0..c {
                c_order[i * c + j] = values[j * r + i];
            }
        }
        values = c_order;
    }
    Ok((shape, values))
}

fn read_le<const N: usize>(
    data: &[u8],
    count: usize,
    f: impl Fn(&[u8]) -> f64,
) -> Result<Vec<f64>, String> {
    if data.len() < count * N {
        return Err(format!("truncated data: {} bytes for {count} values", data.len()));
    }
    Ok(data[..count * N].chunks_exact(N).map(f).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_aligned_and_parses_back() {
        let f8 = |v: f64, o: &mut Vec<u8>| o.extend(v.to_le_bytes());
        let bytes = npy_bytes(&[2, 2], "<f8", &[1.0, 2.0, 3.0, 4.0], f8);
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        let (shape, values) = parse_npy(&bytes).unwrap();
        assert_eq!(shape, vec![2, 2]);
        assert_eq!(values, vec![1.0, 2.0, 3.0, 4.0]);
        let (shape, _) = parse_npy(&npy_bytes(&[3], "<f8", &[0.0; 3], f8)).unwrap();
        assert_eq!(shape, vec![3]);
    }

    #[test]
    fn features_round_trip_beside_the_statistics() {
        let dir = tempfile::tempdir().unwrap();
        let f = Features::new(vec![1.5, -2.25, 3.0, 0.1, 7.0, 1e-8], 3, 2).unwrap();
        let stats = f.statistics().unwrap();
        let with = dir.path().join("with.npz");
        write_stats_with_features(&stats, Some(&f), &with).unwrap();
        assert_eq!(read_stats(&with).unwrap(), stats);
        assert_eq!(read_features(&with).unwrap(), Some(f.clone()));
        let without = dir.path().join("without.npz");
        write_stats(&stats, &without).unwrap();
        assert_eq!(read_features(&without).unwrap(), None);
        let wrong = Features::new(vec![0.0; 3], 1, 3).unwrap();
        assert!(write_stats_with_features(&stats, Some(&wrong), &dir.path().join("x")).is_err());
    }
}
