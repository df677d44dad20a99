//! progdiff: declarative, content-cached pipelines for Step-Adaptive Training of diffusion
//! models. A manifest ([`manifest`]) becomes a DAG of stage instances ([`dag`]); each gets a
//! content key ([`fingerprint`]); the planner ([`plan`]) compares keys with the cache and says
//! what runs and why; the executor ([`executor`]) runs each instance as a [`job`] in a worker
//! process. Stage kinds' parameters and inputs live in `progdiff-kinds`, their work on libtorch
//! in `progdiff-stages` (linked only by the worker binary), storage in `progdiff-cache`.
#![warn(missing_docs)]

pub mod dag;
pub mod executor;
pub mod fid;
pub mod fingerprint;
pub mod job;
pub mod kinds;
pub mod manifest;
pub mod plan;
pub mod profile;
pub mod remote;
pub mod report;
pub mod report_plots;
pub mod resources;
pub mod schema;
pub mod slurm;
pub mod slurm_gc;
pub mod summary;
pub mod worker;
