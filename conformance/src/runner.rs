//! Runs the scenarios against one backend and reports a table (or JSON).

use crate::backend::TestBackend;
use crate::scenario::{ScenarioCtx, ScenarioReport, Stop, Verdict};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// The longest one scenario may take before it is reported as a failure.
pub const SCENARIO_TIMEOUT: Duration = Duration::from_secs(300);

/// A whole run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SuiteReport {
    /// The backend's name.
    pub backend: String,
    /// One line per scenario.
    pub scenarios: Vec<ScenarioReport>,
}

impl SuiteReport {
    /// Count of a verdict.
    pub fn count(&self, v: Verdict) -> usize {
        self.scenarios.iter().filter(|s| s.verdict == v).count()
    }

    /// True when nothing failed (unsupported scenarios are gaps, not failures, but never
    /// passes either).
    pub fn ok(&self) -> bool {
        self.count(Verdict::Fail) == 0
    }

    /// Write this report as a results record (what `scripts/status-table.py` reads from
    /// `docs/conformance/<backend>.json`): the report with the command that produced it, the
    /// UTC date and the host. The file is written whole (temporary file, then rename).
    pub fn write_record(&self, path: &std::path::Path, command: &str) -> std::io::Result<()> {
        let doc = serde_json::json!({
            "backend": self.backend,
            "command": command,
            "date": utc_date_now(),
            "host": host_facts(),
            "report": self,
        });
        let text = serde_json::to_string_pretty(&doc).map_err(std::io::Error::other)? + "\n";
        let temp = path.with_extension("json.tmp");
        std::fs::write(&temp, text)?;
        std::fs::rename(&temp, path)
    }

    /// The closing line: `conformance: N passed, M failed, K skipped` (skipped = unsupported).
    pub fn summary_line(&self) -> String {
        format!(
            "conformance: {} passed, {} failed, {} skipped",
            self.count(Verdict::Pass),
            self.count(Verdict::Fail),
            self.count(Verdict::Unsupported)
        )
    }

    /// A Markdown table.
    pub fn table(&self) -> String {
        let mut out = format!(
            "| scenario | {} | seconds | detail |\n|---|---|---|---|\n",
            self.backend
        );
        for s in &self.scenarios {
            let verdict = match s.verdict {
                Verdict::Pass => "pass",
                Verdict::Fail => "FAIL",
                Verdict::Unsupported => "unsupported",
            };
            out.push_str(&format!(
                "| {} | {} | {:.1} | {} |\n",
                s.name,
                verdict,
                s.seconds,
                s.detail.replace('|', "\\|").replace('\n', " ")
            ));
        }
        out
    }
}

/// How many scenarios run at once: `$DOMKIT_CONFORMANCE_JOBS`, default 1. Scenarios are
/// independent (their own domains, names and roots), and most of a scenario's time is spent
/// waiting on a TCG guest, so two at a time nearly halve the suite's wall time.
pub fn jobs() -> usize {
    std::env::var("DOMKIT_CONFORMANCE_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n >= 1)
        .unwrap_or(1)
}

/// Run every scenario whose name contains `only` (or one of its comma-separated parts; all
/// if `None`), [`jobs`] at a time,
/// printing a line per scenario to stderr as it finishes; the report keeps their order.
pub async fn run<B: TestBackend>(backend: &B, only: Option<&str>) -> SuiteReport {
    let run_id = std::process::id();
    let selected: Vec<(usize, crate::scenario::Scenario<B>)> = crate::scenarios::all::<B>()
        .into_iter()
        .enumerate()
        .filter(|(_, s)| only.map_or(true, |p| p.split(',').any(|p| s.name.contains(p))))
        .collect();
    let reports = futures::stream::iter(selected)
        .map(|(i, scenario)| async move {
            let started = Instant::now();
            let ctx = ScenarioCtx::new(backend, format!("ck{run_id}-{i}"));
            let result = tokio::time::timeout(SCENARIO_TIMEOUT, (scenario.run)(&ctx)).await;
            let cleanup_problems = ctx.cleanup().await;
            let (mut verdict, mut detail) = match result {
                Ok(Ok(())) => (Verdict::Pass, String::new()),
                Ok(Err(Stop::Fail(msg))) => (Verdict::Fail, msg),
                Ok(Err(Stop::Unsupported(msg))) => (Verdict::Unsupported, msg),
                Err(_) => (
                    Verdict::Fail,
                    format!("scenario did not finish within {SCENARIO_TIMEOUT:?}"),
                ),
            };
            if !cleanup_problems.is_empty() && verdict != Verdict::Fail {
                verdict = Verdict::Fail;
                detail = format!("cleanup failed: {}", cleanup_problems.join("; "));
            }
            let report = ScenarioReport {
                name: scenario.name.to_string(),
                verdict,
                detail,
                seconds: started.elapsed().as_secs_f64(),
            };
            eprintln!(
                "conformance[{}] {:<28} {:?} {:.1}s {}",
                backend.name(),
                report.name,
                report.verdict,
                report.seconds,
                report.detail
            );
            report
        })
        .buffered(jobs())
        .collect::<Vec<_>>()
        .await;
    SuiteReport {
        backend: backend.name().to_string(),
        scenarios: reports,
    }
}

/// The names and descriptions of every scenario.
pub fn list<B: TestBackend>() -> Vec<(&'static str, &'static str)> {
    crate::scenarios::all::<B>()
        .into_iter()
        .map(|s| (s.name, s.about))
        .collect()
}

/// Today's UTC date, `YYYY-MM-DD`.
fn utc_date_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86400) as i64;
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The kernel and the core count of the machine the suite ran on.
fn host_facts() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("Linux {}, {cores} cores", release.trim())
}
