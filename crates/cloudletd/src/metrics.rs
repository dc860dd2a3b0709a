//! Prometheus metrics, rendered in the text exposition format.

use std::sync::atomic::{AtomicU64, Ordering};

use cloudlet_api::Resources;

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A histogram of milliseconds with fixed buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    sum: AtomicU64,
    count: AtomicU64,
}

const BUCKETS: [u64; 9] = [250, 500, 1000, 2000, 5000, 10_000, 20_000, 60_000, 120_000];

impl Histogram {
    pub fn observe(&self, ms: u64) {
        for (i, le) in BUCKETS.iter().enumerate() {
            if ms <= *le {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum.fetch_add(ms, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub synth_started: Counter,
    pub synth_ok: Counter,
    pub synth_failed: Counter,
    pub vm_deaths: Counter,
    pub synth_ms: Histogram,
}

impl Metrics {
    pub fn render(&self, running: usize, used: Resources, cap: Resources) -> String {
        let mut s = String::new();
        let mut line = |name: &str, kind: &str, help: &str, value: String| {
            s.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{value}"
            ));
        };
        line(
            "cloudlet_vms_running",
            "gauge",
            "VMs running on this cloudlet.",
            format!("cloudlet_vms_running {running}\n"),
        );
        line(
            "cloudlet_vcpus",
            "gauge",
            "vCPUs reserved and available.",
            format!(
                "cloudlet_vcpus{{kind=\"used\"}} {}\ncloudlet_vcpus{{kind=\"capacity\"}} {}\n",
                used.vcpus, cap.vcpus
            ),
        );
        line(
            "cloudlet_memory_mib",
            "gauge",
            "Memory reserved and available, MiB.",
            format!(
                "cloudlet_memory_mib{{kind=\"used\"}} {}\ncloudlet_memory_mib{{kind=\"capacity\"}} {}\n",
                used.memory_mib, cap.memory_mib
            ),
        );
        line(
            "cloudlet_synthesis_total",
            "counter",
            "VM syntheses by outcome.",
            format!(
                "cloudlet_synthesis_total{{outcome=\"started\"}} {}\ncloudlet_synthesis_total{{outcome=\"ok\"}} {}\ncloudlet_synthesis_total{{outcome=\"failed\"}} {}\n",
                self.synth_started.get(),
                self.synth_ok.get(),
                self.synth_failed.get()
            ),
        );
        line(
            "cloudlet_vm_deaths_total",
            "counter",
            "VMs whose QEMU died unexpectedly.",
            format!("cloudlet_vm_deaths_total {}\n", self.vm_deaths.get()),
        );
        let mut h = String::new();
        for (i, le) in BUCKETS.iter().enumerate() {
            h.push_str(&format!(
                "cloudlet_synthesis_ms_bucket{{le=\"{le}\"}} {}\n",
                self.synth_ms.buckets[i].load(Ordering::Relaxed)
            ));
        }
        let count = self.synth_ms.count.load(Ordering::Relaxed);
        h.push_str(&format!(
            "cloudlet_synthesis_ms_bucket{{le=\"+Inf\"}} {count}\n"
        ));
        h.push_str(&format!(
            "cloudlet_synthesis_ms_sum {}\n",
            self.synth_ms.sum.load(Ordering::Relaxed)
        ));
        h.push_str(&format!("cloudlet_synthesis_ms_count {count}\n"));
        line(
            "cloudlet_synthesis_ms",
            "histogram",
            "Time from request to running VM.",
            h,
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let m = Metrics::default();
        m.synth_ms.observe(300);
        m.synth_ms.observe(3000);
        let text = m.render(1, Resources::default(), Resources::default());
        assert!(text.contains("cloudlet_synthesis_ms_bucket{le=\"500\"} 1"));
        assert!(text.contains("cloudlet_synthesis_ms_bucket{le=\"5000\"} 2"));
        assert!(text.contains("cloudlet_synthesis_ms_count 2"));
    }
}
