//! Architecture support. husk runs x86_64 guests only; everything that knows
//! about the x86 boot protocol, CPU state or firmware tables lives below.

pub mod x86_64;
