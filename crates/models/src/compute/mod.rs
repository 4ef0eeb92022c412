//! The kernels: runtime SIMD dispatch, the Linear GEMM and decode gemv, int8 block dot
//! products, and the fused ops (norms, activations, RoPE, attention, cross-entropy) with their
//! own backward.

pub mod fused;
pub mod kernels;
pub mod ops;
pub mod qdot;
pub mod simd;
