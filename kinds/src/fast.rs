//! Opt-in GPU fast paths (`progdiff run --fast ...`): faster kernels that give up bitwise
//! reproducibility.
//!
//! Off by default, and never part of a key: they change results only in the last bits (a
//! different convolution algorithm, memory layout or attention kernel sums in another order), so
//! a result computed with them is cached under the same key as one computed without. Use them
//! for paper-scale runs where throughput matters more than replaying a run bit for bit; leave
//! them off where two runs must agree exactly (the resume and reproducibility guarantees hold
//! only without them). On the CPU they do nothing.

use serde::{Deserialize, Serialize};

/// Which fast paths a worker uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FastPaths {
    /// `cudnn_benchmark`: cuDNN times the convolution algorithms for each new shape and keeps
    /// the fastest (the choice, and so the last bits, can differ between runs).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cudnn_benchmark: bool,
    /// `channels_last`: the UNet's activations in NHWC layout, which tensor-core convolutions
    /// prefer (cuDNN converts the weights per call).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub channels_last: bool,
    /// `fused_attention`: libtorch's `scaled_dot_product_attention` (flash / memory-efficient
    /// kernels) instead of the written-out softmax(QK^T)V.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fused_attention: bool,
}

/// The names `--fast` takes.
pub const NAMES: [&str; 3] = ["cudnn_benchmark", "channels_last", "fused_attention"];

impl FastPaths {
    /// Parses `--fast` values: names from [`NAMES`], or `all`.
    pub fn parse(names: &[String]) -> Result<FastPaths, String> {
        let mut f = FastPaths::default();
        for n in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
            match n {
                "all" => {
                    f = FastPaths {
                        cudnn_benchmark: true,
                        channels_last: true,
                        fused_attention: true,
                    }
                }
                "cudnn_benchmark" => f.cudnn_benchmark = true,
                "channels_last" => f.channels_last = true,
                "fused_attention" => f.fused_attention = true,
                other => {
                    return Err(format!(
                        "unknown fast path `{other}`, expected `all` or one of {}",
                        NAMES.map(|n| format!("`{n}`")).join(", ")
                    ));
                }
            }
        }
        Ok(f)
    }

    /// Whether none is on.
    pub fn is_none(&self) -> bool {
        *self == FastPaths::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_all() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(FastPaths::parse(&[]).unwrap().is_none());
        let f = FastPaths::parse(&s(&["channels_last"])).unwrap();
        assert!(f.channels_last && !f.cudnn_benchmark && !f.fused_attention);
        let all = FastPaths::parse(&s(&["all"])).unwrap();
        assert!(all.channels_last && all.cudnn_benchmark && all.fused_attention);
        let e = FastPaths::parse(&s(&["cudnn"])).unwrap_err();
        assert_eq!(
            e,
            "unknown fast path `cudnn`, expected `all` or one of `cudnn_benchmark`, `channels_last`, `fused_attention`"
        );
    }
}
