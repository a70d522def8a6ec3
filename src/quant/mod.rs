//! Static quantization: mark, then materialize.
//!
//! fuse -> choose quantization points ([`plan`]) -> calibrate on tract ([`calibrate`], streaming
//! every batch into [`observe`] observers) -> compute parameters ([`params`]) -> emit QDQ
//! ([`qdq`]) -> check on tract.

// pub mod calibrate; (enabled once observe.rs lands)
pub mod observe;
pub mod params;
pub mod plan;
pub mod qdq;
