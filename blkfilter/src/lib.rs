//! blkfilter
