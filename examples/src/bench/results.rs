//! Collected figures, the JSON summary and the Markdown tables.
//!
//! A figure's key is `metric.peer` (`qmp_rt_ops_per_s.domkit`) or, for the scale bench,
//! `metric.manager.nN` (`rss_per_domain_kib.domkit.n100`); each holds one sample per
//! repetition. The JSON has every figure as median/min/max/samples under `figures` and the
//! medians alone under `summary`, one key per figure.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use super::stats::{fmt_num, Figure};

/// Peers of the QMP benches, in table order: (key, label).
pub const PEERS: [(&str, &str); 4] = [
    ("domkit", "domkit"),
    ("raw", "raw blocking client"),
    ("qemu_qmp", "python qemu.qmp"),
    ("libvirt", "libvirt (python)"),
];

/// Managers of the scale bench, in table order: (key, label).
pub const MANAGERS: [(&str, &str); 4] = [
    ("domkit", "domkit driver"),
    ("domkit_qmp", "domkit QmpClient only"),
    ("raw", "raw poll() loop"),
    ("qemu_qmp", "python qemu.qmp"),
];

/// Everything a run measured.
#[derive(Debug, Default)]
pub struct Results {
    figures: BTreeMap<String, Vec<f64>>,
    /// Why a peer or a section has no figures, and other remarks, keyed by subject.
    pub notes: BTreeMap<String, String>,
    /// Machine, versions, command.
    pub meta: Map<String, Value>,
}

impl Results {
    /// Records one repetition's sample of `key`.
    pub fn push(&mut self, key: impl Into<String>, value: f64) {
        self.figures.entry(key.into()).or_default().push(value);
    }

    /// The figure of `key`, if any repetition produced one.
    pub fn figure(&self, key: &str) -> Option<Figure> {
        self.figures.get(key).and_then(|s| Figure::of(s))
    }

    /// Every sample of `key` so far, in order.
    pub fn samples(&self, key: &str) -> Option<&[f64]> {
        self.figures.get(key).map(Vec::as_slice)
    }

    /// The median of `key`.
    pub fn median(&self, key: &str) -> Option<f64> {
        self.figure(key).map(|f| f.median)
    }

    fn cell(&self, key: &str) -> String {
        self.figure(key).map_or_else(|| "n/a".into(), |f| f.cell())
    }

    /// The machine-readable summary.
    pub fn to_json(&self) -> Value {
        let mut figures = Map::new();
        let mut summary = Map::new();
        for key in self.figures.keys() {
            if let Some(f) = self.figure(key) {
                summary.insert(key.clone(), json!(round(f.median)));
                figures.insert(key.clone(), serde_json::to_value(&f).unwrap_or(Value::Null));
            }
        }
        // The headline figure the issue names without a manager/N suffix.
        if let Some(v) = self.median("rss_per_domain_kib.domkit.n100") {
            summary.insert("rss_per_domain_kib".into(), json!(round(v)));
        }
        json!({
            "meta": self.meta,
            "summary": summary,
            "figures": figures,
            "notes": self.notes,
        })
    }

    /// The Markdown tables (one per metric) and the target verdicts.
    pub fn markdown(&self, targets: &[Verdict]) -> String {
        let mut md = String::new();
        let reps = self.meta.get("reps").and_then(Value::as_u64).unwrap_or(0);
        md.push_str(&format!(
            "Each cell: median [min-max] over {reps} repetitions; peers interleaved within each \
             repetition (rotating order). `n/a`: not measured (see notes).\n\n"
        ));

        md.push_str("#### 1. QMP round trips (`query-status`, one paused QEMU per peer)\n\n");
        md.push_str("| peer | sequential ops/s | p50 µs | p99 µs | sequential vs raw | 8 concurrent callers ops/s | 8 callers vs raw | client CPU µs/op | client context switches/op |\n");
        md.push_str("|---|---|---|---|---|---|---|---|---|\n");
        for (k, label) in PEERS {
            md.push_str(&format!(
                "| {label} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                self.cell(&format!("qmp_rt_ops_per_s.{k}")),
                self.cell(&format!("qmp_rt_p50_us.{k}")),
                self.cell(&format!("qmp_rt_p99_us.{k}")),
                self.cell(&format!("qmp_rt_vs_raw.{k}")),
                self.cell(&format!("qmp_rt8_ops_per_s.{k}")),
                self.cell(&format!("qmp_rt8_vs_raw.{k}")),
                self.cell(&format!("qmp_rt_cpu_us_per_op.{k}")),
                self.cell(&format!("qmp_rt_csw_per_op.{k}")),
            ));
        }

        md.push_str("\n#### 2. Event latency (QEMU's event timestamp to the subscriber; resume/pause cycles)\n\n");
        md.push_str("| peer | what the subscriber receives | p50 µs | p99 µs | part: QEMU to the client's reader, p50 µs | p50 vs raw (per repetition) |\n");
        md.push_str("|---|---|---|---|---|---|\n");
        let what = [
            (
                "domkit",
                "uniform `DomainEvent` (Resumed/Suspended) in a subscriber task",
                "event_qmp_reader_p50_us.domkit",
            ),
            ("raw", "the QMP event line, read by the blocked caller", ""),
            ("qemu_qmp", "QMP event dict from an `EventListener`", ""),
            (
                "libvirt",
                "lifecycle callback (RESUMED/SUSPENDED)",
                "event_monitor_p50_us.libvirt",
            ),
        ];
        for (k, w, part) in what {
            let label = PEERS.iter().find(|p| p.0 == k).map_or(k, |p| p.1);
            let part = if part.is_empty() {
                "-".into()
            } else {
                self.cell(part)
            };
            md.push_str(&format!(
                "| {label} | {w} | {} | {} | {part} | {} |\n",
                self.cell(&format!("event_p50_us.{k}")),
                self.cell(&format!("event_p99_us.{k}")),
                self.cell(&format!("event_p50_vs_raw.{k}")),
            ));
        }

        md.push_str(
            "\n#### 3. Start and destroy (same QEMU command line for every peer but libvirt)\n\n",
        );
        md.push_str("| peer | spawn to QMP ready, ms | spawn to running, ms | destroy (quit to reaped), ms |\n");
        md.push_str("|---|---|---|---|\n");
        for (k, label) in PEERS {
            md.push_str(&format!(
                "| {label} | {} | {} | {} |\n",
                self.cell(&format!("qmp_ready_ms.{k}")),
                self.cell(&format!("start_ms.{k}")),
                self.cell(&format!("destroy_ms.{k}")),
            ));
        }
        md.push_str(&format!(
            "\ndomkit start overhead over the bare spawn (per repetition, running): {} ms; \
             paused start (QMP ready): {} ms.\n",
            self.cell("start_overhead_ms.domkit"),
            self.cell("qmp_ready_overhead_ms.domkit"),
        ));

        let ns = self.scale_ns();
        if !ns.is_empty() {
            let idle = self
                .meta
                .get("idle_secs")
                .and_then(Value::as_f64)
                .map_or("?".into(), fmt_num);
            md.push_str(&format!(
                "\n#### 4. Scale: one manager process, N paused domains (`-S`, {} MiB)\n\n",
                super::qemu::SCALE_MEMORY_MIB
            ));
            md.push_str(&format!(
                "| N | manager | RSS per domain, KiB | RSS per domain after the first, KiB | idle CPU over {idle} s, ms | idle wake-ups | fan-out `query-status` to all N, ms |\n"
            ));
            md.push_str("|---|---|---|---|---|---|---|\n");
            for n in &ns {
                for (k, label) in MANAGERS {
                    let key = |m: &str| format!("{m}.{k}.n{n}");
                    if self.figure(&key("rss_per_domain_kib")).is_none()
                        && self.figure(&key("fanout_ms")).is_none()
                    {
                        continue;
                    }
                    md.push_str(&format!(
                        "| {n} | {label} | {} | {} | {} | {} | {} |\n",
                        self.cell(&key("rss_per_domain_kib")),
                        self.cell(&key("rss_marginal_per_domain_kib")),
                        self.cell(&key("idle_cpu_ms")),
                        self.cell(&key("idle_wakeups")),
                        self.cell(&key("fanout_ms")),
                    ));
                }
            }
        }

        let reattach_ns: Vec<u64> = self
            .figures
            .keys()
            .filter_map(|k| k.strip_prefix("reattach_ms.domkit.n")?.parse().ok())
            .collect();
        if !reattach_ns.is_empty() {
            md.push_str(
                "\n#### 5. Reattach: a fresh process takes over N live QEMU domains (paused)\n\n",
            );
            md.push_str("| N | domkit `QemuDriver::open` until all reattached, ms | bare client: connect + negotiate + `query-status` each, ms | domkit vs bare |\n|---|---|---|---|\n");
            for n in reattach_ns {
                md.push_str(&format!(
                    "| {n} | {} | {} | {} |\n",
                    self.cell(&format!("reattach_ms.domkit.n{n}")),
                    self.cell(&format!("reattach_ms.raw.n{n}")),
                    self.cell(&format!("reattach_vs_raw.domkit.n{n}")),
                ));
            }
        }

        let stats_ns: Vec<u64> = self
            .figures
            .keys()
            .filter_map(|k| k.strip_prefix("allstats_call_ms.domkit.n")?.parse().ok())
            .collect();
        if !stats_ns.is_empty() {
            md.push_str("\n#### 6. Bulk stats: `Driver::all_stats()` for N paused domains in one manager\n\n");
            md.push_str("| N | per call, ms (median of 20) | p99 of 20, ms | manager CPU polling 1/s, % | idle, % | wake-ups/s polling | idle |\n|---|---|---|---|---|---|---|\n");
            for n in stats_ns {
                let key = |m: &str| format!("allstats_{m}.domkit.n{n}");
                md.push_str(&format!(
                    "| {n} | {} | {} | {} | {} | {} | {} |\n",
                    self.cell(&key("call_ms")),
                    self.cell(&key("call_p99_ms")),
                    self.cell(&key("poll_cpu_pct")),
                    self.cell(&key("idle_cpu_pct")),
                    self.cell(&key("poll_wakeups_per_s")),
                    self.cell(&key("idle_wakeups_per_s")),
                ));
            }
        }

        if !targets.is_empty() {
            md.push_str(
                "\n#### Targets\n\n| target | measured (median) | verdict |\n|---|---|---|\n",
            );
            for t in targets {
                md.push_str(&format!(
                    "| {} | {} | {} |\n",
                    t.target, t.measured, t.verdict
                ));
            }
        }
        if !self.notes.is_empty() {
            md.push_str("\nNotes:\n");
            for (k, v) in &self.notes {
                md.push_str(&format!("- {k}: {v}\n"));
            }
        }
        md
    }

    /// The N values the scale bench measured, ascending.
    pub fn scale_ns(&self) -> Vec<u64> {
        let mut ns: Vec<u64> = self
            .figures
            .keys()
            .filter_map(|k| k.rsplit('.').next()?.strip_prefix('n')?.parse().ok())
            .collect();
        ns.sort_unstable();
        ns.dedup();
        ns
    }
}

/// One target of the issue and how the run fared against it.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// The target, as the issue states it.
    pub target: String,
    /// The measured figure.
    pub measured: String,
    /// `met`, `MISSED by ...`, or `not measured: why`.
    pub verdict: String,
    /// Machine-readable: Some(true) met, Some(false) missed, None not measured.
    pub met: Option<bool>,
}

impl Verdict {
    /// JSON form.
    pub fn to_json(&self) -> Value {
        json!({"target": self.target, "measured": self.measured, "verdict": self.verdict, "met": self.met})
    }
}

fn round(v: f64) -> f64 {
    if v.abs() >= 100.0 {
        v.round()
    } else {
        (v * 1000.0).round() / 1000.0
    }
}

/// Judges the targets against `r`.
pub fn verdicts(r: &Results) -> Vec<Verdict> {
    let mut out = Vec::new();
    let mut judge =
        |target: &str, measured: Option<f64>, unit: &str, ok: &dyn Fn(f64) -> (bool, String)| {
            let (measured, verdict, met) = match measured {
                Some(v) => {
                    let (met, by) = ok(v);
                    let verdict = if met {
                        "met".to_string()
                    } else {
                        format!("MISSED by {by}")
                    };
                    (format!("{}{unit}", fmt_num(v)), verdict, Some(met))
                }
                None => ("n/a".into(), "not measured".into(), None),
            };
            out.push(Verdict {
                target: target.into(),
                measured,
                verdict,
                met,
            });
        };
    judge(
        "reattach N=100 <= 2x a bare client connecting to and querying the same monitors",
        r.median("reattach_vs_raw.domkit.n100"),
        "x",
        &|v| (v <= 2.0, format!("{:.2}x", v - 2.0)),
    );
    judge(
        "domkit QMP throughput >= 0.95x the raw client (sequential)",
        r.median("qmp_rt_vs_raw.domkit"),
        "x",
        &|v| {
            (
                v >= 0.95,
                format!("{:.1} % of raw throughput", (0.95 - v) * 100.0),
            )
        },
    );
    judge(
        "8 concurrent callers on one connection >= 0.95x the raw client",
        r.median("qmp_rt8_vs_raw.domkit"),
        "x",
        &|v| {
            (
                v >= 0.95,
                format!("{:.1} % of raw throughput", (0.95 - v) * 100.0),
            )
        },
    );
    judge(
        "event p50 <= 1.3x the raw client's in the same run",
        r.median("event_p50_vs_raw.domkit"),
        "x",
        &|v| (v <= 1.3, format!("{:.2}x", v - 1.3)),
    );
    judge(
        "event p50 <= 25 µs (uniform DomainEvent)",
        r.median("event_p50_us.domkit"),
        " µs",
        &|v| {
            (
                v <= 25.0,
                format!("{} µs ({:.1}x)", fmt_num(v - 25.0), v / 25.0),
            )
        },
    );
    judge(
        "start overhead <= 5 ms over bare spawn + raw connect",
        r.median("start_overhead_ms.domkit"),
        " ms",
        &|v| (v <= 5.0, format!("{} ms", fmt_num(v - 5.0))),
    );
    judge(
        "<= 16 KiB manager RSS per domain at N=100",
        r.median("rss_per_domain_kib.domkit.n100"),
        " KiB",
        &|v| {
            (
                v <= 16.0,
                format!("{} KiB ({:.1}x)", fmt_num(v - 16.0), v / 16.0),
            )
        },
    );
    judge(
        "<= 16 KiB manager RSS per domain at N=100, each domain after the first",
        r.median("rss_marginal_per_domain_kib.domkit.n100"),
        " KiB",
        &|v| {
            (
                v <= 16.0,
                format!("{} KiB ({:.1}x)", fmt_num(v - 16.0), v / 16.0),
            )
        },
    );
    // Idle: the window's CPU time and wake-ups include the measuring thread's own wake-up
    // at the end of its sleep; the raw manager (no tasks at all, same process layout) is
    // that floor. A polling manager would show wake-ups in proportion to N and the window.
    let mut excess: Option<(f64, f64)> = None;
    for n in r.scale_ns() {
        let get = |m: &str, who: &str| r.figure(&format!("{m}.{who}.n{n}")).map(|f| f.max);
        if let (Some(dc), Some(dw), Some(rc), Some(rw)) = (
            get("idle_cpu_ms", "domkit"),
            get("idle_wakeups", "domkit"),
            get("idle_cpu_ms", "raw"),
            get("idle_wakeups", "raw"),
        ) {
            let e = excess.get_or_insert((f64::MIN, f64::MIN));
            e.0 = e.0.max(dw - rw);
            e.1 = e.1.max(dc - rc);
        }
    }
    let (measured, verdict, met) = match excess {
        Some((w, c)) => {
            let met = w <= 0.0 && c <= 0.5;
            let v = if met {
                "met (no wake-up beyond the measuring thread's own)".to_string()
            } else {
                format!(
                    "MISSED: {w:+} wake-ups, {} ms of CPU beyond the floor",
                    fmt_num(c)
                )
            };
            (
                format!(
                    "{w:+} wake-ups, {} ms CPU vs the raw floor (worst N)",
                    fmt_num(c)
                ),
                v,
                Some(met),
            )
        }
        None => ("n/a".into(), "not measured".into(), None),
    };
    out.push(Verdict {
        target: "0 idle CPU: no polling (domkit manager, every N)".into(),
        measured,
        verdict,
        met,
    });
    out.push(Verdict {
        target: "libxl ops within 5% of xl".into(),
        measured: "n/a".into(),
        verdict: r
            .notes
            .get("xen")
            .cloned()
            .unwrap_or_else(|| "not measured".into()),
        met: None,
    });
    out
}
