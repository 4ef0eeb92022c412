//! What an architecture's Linear can be: the pluggable [`linear::Linear`] (dense f32), GGUF
//! blocks kept as stored ([`qlinear`]), f16 ([`half`]), and the frozen-weight op they share.

pub mod frozen;
pub mod half;
pub mod linear;
pub mod moe;
pub mod qlinear;
