//! One module per command: `run`, `checkpoint`, `resume`, `inspect`.

pub mod chain;
pub mod checkpoint;
pub mod exact_pids;
pub mod inspect;
pub mod ipc;
pub mod ipmove;
pub mod net;
pub mod netlock;
pub mod precopy;
pub mod receive;
pub mod resume;
pub mod run;
pub mod send;
pub mod timens;
pub mod tree;
pub mod wire;
