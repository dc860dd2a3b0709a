//! Prometheus metrics (`GET /metrics`), on `prometheus-client`, in the
//! Prometheus text format 0.0.4.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `cloudlet_vms_running` | gauge | |
//! | `cloudlet_vcpus`, `cloudlet_memory_mib` | gauge | `kind` = `used`, `capacity` |
//! | `cloudlet_synthesis_total` | counter | `outcome` = `started`, `ok`, `failed` |
//! | `cloudlet_synthesis_ms` | histogram | (request to running VM) |
//! | `cloudlet_synthesis_stage_ms` | histogram | `stage` (`fetch_apply`, `restore`, ...) |
//! | `cloudlet_vm_deaths_total` | counter | |
//! | `cloudlet_handoffs_total` | counter | `side` = `source`, `destination`; `outcome` = `ok`, `failed`, `refused` |
//! | `cloudlet_handoff_phase_ms` | histogram | `side`, `phase` (`prepare`, `disk`, `memory`, `commit`, ...) |
//! | `cloudlet_handoff_downtime_ms` | histogram | (source STOP to destination RESUME) |
//! | `cloudlet_handoff_wire_bytes_total` | counter | (session bytes sent by this source) |
//!
//! Durations are milliseconds, as the API's `StageTiming`s. The domain
//! calls the plain methods of [`Metrics`]; a whole synthesis or handoff
//! result is recorded at once with [`Metrics::record_synthesis`] and
//! [`Metrics::record_handoff`].

use std::time::Duration;

use cloudlet_api::{HandoffReport, Resources, StageTiming};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The `Content-Type` of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Buckets of a whole synthesis, ms.
const SYNTHESIS_BUCKETS: [f64; 9] = [
    250.0, 500.0, 1000.0, 2000.0, 5000.0, 10_000.0, 20_000.0, 60_000.0, 120_000.0,
];
/// Buckets of one stage or phase, ms.
const STAGE_BUCKETS: [f64; 13] = [
    5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10_000.0, 30_000.0,
    60_000.0,
];
/// Buckets of a handoff's downtime, ms.
const DOWNTIME_BUCKETS: [f64; 10] = [
    5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
];

/// Which end of a handoff recorded a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandoffSide {
    Source,
    Destination,
}

impl HandoffSide {
    fn as_str(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Destination => "destination",
        }
    }
}

/// How a handoff that did not complete ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandoffFailure {
    /// Something broke on the way (QEMU, the link, a timeout, a store).
    Failed,
    /// A definite no before the VM moved: this cloudlet's (no such VM, not
    /// running) or the peer's (an API refusal).
    Refused,
}

impl HandoffFailure {
    /// A refusal (a definite no), else a failure.
    pub fn of(refused: bool) -> Self {
        if refused {
            HandoffFailure::Refused
        } else {
            HandoffFailure::Failed
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabel {
    stage: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandoffOutcomeLabels {
    side: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    side: &'static str,
    phase: String,
}

fn stage_histogram() -> Histogram {
    Histogram::new(STAGE_BUCKETS)
}

/// The daemon's metrics and the registry that renders them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    vms_running: Gauge,
    vcpus: Family<KindLabel, Gauge>,
    memory_mib: Family<KindLabel, Gauge>,
    synthesis: Family<OutcomeLabel, Counter>,
    synthesis_ms: Histogram,
    synthesis_stage_ms: Family<StageLabel, Histogram>,
    vm_deaths: Counter,
    handoffs: Family<HandoffOutcomeLabels, Counter>,
    handoff_phase_ms: Family<PhaseLabels, Histogram>,
    handoff_downtime_ms: Histogram,
    handoff_wire_bytes: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let m = Metrics {
            registry: Registry::default(),
            vms_running: Gauge::default(),
            vcpus: Family::default(),
            memory_mib: Family::default(),
            synthesis: Family::default(),
            synthesis_ms: Histogram::new(SYNTHESIS_BUCKETS),
            synthesis_stage_ms: Family::new_with_constructor(stage_histogram),
            vm_deaths: Counter::default(),
            handoffs: Family::default(),
            handoff_phase_ms: Family::new_with_constructor(stage_histogram),
            handoff_downtime_ms: Histogram::new(DOWNTIME_BUCKETS),
            handoff_wire_bytes: Counter::default(),
        };
        let mut r = Registry::default();
        // Help texts without a final period: the registry adds one.
        r.register(
            "cloudlet_vms_running",
            "VMs running on this cloudlet",
            m.vms_running.clone(),
        );
        r.register(
            "cloudlet_vcpus",
            "vCPUs reserved and available",
            m.vcpus.clone(),
        );
        r.register(
            "cloudlet_memory_mib",
            "Memory reserved and available, MiB",
            m.memory_mib.clone(),
        );
        // Counters get their `_total` from the registry.
        r.register(
            "cloudlet_synthesis",
            "VM syntheses by outcome",
            m.synthesis.clone(),
        );
        r.register(
            "cloudlet_synthesis_ms",
            "Time from request to running VM, ms",
            m.synthesis_ms.clone(),
        );
        r.register(
            "cloudlet_synthesis_stage_ms",
            "Time of one stage of a synthesis, ms",
            m.synthesis_stage_ms.clone(),
        );
        r.register(
            "cloudlet_vm_deaths",
            "VMs whose QEMU died unexpectedly",
            m.vm_deaths.clone(),
        );
        r.register(
            "cloudlet_handoffs",
            "Handoffs by side and outcome",
            m.handoffs.clone(),
        );
        r.register(
            "cloudlet_handoff_phase_ms",
            "Time of one phase of a handoff, ms",
            m.handoff_phase_ms.clone(),
        );
        r.register(
            "cloudlet_handoff_downtime_ms",
            "Handoff downtime, source STOP to destination RESUME, ms",
            m.handoff_downtime_ms.clone(),
        );
        r.register(
            "cloudlet_handoff_wire_bytes",
            "Session bytes this cloudlet sent as a handoff source",
            m.handoff_wire_bytes.clone(),
        );
        // Every outcome shows, at 0, before it first happens.
        for outcome in ["started", "ok", "failed"] {
            drop(m.synthesis.get_or_create(&OutcomeLabel { outcome }));
        }
        Metrics { registry: r, ..m }
    }

    pub fn synthesis_started(&self) {
        self.synth_outcome("started");
    }

    pub fn synthesis_failed(&self) {
        self.synth_outcome("failed");
    }

    /// One stage of a synthesis took `d`.
    pub fn synth_stage(&self, stage: &str, d: Duration) {
        self.synthesis_stage_ms
            .get_or_create(&StageLabel {
                stage: stage.into(),
            })
            .observe(ms(d));
    }

    /// A synthesis succeeded with these `timings` (those of
    /// `Synthesized`): each stage, and `total` as the whole.
    pub fn record_synthesis(&self, timings: &[StageTiming]) {
        self.synth_outcome("ok");
        for t in timings {
            let d = Duration::from_millis(t.ms);
            if t.stage == "total" {
                self.synthesis_ms.observe(ms(d));
            } else {
                self.synth_stage(&t.stage, d);
            }
        }
    }

    fn synth_outcome(&self, outcome: &'static str) {
        self.synthesis
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    /// A VM's QEMU died unexpectedly.
    pub fn vm_died(&self) {
        self.vm_deaths.inc();
    }

    /// One phase of a handoff took `d` on `side`.
    pub fn handoff_phase(&self, side: HandoffSide, phase: &str, d: Duration) {
        self.handoff_phase_ms
            .get_or_create(&PhaseLabels {
                side: side.as_str(),
                phase: phase.into(),
            })
            .observe(ms(d));
    }

    /// A handoff this cloudlet was the source of completed: its downtime
    /// (when both ends' timestamps are known) and its bytes on the wire.
    pub fn handoff_done(&self, downtime: Option<Duration>, wire_bytes: u64) {
        self.handoff_outcome(HandoffSide::Source, "ok");
        if let Some(d) = downtime {
            self.handoff_downtime_ms.observe(ms(d));
        }
        self.handoff_wire_bytes.inc_by(wire_bytes);
    }

    /// A VM arrived here and runs (the destination's commit answered).
    pub fn handoff_arrived(&self) {
        self.handoff_outcome(HandoffSide::Destination, "ok");
    }

    /// A handoff did not complete on `side`.
    pub fn handoff_failed(&self, side: HandoffSide, how: HandoffFailure) {
        let outcome = match how {
            HandoffFailure::Failed => "failed",
            HandoffFailure::Refused => "refused",
        };
        self.handoff_outcome(side, outcome);
    }

    fn handoff_outcome(&self, side: HandoffSide, outcome: &'static str) {
        self.handoffs
            .get_or_create(&HandoffOutcomeLabels {
                side: side.as_str(),
                outcome,
            })
            .inc();
    }

    /// A handoff this cloudlet was the source of completed with `report`:
    /// its phases, downtime and bytes on the wire.
    pub fn record_handoff(&self, report: &HandoffReport) {
        for p in &report.phases {
            self.handoff_phase(HandoffSide::Source, &p.stage, Duration::from_millis(p.ms));
        }
        self.handoff_done(report_downtime(report), report.wire_bytes);
    }

    /// The text of `GET /metrics` ([`CONTENT_TYPE`]), with the gauges set
    /// from the daemon's state now.
    pub fn render(&self, running: usize, used: Resources, cap: Resources) -> String {
        self.vms_running.set(running as i64);
        for (family, used, cap) in [
            (&self.vcpus, used.vcpus.into(), cap.vcpus.into()),
            (&self.memory_mib, used.memory_mib, cap.memory_mib),
        ] {
            let set = |kind, v: u64| {
                family
                    .get_or_create(&KindLabel { kind })
                    .set(i64::try_from(v).unwrap_or(i64::MAX));
            };
            set("used", used);
            set("capacity", cap);
        }
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut s, &self.registry);
        s
    }
}

/// Source STOP to destination RESUME, None when either is unknown (0) or
/// the clocks disagree.
fn report_downtime(r: &HandoffReport) -> Option<Duration> {
    if r.source_stop_us <= 0 || r.destination_resume_us <= 0 {
        return None;
    }
    let us = r.destination_resume_us.checked_sub(r.source_stop_us)?;
    u64::try_from(us).ok().map(Duration::from_micros)
}

/// `d` in ms (from µs: exact for whole ms).
fn ms(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudlet_api::{VmInfo, VmState};

    fn render(m: &Metrics) -> String {
        let cap = Resources {
            vcpus: 8,
            memory_mib: 16_384,
            vms: 10,
        };
        let used = Resources {
            vcpus: 2,
            memory_mib: 1024,
            vms: 1,
        };
        m.render(1, used, cap)
    }

    fn has(text: &str, line: &str) {
        assert!(
            text.lines().any(|l| l == line),
            "no line {line:?} in:\n{text}"
        );
    }

    fn timing(stage: &str, ms: u64) -> StageTiming {
        StageTiming {
            stage: stage.into(),
            ms,
        }
    }

    #[test]
    fn the_gauges_and_counters_keep_their_names() {
        let m = Metrics::default();
        m.synthesis_started();
        m.synthesis_failed();
        m.vm_died();
        let text = render(&m);
        has(&text, "cloudlet_vms_running 1");
        has(&text, "# TYPE cloudlet_vms_running gauge");
        has(&text, "cloudlet_vcpus{kind=\"used\"} 2");
        has(&text, "cloudlet_vcpus{kind=\"capacity\"} 8");
        has(&text, "cloudlet_memory_mib{kind=\"used\"} 1024");
        has(&text, "cloudlet_memory_mib{kind=\"capacity\"} 16384");
        has(&text, "# TYPE cloudlet_synthesis_total counter");
        has(&text, "cloudlet_synthesis_total{outcome=\"started\"} 1");
        has(&text, "cloudlet_synthesis_total{outcome=\"ok\"} 0");
        has(&text, "cloudlet_synthesis_total{outcome=\"failed\"} 1");
        has(&text, "cloudlet_vm_deaths_total 1");
        has(
            &text,
            "# HELP cloudlet_vm_deaths_total VMs whose QEMU died unexpectedly.",
        );
    }

    #[test]
    fn a_synthesis_fills_the_total_and_the_stage_histograms() {
        let m = Metrics::default();
        m.record_synthesis(&[
            timing("fetch_apply", 30),
            timing("restore", 400),
            timing("total", 300),
        ]);
        m.record_synthesis(&[timing("restore", 20), timing("total", 3000)]);
        let text = render(&m);
        has(&text, "cloudlet_synthesis_total{outcome=\"ok\"} 2");
        has(&text, "# TYPE cloudlet_synthesis_ms histogram");
        has(&text, "cloudlet_synthesis_ms_bucket{le=\"250\"} 0");
        has(&text, "cloudlet_synthesis_ms_bucket{le=\"500\"} 1");
        has(&text, "cloudlet_synthesis_ms_bucket{le=\"5000\"} 2");
        has(&text, "cloudlet_synthesis_ms_bucket{le=\"+Inf\"} 2");
        has(&text, "cloudlet_synthesis_ms_sum 3300.0");
        has(&text, "cloudlet_synthesis_ms_count 2");
        has(
            &text,
            "cloudlet_synthesis_stage_ms_bucket{stage=\"restore\",le=\"25\"} 1",
        );
        has(
            &text,
            "cloudlet_synthesis_stage_ms_bucket{stage=\"restore\",le=\"250\"} 1",
        );
        has(
            &text,
            "cloudlet_synthesis_stage_ms_bucket{stage=\"restore\",le=\"500\"} 2",
        );
        has(
            &text,
            "cloudlet_synthesis_stage_ms_count{stage=\"restore\"} 2",
        );
        has(
            &text,
            "cloudlet_synthesis_stage_ms_count{stage=\"fetch_apply\"} 1",
        );
        // The total is the whole, not a stage.
        assert!(!text.contains("stage=\"total\""), "{text}");
    }

    fn report() -> HandoffReport {
        HandoffReport {
            vm: VmInfo {
                id: "v1".into(),
                name: "vm".into(),
                state: VmState::Running,
                generation: 2,
                base_id: "b".into(),
                overlay: "o".into(),
                flavor: "small".into(),
                ports: Vec::new(),
                created_unix: 0,
                progress: Default::default(),
                timings: Vec::new(),
                error: None,
                moved_to: None,
                session_token: None,
                tenant: None,
            },
            total_ms: 2000,
            source_stop_us: 1_000_000,
            destination_resume_us: 1_042_000,
            wire_bytes: 5 << 20,
            raw_bytes: 9 << 20,
            disk_bytes: 1 << 20,
            phases: vec![
                timing("prepare", 120),
                timing("disk", 40),
                timing("memory", 1500),
                timing("commit", 30),
            ],
            destination_url: String::new(),
            handoff_id: String::new(),
        }
    }

    #[test]
    fn a_handoff_fills_phases_downtime_bytes_and_outcome() {
        let m = Metrics::default();
        m.record_handoff(&report());
        let mut unknown = report();
        unknown.destination_resume_us = 0;
        m.record_handoff(&unknown);
        m.handoff_failed(HandoffSide::Source, HandoffFailure::Refused);
        m.handoff_failed(HandoffSide::Destination, HandoffFailure::Failed);
        m.handoff_phase(
            HandoffSide::Destination,
            "receive",
            Duration::from_millis(7),
        );
        m.handoff_arrived();
        let text = render(&m);
        has(&text, "# TYPE cloudlet_handoffs_total counter");
        has(
            &text,
            "cloudlet_handoffs_total{side=\"source\",outcome=\"ok\"} 2",
        );
        has(
            &text,
            "cloudlet_handoffs_total{side=\"source\",outcome=\"refused\"} 1",
        );
        has(
            &text,
            "cloudlet_handoffs_total{side=\"destination\",outcome=\"failed\"} 1",
        );
        has(
            &text,
            "cloudlet_handoffs_total{side=\"destination\",outcome=\"ok\"} 1",
        );
        has(
            &text,
            "cloudlet_handoff_phase_ms_bucket{side=\"source\",phase=\"memory\",le=\"1000\"} 0",
        );
        has(
            &text,
            "cloudlet_handoff_phase_ms_bucket{side=\"source\",phase=\"memory\",le=\"2500\"} 2",
        );
        has(
            &text,
            "cloudlet_handoff_phase_ms_count{side=\"source\",phase=\"prepare\"} 2",
        );
        has(
            &text,
            "cloudlet_handoff_phase_ms_bucket{side=\"destination\",phase=\"receive\",le=\"10\"} 1",
        );
        // 42 ms, once: the second report's resume time is unknown.
        has(&text, "cloudlet_handoff_downtime_ms_bucket{le=\"20\"} 0");
        has(&text, "cloudlet_handoff_downtime_ms_bucket{le=\"50\"} 1");
        has(&text, "cloudlet_handoff_downtime_ms_count 1");
        has(&text, "cloudlet_handoff_downtime_ms_sum 42.0");
        has(
            &text,
            &format!("cloudlet_handoff_wire_bytes_total {}", 10u64 << 20),
        );
    }

    #[test]
    fn a_downtime_needs_both_ends() {
        let mut r = report();
        assert_eq!(report_downtime(&r), Some(Duration::from_millis(42)));
        r.source_stop_us = r.destination_resume_us + 1;
        assert_eq!(report_downtime(&r), None);
        r.source_stop_us = 0;
        assert_eq!(report_downtime(&r), None);
    }
}
