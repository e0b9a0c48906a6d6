//! Live capture from a running QEMU (see docs/CAPTURE.md).
