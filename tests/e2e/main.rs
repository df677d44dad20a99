//! End-to-end tests: the `progdiff` binary on tiny manifests in temporary directories.

mod common;
mod engine;
mod manifests;
mod prune;
mod validate;
