//! fem-coder: sandboxed tools for running code, commands and reading files.
pub mod sandbox;
