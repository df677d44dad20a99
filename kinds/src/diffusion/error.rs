//! What can go wrong when building a diffusion process or parsing a respacing.

/// An invalid diffusion process or respacing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DiffusionError {
    /// A respacing string that does not parse.
    #[error(
        "invalid respacing `{spec}`: {reason}\nhint: use section counts like `100` or `10,15,20`, `ddim100`, or an explicit list like `list:0,40,3999`"
    )]
    BadRespacing {
        /// The string as given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `ddimN` where no integer stride gives exactly N steps.
    #[error(
        "cannot create exactly `{count}` steps from `{steps}` timesteps with an integer stride"
    )]
    NoDdimStride {
        /// The N of `ddimN`.
        count: usize,
        /// The number of timesteps of the original process.
        steps: usize,
    },
    /// A section count larger than its section.
    #[error("cannot divide a section of `{size}` timesteps into `{count}` steps")]
    SectionTooSmall {
        /// Timesteps in the section.
        size: usize,
        /// Steps asked of it.
        count: usize,
    },
    /// A kept timestep outside `0..steps`.
    #[error("timestep `{t}` is out of range for a process of `{steps}` timesteps")]
    TimestepOutOfRange {
        /// The offending timestep.
        t: usize,
        /// The number of timesteps.
        steps: usize,
    },
    /// A respacing that keeps nothing.
    #[error("respacing `{spec}` keeps no timesteps")]
    Empty {
        /// The respacing as written.
        spec: String,
    },
    /// Fewer than two timesteps: the posterior log-variance at t=0 borrows t=1's.
    #[error("a diffusion process needs at least 2 timesteps, got `{0}`")]
    TooFewSteps(usize),
    /// A beta outside (0, 1].
    #[error("beta_{index} = `{value}` is outside (0, 1]")]
    BadBeta {
        /// Index of the beta.
        index: usize,
        /// Its value (as text, so the error stays `Eq`).
        value: String,
    },
}
