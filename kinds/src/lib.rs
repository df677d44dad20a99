//! # progdiff-kinds
//!
//! The torch-free half of progdiff's stages: every stage kind's parameters (serde, JSON Schema,
//! validation), the manifest sections they read, their hashed inputs ([`kind`]), the one
//! registry of kinds ([`for_each_kind!`]), and the work that needs no tensors (noise schedules,
//! the SNR allocation of paper eq. 7-10, `command` stages, FID on statistics, dataset listings).
//!
//! The `progdiff` coordinator depends on this crate only, so it never loads libtorch; the
//! worker (`progdiff-worker`) adds `progdiff-stages`, which implements each kind's `run` on tch.
#![warn(missing_docs)]

pub mod allocate;
pub mod command;
pub mod config;
pub mod context;
pub mod data;
pub mod diffusion;
pub mod evaluate;
pub mod fast;
pub mod fid;
pub mod fid_extractor;
pub mod import;
pub mod kind;
pub mod plot;
pub mod prune;
pub mod schedule;
pub mod train;
