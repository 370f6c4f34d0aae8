//! A readable dump of one segment: its header always, its records when a key is given.

use crate::error::Result;
use crate::header::flags;
use crate::key::{hex, Key};
use crate::record::Op;
use crate::segment::{open, read_info};
use std::fmt::Write;

fn flag_names(bits: u32) -> String {
    let names: Vec<&str> = [
        (flags::INITIAL_SYNC, "initial-sync"),
        (flags::RESYNC, "resync"),
        (flags::CRASH_POINT, "crash-point"),
        (flags::APP_CONSISTENT, "app-consistent"),
        (flags::GROUP_MARK, "group-mark"),
        (flags::NEW_EPOCH, "new-epoch"),
    ]
    .iter()
    .filter(|(bit, _)| bits & bit != 0)
    .map(|(_, name)| *name)
    .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(",")
    }
}

/// Describes the segment in `bytes`. With a key, the tag is verified and every record is
/// listed (payloads summarised); without one, only the header is shown.
pub fn inspect(bytes: Vec<u8>, name: &str, key: Option<&Key>) -> Result<String> {
    let info = read_info(&bytes, name)?;
    let h = &info.header;
    let mut out = String::new();
    let codec = if h.codec == crate::header::CODEC_LZ4 {
        "lz4"
    } else {
        "stored"
    };
    let _ = writeln!(out, "segment      {name}");
    let _ = writeln!(out, "volume       {}", h.volume);
    let _ = writeln!(out, "epoch        {:016x}", h.epoch);
    let _ = writeln!(out, "index        {:016x} ({})", h.index, h.index);
    let _ = writeln!(
        out,
        "seq          {}..={} ({} records)",
        h.first_seq, h.last_seq, h.record_count
    );
    let _ = writeln!(out, "created      {} ms since epoch", h.created_unix_ms);
    let _ = writeln!(out, "flags        {}", flag_names(h.flags));
    let _ = writeln!(
        out,
        "body         {} bytes {codec}, {} plain, AES-256-GCM key id {}",
        h.body_len,
        h.plain_len,
        h.key_id_hex()
    );
    let _ = writeln!(out, "prev digest  {}", hex(&h.prev_digest));
    let _ = writeln!(out, "digest       {}", hex(&info.digest));
    let Some(key) = key else {
        let _ = writeln!(out, "records      (pass a key to verify and list them)");
        return Ok(out);
    };
    let segment = open(bytes, name, key)?;
    let _ = writeln!(out, "tag          verified");
    for r in segment.records() {
        let detail = match r.op {
            Op::Flush => String::new(),
            Op::Mark => format!(
                " label {:?}{}",
                String::from_utf8_lossy(r.data),
                if r.flags & 1 != 0 {
                    " app-consistent"
                } else {
                    ""
                }
            ),
            _ => format!(" offset {} len {}", r.offset, r.len),
        };
        let _ = writeln!(out, "  {:>10} {:?}{detail}", r.seq, r.op);
    }
    Ok(out)
}
