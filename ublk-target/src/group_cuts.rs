//! Consistency-group cuts on the recovery side: which recovery points end at a cut,
//! and the cuts every volume of a group has a point at.
//!
//! A segment flagged `GROUP_MARK` ends with a group-cut MARK whose label
//! ([`GroupCutLabel`], inside the authenticated body) names the group clock and the
//! cuts `first..=last` it stands for: on every volume of the group, the point it ends
//! is "every record of the group below the cut's seq" (see blkfilter's `ring::group`).
//! The points of one cut, one per volume, are together a state the group could have
//! had after a power cut: fail every volume over to them and a database spread over the
//! volumes recovers as from a crash. Cut numbers start at 1 with each new clock (after
//! a reboot), so a cut is known by clock id and number.
//!
//! The applier records each such segment in `JOURNAL/group-cuts`, one text line
//! `INDEX CLOCK FIRST LAST [FIRST_MS]` (segment index and clock id in hex; the time cut
//! `FIRST` was made, where the label has it), appended and
//! fdatasynced before the applied position moves past the segment, so a point in the
//! catalog never lacks its cuts. A line written twice (an apply interrupted after it)
//! is harmless; a damaged line (a torn append) is skipped with a warning, costing at
//! most that point its cuts, never the catalog. Pruning and rollback rewrite the file
//! without the lines of points that no longer exist.

use crate::error::{Result, TargetError};
use crate::points::{format_utc_ms, Catalog, RecoveryPoint};
use changelog::record::MARK_GROUP_CUT;
use changelog::segment::OpenedSegment;
use changelog::{GroupCutLabel, Op};
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The cut file in a journal directory.
pub fn cut_file(journal: &Path) -> PathBuf {
    journal.join("group-cuts")
}

/// The cuts `segment` ends at, if it is a group-cut segment.
pub fn segment_cuts(segment: &OpenedSegment) -> Option<GroupCutLabel> {
    if segment.header.flags & changelog::flags::GROUP_MARK == 0 {
        return None;
    }
    let last = segment.records().last()?;
    (last.op == Op::Mark && last.flags & MARK_GROUP_CUT != 0)
        .then(|| GroupCutLabel::parse(last.data))
        .flatten()
}

fn line(index: u64, cuts: &GroupCutLabel) -> String {
    let label = cuts.encode();
    let fields = label.strip_prefix("group-cut ").expect("a label's prefix");
    format!("{index:016x} {fields}\n")
}

/// Notes that segment `index` ends at `cuts`; durable on return.
pub fn record(journal: &Path, index: u64, cuts: &GroupCutLabel) -> Result<()> {
    let path = cut_file(journal);
    let io = |e| TargetError::io(format!("recording group cuts in {}", path.display()), e);
    let new = !path.exists();
    let mut file = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(&path)
        .map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let mut last = [b'\n'];
    if len > 0 {
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut last, len - 1).map_err(io)?;
    }
    // After a torn append, start a line of our own rather than finish the torn one.
    let text = if last[0] == b'\n' { "" } else { "\n" }.to_string() + &line(index, cuts);
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_data().map_err(io)?;
    if new {
        // The file's name must survive a crash as well as its line.
        std::fs::File::open(journal)
            .and_then(|dir| dir.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

/// Segment index → the cuts it ends at, from the journal's cut file (empty when there
/// is none; damaged lines are skipped with a warning).
pub fn load(journal: &Path) -> Result<BTreeMap<u64, GroupCutLabel>> {
    let path = cut_file(journal);
    let text = match std::fs::read(&path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(TargetError::io(format!("reading {}", path.display()), e)),
    };
    let mut cuts = BTreeMap::new();
    for (n, text) in text.lines().enumerate() {
        match parse_line(text) {
            Some((index, label)) => {
                cuts.insert(index, label);
            }
            None => log::warn!(
                "{} line {}: not `INDEX CLOCK FIRST LAST [FIRST_MS]` ({text:?}); skipped",
                path.display(),
                n + 1
            ),
        }
    }
    Ok(cuts)
}

fn parse_line(text: &str) -> Option<(u64, GroupCutLabel)> {
    let (index, rest) = text.split_once(' ')?;
    let label = GroupCutLabel::parse(format!("group-cut {rest}").as_bytes())?;
    Some((u64::from_str_radix(index, 16).ok()?, label))
}

/// Rewrites the cut file with only the lines of indexes `keep` accepts (after pruning
/// or a rollback). Atomic: a new file is renamed over the old one.
pub fn retain(journal: &Path, keep: impl Fn(u64) -> bool) -> Result<()> {
    let path = cut_file(journal);
    let cuts = load(journal)?;
    if cuts.keys().all(|&i| keep(i)) {
        return Ok(());
    }
    let text: String = cuts
        .iter()
        .filter(|(&i, _)| keep(i))
        .map(|(&i, c)| line(i, c))
        .collect();
    let tmp = journal.join("group-cuts.tmp");
    let io = |e| TargetError::io(format!("rewriting {}", path.display()), e);
    let mut file = std::fs::File::create(&tmp).map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_data().map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    std::fs::File::open(journal)
        .and_then(|dir| dir.sync_all())
        .map_err(io)
}

/// A cut every volume has a recovery point at: cuts `first..=last` of `clock` (a run
/// of cuts with the same points on every volume is one row).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GroupPoint {
    pub clock: u64,
    pub first: u64,
    pub last: u64,
    /// Per volume, in the order given: its point at these cuts.
    pub points: Vec<(String, RecoveryPoint)>,
}

impl GroupPoint {
    /// When the newest of its points was made (ms since the Unix epoch): just after the
    /// cut, on the source's clock.
    pub fn newest_unix_ms(&self) -> Option<u64> {
        self.points.iter().map(|(_, p)| p.created_unix_ms).max()
    }

    /// When cut `first` was made, where a volume's label says (one whose point's cuts
    /// start there; labels of older builds carry no time).
    pub fn cut_unix_ms(&self) -> Option<u64> {
        self.points.iter().find_map(|(_, p)| {
            p.group_cuts
                .filter(|c| c.clock == self.clock && c.first == self.first)
                .and_then(|c| c.first_unix_ms)
        })
    }

    /// The time to show for it: the cut's own, else its newest point's.
    pub fn shown_unix_ms(&self) -> Option<u64> {
        self.cut_unix_ms().or_else(|| self.newest_unix_ms())
    }
}

/// The cuts at which every one of `catalogs` (volume name, catalog) has a recovery
/// point, oldest first.
pub fn common_points(catalogs: &[(String, Catalog)]) -> Vec<GroupPoint> {
    // (clock, cut) → point of each volume.
    let per_volume: Vec<BTreeMap<(u64, u64), &RecoveryPoint>> = catalogs
        .iter()
        .map(|(_, catalog)| {
            let mut cuts = BTreeMap::new();
            for p in &catalog.points {
                if let Some(c) = &p.group_cuts {
                    for cut in c.first..=c.last {
                        cuts.insert((c.clock, cut), p);
                    }
                }
            }
            cuts
        })
        .collect();
    let Some((first, rest)) = per_volume.split_first() else {
        return Vec::new();
    };
    let mut rows: Vec<GroupPoint> = Vec::new();
    for (&(clock, cut), &p) in first {
        let Some(others) = rest
            .iter()
            .map(|m| m.get(&(clock, cut)).copied())
            .collect::<Option<Vec<_>>>()
        else {
            continue;
        };
        let points: Vec<(String, RecoveryPoint)> = std::iter::once(p)
            .chain(others)
            .zip(catalogs)
            .map(|(p, (name, _))| (name.clone(), *p))
            .collect();
        match rows.last_mut() {
            Some(row) if row.clock == clock && row.last + 1 == cut && row.points == points => {
                row.last = cut;
            }
            _ => rows.push(GroupPoint {
                clock,
                first: cut,
                last: cut,
                points,
            }),
        }
    }
    rows
}

/// The points of `catalog` at cut number `cut`, with their clock: more than one when
/// the number exists under several clocks (numbers restart with a new clock).
pub fn points_at(catalog: &Catalog, cut: u64) -> Vec<(u64, u64)> {
    catalog
        .points
        .iter()
        .filter_map(|p| {
            p.group_cuts
                .filter(|c| c.contains(cut))
                .map(|c| (c.clock, p.index))
        })
        .collect()
}

/// A table of [`common_points`].
pub fn table(volumes: &[String], points: &[GroupPoint]) -> String {
    let mut out = format!("{:>14}  {:<16}  {:<23}", "CUT", "CLOCK", "TIME (UTC)");
    for v in volumes {
        out += &format!("  {v:>12}");
    }
    out.push('\n');
    for g in points {
        let cuts = if g.first == g.last {
            g.first.to_string()
        } else {
            format!("{}..={}", g.first, g.last)
        };
        let time = g.shown_unix_ms().map_or("-".into(), format_utc_ms);
        out += &format!("{cuts:>14}  {:016x}  {time:<23}", g.clock);
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

    fn label(clock: u64, first: u64, last: u64) -> GroupCutLabel {
        GroupCutLabel {
            clock,
            first,
            last,
            first_unix_ms: None,
        }
    }

    #[test]
    fn a_group_point_shows_the_time_its_cut_was_made_where_a_label_says() {
        let point = |index, created_unix_ms, first, last, cut_ms| RecoveryPoint {
            index,
            first_seq: index,
            last_seq: index,
            created_unix_ms,
            crash_consistent: true,
            app_consistent: false,
            latest: false,
            group_cuts: Some(GroupCutLabel {
                first_unix_ms: cut_ms,
                ..label(7, first, last)
            }),
        };
        let catalog = |points| Catalog {
            points,
            ..Catalog::default()
        };
        // Volume a recorded cut 4, then 5 and 6 together; b, idle, 4 to 6 at once; c's
        // older build gave no times.
        let a = || {
            vec![
                point(1, 950, 4, 4, Some(900)),
                point(2, 1100, 5, 6, Some(1000)),
            ]
        };
        let b = || vec![point(1, 960, 4, 6, Some(900))];
        let c = || vec![point(3, 1200, 4, 6, None)];
        let times = |volumes: [(&str, Vec<RecoveryPoint>); 2]| {
            let catalogs = volumes.map(|(name, points)| (name.to_string(), catalog(points)));
            common_points(&catalogs)
                .iter()
                .map(|g| (g.first, g.last, g.cut_unix_ms(), g.shown_unix_ms()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            times([("a", a()), ("b", b())]),
            [(4, 4, Some(900), Some(900)), (5, 6, Some(1000), Some(1000))]
        );
        assert_eq!(
            times([("b", b()), ("c", c())]),
            [(4, 6, Some(900), Some(900))]
        );
        // Cut 5's row: only a's label starts there.
        assert_eq!(
            times([("a", a()), ("c", c())]),
            [(4, 4, Some(900), Some(900)), (5, 6, Some(1000), Some(1000))]
        );
        // No label with a time: the newest point's time is shown.
        assert_eq!(times([("c", c()), ("c2", c())]), [(4, 6, None, Some(1200))]);
    }

    #[test]
    fn cuts_round_trip_a_damaged_line_is_skipped_and_retain_rewrites() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_empty());
        record(dir.path(), 0x2a, &label(7, 1, 1)).unwrap();
        record(dir.path(), 0x2a, &label(7, 1, 1)).unwrap();
        // A torn append.
        let mut f = OpenOptions::new()
            .append(true)
            .open(cut_file(dir.path()))
            .unwrap();
        f.write_all(b"0000000000000030 00000000000").unwrap();
        drop(f);
        let timed = GroupCutLabel {
            first_unix_ms: Some(1_796_000_000_123),
            ..label(7, 2, 4)
        };
        record(dir.path(), 0x31, &timed).unwrap();
        let cuts = load(dir.path()).unwrap();
        assert_eq!(
            cuts.into_iter().collect::<Vec<_>>(),
            [(0x2a, label(7, 1, 1)), (0x31, timed)]
        );
        retain(dir.path(), |i| i > 0x2a).unwrap();
        assert_eq!(
            load(dir.path()).unwrap().into_iter().collect::<Vec<_>>(),
            [(0x31, timed)]
        );
    }
}
