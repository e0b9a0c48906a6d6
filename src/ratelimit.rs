//! Rate limiting of source reads.
