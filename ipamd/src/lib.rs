//! underway's node IPAM daemon. So far: [`pool`], the address pool as pure data, and [`targets`],
//! the pure decision of how the warm pool should change; the daemon around it (pool, store, reconciler, RPC server) is issue #5.

pub mod pool;
pub mod targets;
