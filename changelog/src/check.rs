//! `status --check`: a volume health report in the monitoring-plugin convention, for
//! Nagios, Icinga, Zabbix, Sensu, Checkmk and the like, which run a command and read
//! its exit status and output. Both sides offer it (`shipper status --check`,
//! `ublk-target status --check`), for sites that monitor without Prometheus.
//!
//! Contract:
//!
//! * Exit status: 0 OK (every volume Healthy), 1 WARNING, 2 CRITICAL (the worst
//!   volume's), 3 UNKNOWN (nothing could be judged: a bad config, no volumes).
//! * First line: `NAME STATE - summary | perfdata`. The summary names every volume that
//!   is not Healthy with its one-line state, or says how many are Healthy and the
//!   largest RPO. Perfdata: `'VOLUME rpo'=SECONDSs;THRESHOLD;;0` for each volume with
//!   an RPO (its threshold as the warning level).
//! * Then one line per volume: `VOLUME: HEALTH, RPO x: state`.
//!
//! No I/O here: fed the rows, it returns the text and the exit status.

use crate::alert::Health;
use crate::short_duration;

/// Exit status of an UNKNOWN check.
pub const UNKNOWN: i32 = 3;

/// One volume as a check sees it.
#[derive(Clone, Debug)]
pub struct CheckRow {
    pub volume: String,
    pub health: Health,
    /// `None`: not known (no status, an unreadable replica).
    pub rpo_ms: Option<u64>,
    pub rpo_threshold_ms: u64,
    pub state: String,
}

/// The report for `rows` of check `name` (e.g. "UBLK-DR SHIPPER"): its text and exit
/// status.
pub fn report(name: &str, rows: &[CheckRow]) -> (String, i32) {
    if rows.is_empty() {
        return unknown(name, "no volumes to check");
    }
    let worst = rows
        .iter()
        .map(|r| r.health)
        .max_by_key(|h| code(*h))
        .expect("rows");
    let troubled: Vec<String> = rows
        .iter()
        .filter(|r| r.health != Health::Healthy)
        .map(|r| format!("{} {:?}: {}", r.volume, r.health, r.state))
        .collect();
    let summary = if troubled.is_empty() {
        let largest = rows.iter().filter_map(|r| r.rpo_ms).max();
        format!(
            "{} volume(s) Healthy{}",
            rows.len(),
            largest.map_or(String::new(), |ms| format!(
                ", largest RPO {}",
                short_duration(ms)
            ))
        )
    } else {
        troubled.join("; ")
    };
    let perfdata: Vec<String> = rows
        .iter()
        .filter_map(|r| {
            r.rpo_ms.map(|ms| {
                format!(
                    "'{} rpo'={:.3}s;{:.3};;0",
                    r.volume.replace('\'', "\""),
                    ms as f64 / 1e3,
                    r.rpo_threshold_ms as f64 / 1e3
                )
            })
        })
        .collect();
    let mut text = format!("{name} {} - {}", word(worst), one_line(&summary));
    if !perfdata.is_empty() {
        text.push_str(" | ");
        text.push_str(&perfdata.join(" "));
    }
    text.push('\n');
    for r in rows {
        let rpo = r.rpo_ms.map_or("unknown".to_string(), short_duration);
        text.push_str(&format!(
            "{}: {:?}, RPO {rpo}: {}\n",
            r.volume,
            r.health,
            one_line(&r.state)
        ));
    }
    (text, code(worst))
}

/// The report of a check that could not judge anything, and why.
pub fn unknown(name: &str, why: &str) -> (String, i32) {
    (format!("{name} UNKNOWN - {}\n", one_line(why)), UNKNOWN)
}

fn code(health: Health) -> i32 {
    match health {
        Health::Healthy => 0,
        Health::Warning => 1,
        Health::Critical => 2,
    }
}

fn word(health: Health) -> &'static str {
    match health {
        Health::Healthy => "OK",
        Health::Warning => "WARNING",
        Health::Critical => "CRITICAL",
    }
}

/// `text` on one line, without the `|` that starts perfdata.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ").replace('|', "/")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(volume: &str, health: Health, rpo_ms: Option<u64>, state: &str) -> CheckRow {
        CheckRow {
            volume: volume.into(),
            health,
            rpo_ms,
            rpo_threshold_ms: 30_000,
            state: state.into(),
        }
    }

    #[test]
    fn the_worst_volume_decides_and_is_named() {
        let rows = [
            row("a", Health::Healthy, Some(1_500), "current"),
            row("b", Health::Warning, Some(45_000), "behind | far"),
            row("c", Health::Healthy, None, "no figure"),
        ];
        let (text, code) = report("UBLK-DR SHIPPER", &rows);
        assert_eq!(code, 1);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "UBLK-DR SHIPPER WARNING - b Warning: behind / far \
             | 'a rpo'=1.500s;30.000;;0 'b rpo'=45.000s;30.000;;0"
        );
        assert_eq!(lines[1], "a: Healthy, RPO 1.5s: current");
        assert_eq!(lines[3], "c: Healthy, RPO unknown: no figure");
        assert_eq!(lines.len(), 4);

        let mut rows = rows.to_vec();
        rows[2].health = Health::Critical;
        let (text, code) = report("X", &rows);
        assert_eq!(code, 2);
        assert!(text.starts_with("X CRITICAL - b Warning: behind / far; c Critical: "));
    }

    #[test]
    fn all_healthy_is_ok_with_the_largest_rpo() {
        let rows = [
            row("a", Health::Healthy, Some(1_500), "current"),
            row("b", Health::Healthy, Some(2_500), "current"),
        ];
        let (text, code) = report("X", &rows);
        assert_eq!(code, 0);
        assert!(
            text.starts_with("X OK - 2 volume(s) Healthy, largest RPO 2.5s | "),
            "{text}"
        );
    }

    #[test]
    fn nothing_to_judge_is_unknown() {
        assert_eq!(report("X", &[]), unknown("X", "no volumes to check"));
        let (text, code) = unknown("X", "config: no such\nfile");
        assert_eq!(
            (text.as_str(), code),
            ("X UNKNOWN - config: no such file\n", 3)
        );
    }
}
