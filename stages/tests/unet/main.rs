//! UNet, cost accounting and checkpoint tests (one test binary: libtorch links once).

mod checkpoint;
mod common;
mod cost;
mod parity;
mod pruned;
mod state_dict;
