//! QEMU Machine Protocol (placeholder).
