//! The real work of progdiff's stages, on tch: data, IDDPM diffusion, the UNet, training,
//! pruning, sampling and FID features — and [`run::Run`], each stage kind's `run`, which the
//! worker binary dispatches to.
//!
//! Each kind's parameters and hashed inputs live in the torch-free `progdiff-kinds` (re-exported
//! here under the same module names); the engine owns manifests, keys, the cache and scheduling.
#![warn(missing_docs)]

pub mod checkpoint;
pub mod cost;
pub mod data;
pub mod diffusion;
pub mod evaluate;
pub mod fast;
pub mod fid;
pub mod image_io;
pub mod import;
pub mod optim;
pub mod prune;
pub mod run;
pub mod sample;
pub mod train;
pub mod transfer;
pub mod unet;

pub use progdiff_kinds::{allocate, command, config, context, fid_extractor, kind, plot, schedule};
