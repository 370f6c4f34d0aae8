//! shipper
