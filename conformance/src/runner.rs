//! Runs the scenarios against one backend and reports a table (or JSON).

use crate::backend::TestBackend;
use crate::scenario::{ScenarioCtx, ScenarioReport, Stop, Verdict};
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

/// Run every scenario whose name contains `only` (all if `None`), one after the other,
/// printing a line per scenario to stderr as it finishes.
pub async fn run<B: TestBackend>(backend: &B, only: Option<&str>) -> SuiteReport {
    let mut reports = Vec::new();
    let run_id = std::process::id();
    for (i, scenario) in crate::scenarios::all::<B>().into_iter().enumerate() {
        if only.is_some_and(|p| !scenario.name.contains(p)) {
            continue;
        }
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
        reports.push(report);
    }
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
