//! RWKV ("Receptance Weighted Key Value") on the CPU, under one name: the engine
//! ([`rwkv_core`]: formats, tensors, kernels, the four generations, tokenizers, sampling), the
//! trainer ([`train`]) and the OpenAI-compatible server ([`server`]). The `rwkv` binary is
//! built from this package; a program that only runs models needs `rwkv-core` alone.

pub use rwkv_core::*;
pub use rwkv_server as server;
pub use rwkv_train as train;

pub mod fuzz;
