//! ublk-target
