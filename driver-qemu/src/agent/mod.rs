//! QEMU guest agent protocol (placeholder).
