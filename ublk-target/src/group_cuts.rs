//! Consistency-group cuts on the recovery side: which recovery points end at a cut,
//! and the cuts every volume of a group has a point for.
//!
//! A segment flagged `GROUP_MARK` ends at group cut `N` (its header's `group_cut`):
//! on every volume of the group, the point it ends is "every record of the group with a
//! seq below the cut's" (see blkfilter's `ring::group`). The points with one cut number,
//! one per volume, are together a state the group could have had after a power cut:
//! fail every volume over to them and a database spread over the volumes recovers as
//! from a crash.
//!
//! The applier records each such segment in `JOURNAL/group-cuts`, one text line
//! `INDEX CUT` (segment index in hex as in the undo file names, cut in decimal),
//! appended and fdatasynced before the applied position moves past the segment, so a
//! point in the catalog never lacks its cut. A line written twice (an apply interrupted
//! after writing it) is harmless; lines for indexes with no point are ignored.

use crate::error::{Result, TargetError};
use crate::points::{format_utc_ms, Catalog, RecoveryPoint};
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The cut file in a journal directory.
pub fn cut_file(journal: &Path) -> PathBuf {
    journal.join("group-cuts")
}

/// Notes that segment `index` ends at group cut `cut`; durable on return.
pub fn record(journal: &Path, index: u64, cut: u32) -> Result<()> {
    let path = cut_file(journal);
    let io = |e| {
        TargetError::io(
            format!("recording group cut {cut} in {}", path.display()),
            e,
        )
    };
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(io)?;
    file.write_all(format!("{index:016x} {cut}\n").as_bytes())
        .map_err(io)?;
    file.sync_data().map_err(io)
}

/// Segment index → group cut, from the journal's cut file (empty when there is none).
pub fn load(journal: &Path) -> Result<BTreeMap<u64, u32>> {
    let path = cut_file(journal);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(TargetError::io(format!("reading {}", path.display()), e)),
    };
    let mut cuts = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let parsed = line.split_once(' ').and_then(|(index, cut)| {
            Some((u64::from_str_radix(index, 16).ok()?, cut.parse().ok()?))
        });
        let Some((index, cut)) = parsed else {
            return Err(TargetError::Journal {
                path: path.clone(),
                what: format!("line {} is not `INDEX CUT`: {line:?}", n + 1),
            });
        };
        cuts.insert(index, cut);
    }
    Ok(cuts)
}

/// One group cut that every volume has a recovery point for.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GroupPoint {
    pub cut: u32,
    /// Per volume, in the order given: its point at the cut.
    pub points: Vec<(String, RecoveryPoint)>,
}

/// The cuts at which every one of `catalogs` (volume name, catalog) has a recovery
/// point, oldest first.
pub fn common_points(catalogs: &[(String, Catalog)]) -> Vec<GroupPoint> {
    let Some(((_, first), rest)) = catalogs.split_first() else {
        return Vec::new();
    };
    first
        .points
        .iter()
        .filter_map(|p| p.group_cut)
        .filter_map(|cut| {
            let points = std::iter::once((&catalogs[0].0, first))
                .chain(rest.iter().map(|(v, c)| (v, c)))
                .map(|(volume, catalog)| Some((volume.clone(), *catalog.find_cut(cut)?)))
                .collect::<Option<Vec<_>>>()?;
            Some(GroupPoint { cut, points })
        })
        .collect()
}

/// A table of [`common_points`].
pub fn table(volumes: &[String], points: &[GroupPoint]) -> String {
    let mut out = format!("{:>8}  {:<24}", "CUT", "TIME (UTC)");
    for v in volumes {
        out += &format!("  {v:>12}");
    }
    out.push('\n');
    for g in points {
        let created = g.points.iter().map(|(_, p)| p.created_unix_ms).max();
        let time = created.map_or("-".into(), format_utc_ms);
        out += &format!("{:>8}  {time:<24}", g.cut);
        for (_, p) in &g.points {
            out += &format!("  {:>12}", p.index);
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_round_trip_and_a_damaged_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_empty());
        record(dir.path(), 0x2a, 7).unwrap();
        record(dir.path(), 0x2a, 7).unwrap();
        record(dir.path(), 0x30, 8).unwrap();
        assert_eq!(
            load(dir.path()).unwrap().into_iter().collect::<Vec<_>>(),
            [(0x2a, 7), (0x30, 8)]
        );
        std::fs::write(cut_file(dir.path()), "2a 7\nnonsense\n").unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
    }
}
