//! One module per command: `run`, `checkpoint`, `resume`, `inspect`.

pub mod checkpoint;
pub mod exact_pids;
pub mod inspect;
pub mod ipc;
pub mod net;
pub mod netlock;
pub mod resume;
pub mod run;
pub mod timens;
pub mod tree;
