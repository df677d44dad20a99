//! The real work of progdiff's stages, on tch: noise schedules, SNR-based FLOPs allocation
//! (paper eq. 7-10), and (as they land) data, IDDPM diffusion, the UNet, training, pruning and
//! evaluation.
//!
//! Each stage kind owns its parameter types (serde + JSON Schema) and a `run` function that takes
//! a [`context::StageContext`]; the engine owns manifests, keys, the cache and scheduling.
#![warn(missing_docs)]

pub mod allocate;
pub mod checkpoint;
pub mod command;
pub mod config;
pub mod context;
pub mod cost;
pub mod data;
pub mod diffusion;
pub mod evaluate;
pub mod fid;
pub mod image_io;
pub mod import;
pub mod plot;
pub mod prune;
pub mod sample;
pub mod schedule;
pub mod train;
pub mod unet;
