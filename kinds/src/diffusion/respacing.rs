//! Which timesteps of a T-step process a shorter sampling process keeps (IDDPM `respace.py`).
//!
//! Three spellings, as the manifest's `diffusion.sample_steps` string:
//!
//! - `"100"` or `"10,15,20"`: section counts. T is cut into as many equal sections as there are
//!   counts (the first `T % n` sections one step longer) and each section keeps its count of steps
//!   at the float stride `(size - 1) / (count - 1)`, accumulated and rounded half-to-even as
//!   Python's `round` does. `"100"` of 4000 keeps `{0, 40, 81, 121, ..., 3959, 3999}`.
//! - `"ddimN"`: the DDIM paper's `range(0, T, stride)` with the smallest integer stride giving
//!   exactly N steps; an error when none does. `"ddim100"` of 4000 keeps `{0, 40, ..., 3960}`.
//! - `"list:0,40,3999"`: exactly these timesteps (an extension; IDDPM has no such form).
//!
//! The empty string keeps every timestep.

use std::fmt;
use std::str::FromStr;

use super::error::DiffusionError;

/// A parsed `sample_steps` respacing.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Respacing {
    /// Keep every timestep (`""`).
    #[default]
    All,
    /// Section counts (`"100"`, `"10,15,20"`).
    Sections(Vec<usize>),
    /// DDIM's exact integer stride (`"ddim100"`).
    Ddim(usize),
    /// Explicit timesteps (`"list:0,40,3999"`).
    List(Vec<usize>),
}

const LIST_PREFIX: &str = "list:";
const DDIM_PREFIX: &str = "ddim";

impl Respacing {
    /// Parses a respacing string; see the module docs for the forms.
    pub fn parse(spec: &str) -> Result<Self, DiffusionError> {
        let bad = |reason: String| DiffusionError::BadRespacing { spec: spec.to_string(), reason };
        let numbers = |s: &str| -> Result<Vec<usize>, DiffusionError> {
            s.split(',')
                .map(|part| {
                    let part = part.trim();
                    part.parse::<usize>()
                        .map_err(|_| bad(format!("`{part}` is not a non-negative integer")))
                })
                .collect()
        };
        let trimmed = spec.trim();
        if trimmed.is_empty() {
            Ok(Respacing::All)
        } else if let Some(rest) = trimmed.strip_prefix(LIST_PREFIX) {
            Ok(Respacing::List(numbers(rest)?))
        } else if let Some(rest) = trimmed.strip_prefix(DDIM_PREFIX) {
            let n = rest
                .trim()
                .parse::<usize>()
                .map_err(|_| bad(format!("`{rest}` after `ddim` is not a step count")))?;
            if n == 0 {
                return Err(bad("`ddim0` keeps no steps".to_string()));
            }
            Ok(Respacing::Ddim(n))
        } else {
            Ok(Respacing::Sections(numbers(trimmed)?))
        }
    }

    /// The kept timesteps of a process with `num_timesteps` steps, sorted ascending, no repeats.
    pub fn timesteps(&self, num_timesteps: usize) -> Result<Vec<usize>, DiffusionError> {
        let steps = match self {
            Respacing::All => (0..num_timesteps).collect(),
            Respacing::Ddim(count) => ddim_timesteps(num_timesteps, *count)?,
            Respacing::Sections(counts) => section_timesteps(num_timesteps, counts)?,
            Respacing::List(list) => {
                if let Some(&t) = list.iter().find(|&&t| t >= num_timesteps) {
                    return Err(DiffusionError::TimestepOutOfRange { t, steps: num_timesteps });
                }
                let mut list = list.clone();
                list.sort_unstable();
                list.dedup();
                list
            }
        };
        if steps.is_empty() {
            return Err(DiffusionError::Empty { spec: self.to_string() });
        }
        Ok(steps)
    }
}

impl FromStr for Respacing {
    type Err = DiffusionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Respacing::parse(s)
    }
}

impl fmt::Display for Respacing {
    /// The canonical spelling, which [`Respacing::parse`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let join = |v: &[usize]| v.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
        match self {
            Respacing::All => Ok(()),
            Respacing::Sections(counts) => f.write_str(&join(counts)),
            Respacing::Ddim(n) => write!(f, "{DDIM_PREFIX}{n}"),
            Respacing::List(list) => write!(f, "{LIST_PREFIX}{}", join(list)),
        }
    }
}

/// IDDPM `space_timesteps(num_timesteps, spec)`: the kept timesteps, sorted ascending.
pub fn space_timesteps(num_timesteps: usize, spec: &str) -> Result<Vec<usize>, DiffusionError> {
    Respacing::parse(spec)?.timesteps(num_timesteps)
}

/// `range(0, T, i)` for the first stride `i` in `1..T` giving exactly `count` steps.
fn ddim_timesteps(num_timesteps: usize, count: usize) -> Result<Vec<usize>, DiffusionError> {
    (1..num_timesteps)
        .find(|&stride| num_timesteps.div_ceil(stride) == count)
        .map(|stride| (0..num_timesteps).step_by(stride).collect())
        .ok_or(DiffusionError::NoDdimStride { count, steps: num_timesteps })
}

/// Equal sections, each strided to its count with IDDPM's float stride and Python rounding.
fn section_timesteps(num_timesteps: usize, counts: &[usize]) -> Result<Vec<usize>, DiffusionError> {
    let size_per = num_timesteps / counts.len();
    let extra = num_timesteps % counts.len();
    let mut start = 0;
    let mut all = Vec::new();
    for (i, &count) in counts.iter().enumerate() {
        let size = size_per + usize::from(i < extra);
        if size < count {
            return Err(DiffusionError::SectionTooSmall { size, count });
        }
        let stride = if count <= 1 { 1.0 } else { (size - 1) as f64 / (count - 1) as f64 };
        let mut cur = 0.0_f64;
        for _ in 0..count {
            // Python's round() rounds half to even.
            all.push(start + cur.round_ties_even() as usize);
            cur += stride;
        }
        start += size;
    }
    all.sort_unstable();
    all.dedup();
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form_and_prints_it_back() {
        for (spec, want) in [
            ("", Respacing::All),
            ("100", Respacing::Sections(vec![100])),
            ("10, 15,20", Respacing::Sections(vec![10, 15, 20])),
            ("ddim50", Respacing::Ddim(50)),
            ("list:3,1,2", Respacing::List(vec![3, 1, 2])),
        ] {
            let got = Respacing::parse(spec).unwrap();
            assert_eq!(got, want, "{spec}");
            assert_eq!(Respacing::parse(&got.to_string()).unwrap(), want);
        }
    }

    #[test]
    fn rejects_malformed_strings() {
        for spec in ["abc", "10,,5", "ddim", "ddimx", "ddim0", "list:", "list:1,a", "-3"] {
            let err = Respacing::parse(spec).unwrap_err();
            assert!(matches!(err, DiffusionError::BadRespacing { .. }), "{spec}: {err}");
        }
        let msg = Respacing::parse("abc").unwrap_err().to_string();
        assert!(msg.starts_with("invalid respacing `abc`: `abc` is not a non-negative integer"));
    }

    #[test]
    fn the_reference_example_of_100_out_of_4000() {
        let steps = space_timesteps(4000, "100").unwrap();
        assert_eq!(steps.len(), 100);
        assert_eq!(&steps[..5], &[0, 40, 81, 121, 162]);
        assert_eq!(&steps[98..], &[3959, 3999]);
        let ddim = space_timesteps(4000, "ddim100").unwrap();
        assert_eq!(ddim, (0..4000).step_by(40).collect::<Vec<_>>());
    }

    #[test]
    fn impossible_respacings_are_errors() {
        assert_eq!(
            space_timesteps(4000, "ddim3000").unwrap_err(),
            DiffusionError::NoDdimStride { count: 3000, steps: 4000 }
        );
        assert_eq!(
            space_timesteps(10, "6,6").unwrap_err(),
            DiffusionError::SectionTooSmall { size: 5, count: 6 }
        );
        assert_eq!(
            space_timesteps(10, "list:0,10").unwrap_err(),
            DiffusionError::TimestepOutOfRange { t: 10, steps: 10 }
        );
        assert!(matches!(space_timesteps(10, "0").unwrap_err(), DiffusionError::Empty { .. }));
    }

    #[test]
    fn lists_are_sorted_and_deduplicated_and_all_keeps_everything() {
        assert_eq!(space_timesteps(10, "list:9,0,5,5").unwrap(), vec![0, 5, 9]);
        assert_eq!(space_timesteps(5, "").unwrap(), vec![0, 1, 2, 3, 4]);
    }
}
