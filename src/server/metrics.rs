//! `/metrics` in Prometheus' text exposition format (version 0.0.4).
//!
//! HTTP responses are counted by status code here; token counts, queue depth, active slots
//! and decode speed come from [`EngineStats`].

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use super::engine::EngineStats;

/// Responses sent, by status code.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    by_code: Mutex<BTreeMap<u16, u64>>,
}

impl Metrics {
    /// Counts one response.
    pub fn record(&self, status: u16) {
        let mut map = match self.by_code.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        *map.entry(status).or_insert(0) += 1;
    }

    fn by_code(&self) -> BTreeMap<u16, u64> {
        match self.by_code.lock() {
            Ok(m) => m.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The exposition text.
    pub fn render(&self, stats: &EngineStats) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP tinygpt_http_requests_total HTTP responses sent, by status code.\n\
             # TYPE tinygpt_http_requests_total counter"
        );
        for (code, n) in self.by_code() {
            let _ = writeln!(out, "tinygpt_http_requests_total{{code=\"{code}\"}} {n}");
        }
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        metric(
            "tinygpt_prompt_tokens_total",
            "counter",
            "Prompt tokens processed (prefill) since start.",
            stats.prompt_tokens.to_string(),
        );
        metric(
            "tinygpt_generation_tokens_total",
            "counter",
            "Tokens generated since start.",
            stats.generated_tokens.to_string(),
        );
        metric(
            "tinygpt_queue_depth",
            "gauge",
            "Requests waiting for a decode slot.",
            stats.queue_depth.to_string(),
        );
        metric(
            "tinygpt_active_slots",
            "gauge",
            "Requests being decoded.",
            stats.active_slots.to_string(),
        );
        metric(
            "tinygpt_max_batch",
            "gauge",
            "Decode slots in all.",
            stats.max_batch.to_string(),
        );
        metric(
            "tinygpt_decode_tokens_per_second",
            "gauge",
            "Tokens per second of decode-step time, since start (all rows of a step together).",
            float(stats.decode_tokens_per_s),
        );
        metric(
            "tinygpt_last_step_tokens_per_second",
            "gauge",
            "Tokens per second of the most recent decode step.",
            float(stats.last_step_tokens_per_s),
        );
        out
    }
}

/// A sample value: Prometheus spells the non-finite ones `NaN`, `+Inf`, `-Inf`.
fn float(x: f64) -> String {
    if x.is_nan() {
        "NaN".into()
    } else if x.is_infinite() {
        if x > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_gauges() {
        let m = Metrics::default();
        m.record(200);
        m.record(200);
        m.record(429);
        let stats = EngineStats {
            queue_depth: 2,
            active_slots: 1,
            max_batch: 4,
            prompt_tokens: 10,
            generated_tokens: 7,
            decode_tokens_per_s: 12.5,
            last_step_tokens_per_s: f64::INFINITY,
        };
        let text = m.render(&stats);
        assert!(
            text.contains("tinygpt_http_requests_total{code=\"200\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("tinygpt_http_requests_total{code=\"429\"} 1\n"));
        assert!(text.contains("tinygpt_prompt_tokens_total 10\n"));
        assert!(text.contains("tinygpt_generation_tokens_total 7\n"));
        assert!(text.contains("tinygpt_queue_depth 2\n"));
        assert!(text.contains("tinygpt_active_slots 1\n"));
        assert!(text.contains("tinygpt_decode_tokens_per_second 12.5\n"));
        assert!(text.contains("tinygpt_last_step_tokens_per_second +Inf\n"));
        assert!(text.contains("# TYPE tinygpt_queue_depth gauge\n"));
    }
}
