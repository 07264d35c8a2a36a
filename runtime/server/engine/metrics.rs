//! What one model's engine reports to `/metrics`, labelled by model: queue depth, sequences in
//! flight, batch size per step, time to first token, inter-token latency, prompt and generated
//! tokens. Histograms have fixed buckets and lock-free counters (the engine thread observes,
//! scrapes read); no label ever carries a client value, only the served model's name.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A Prometheus histogram with fixed upper bounds.
pub struct Histogram {
    bounds: &'static [f64],
    /// One count per bound, then +Inf (not cumulative; summed when rendered).
    counts: Vec<AtomicU64>,
    /// The sum of observations, in millionths of the unit.
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: f64) {
        let i = self
            .bounds
            .iter()
            .position(|&b| value <= b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_micros
            .fetch_add((value.max(0.0) * 1e6) as u64, Relaxed);
    }

    /// The `_bucket`, `_sum` and `_count` lines of one model's series.
    fn render(&self, name: &str, model: &str, out: &mut String) {
        self.render_series(name, &format!("model=\"{model}\""), out);
    }

    /// The `_bucket`, `_sum` and `_count` lines of one series; `labels` is its label list as
    /// written between braces (`a="x",b="y"`), values already safe.
    pub fn render_series(&self, name: &str, labels: &str, out: &mut String) {
        let mut cumulative = 0;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Relaxed);
            let le = self
                .bounds
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |b| b.to_string());
            out.push_str(&format!(
                "securerun_{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}\n"
            ));
        }
        let sum = self.sum_micros.load(Relaxed) as f64 / 1e6;
        out.push_str(&format!(
            "securerun_{name}_sum{{{labels}}} {sum}\nsecurerun_{name}_count{{{labels}}} {cumulative}\n"
        ));
    }
}

pub(crate) const SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const SEQUENCES: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// One engine's numbers.
pub struct EngineMetrics {
    pub sequences_active: AtomicU64,
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens taken from the prefix cache instead of computed.
    pub cached_prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Sequences advanced by one step.
    pub batch_size: Histogram,
    /// From the job's creation (after the prompt was tokenized) to its first text piece.
    pub time_to_first_token: Histogram,
    /// Between consecutive text pieces of one generation.
    pub inter_token_latency: Histogram,
}

impl Default for EngineMetrics {
    fn default() -> Self {
        EngineMetrics {
            sequences_active: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            cached_prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            batch_size: Histogram::new(SEQUENCES),
            time_to_first_token: Histogram::new(SECONDS),
            inter_token_latency: Histogram::new(SECONDS),
        }
    }
}

/// Which histogram of an engine's metrics a family shows.
type Pick = fn(&EngineMetrics) -> &Histogram;

/// Renders every model's engine metrics, one family at a time (HELP and TYPE once per family,
/// then a series per model). `models` holds (name, queue depth, metrics).
pub fn render(models: &[(String, usize, &EngineMetrics)], out: &mut String) {
    let family = |out: &mut String, name: &str, kind: &str, help: &str| {
        out.push_str(&format!(
            "# HELP securerun_{name} {help}\n# TYPE securerun_{name} {kind}\n"
        ));
    };
    // (name, type, help, value from the queue depth and the engine's numbers)
    type Value = fn(usize, &EngineMetrics) -> u64;
    let scalars: [(&str, &str, &str, Value); 5] = [
        (
            "queue_depth",
            "gauge",
            "jobs waiting for the model's engine",
            |depth, _| depth as u64,
        ),
        (
            "sequences_active",
            "gauge",
            "generations in flight in the model's batch",
            |_, m| m.sequences_active.load(Relaxed),
        ),
        (
            "model_prompt_tokens_total",
            "counter",
            "prompt tokens fed to the model",
            |_, m| m.prompt_tokens.load(Relaxed),
        ),
        (
            "model_prompt_cached_tokens_total",
            "counter",
            "prompt tokens served from the prefix cache instead of computed",
            |_, m| m.cached_prompt_tokens.load(Relaxed),
        ),
        (
            "model_generated_tokens_total",
            "counter",
            "tokens the model generated",
            |_, m| m.generated_tokens.load(Relaxed),
        ),
    ];
    for (name, kind, help, value) in scalars {
        family(out, name, kind, help);
        for (model, depth, m) in models {
            let v = value(*depth, m);
            out.push_str(&format!("securerun_{name}{{model=\"{model}\"}} {v}\n"));
        }
    }
    let histograms: [(&str, &str, Pick); 3] = [
        (
            "batch_size",
            "sequences advanced by one forward step",
            |m| &m.batch_size,
        ),
        (
            "time_to_first_token_seconds",
            "from a generation's submission to its first text",
            |m| &m.time_to_first_token,
        ),
        (
            "inter_token_latency_seconds",
            "between consecutive text pieces of a generation",
            |m| &m.inter_token_latency,
        ),
    ];
    for (name, help, pick) in histograms {
        family(out, name, "histogram", help);
        for (model, _, m) in models {
            pick(m).render(name, model, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_the_sum_is_kept() {
        let h = Histogram::new(&[1.0, 2.0]);
        for v in [0.5, 1.5, 1.5, 9.0] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render("x", "m", &mut out);
        assert_eq!(
            out,
            "securerun_x_bucket{model=\"m\",le=\"1\"} 1\n\
             securerun_x_bucket{model=\"m\",le=\"2\"} 3\n\
             securerun_x_bucket{model=\"m\",le=\"+Inf\"} 4\n\
             securerun_x_sum{model=\"m\"} 12.5\n\
             securerun_x_count{model=\"m\"} 4\n"
        );
    }
}
