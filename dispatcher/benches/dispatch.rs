//! Dispatch benchmark (written below).

fn main() {}
