//! Grammar front ends for constrained decoding.

pub mod gbnf;
