//! Unit tests of the translation table (filled in below).
