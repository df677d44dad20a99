//! The torch-free part of the diffusion process: timestep respacing and its errors (the process
//! itself is `progdiff_stages::diffusion`).

mod error;
pub mod respacing;

pub use error::DiffusionError;
pub use respacing::{Respacing, space_timesteps};
