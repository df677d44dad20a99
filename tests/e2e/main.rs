//! End-to-end tests: the `progdiff` binary on tiny manifests in temporary directories.

#[path = "../support/chat_server.rs"]
mod chat_server;
mod common;
mod engine;
mod evaluate;
mod hostile;
mod integrity;
mod manifests;
mod prune;
mod remote;
mod seeds;
mod slurm;
mod sweep;
mod train;
mod validate;
mod worker;
