//! What `GET /metrics` reports, in the OpenMetrics text format that Prometheus scrapes.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A request's endpoint and answer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    /// The path when it is one of the server's, else "other" (the label's values stay few).
    pub endpoint: String,
    /// The HTTP status code.
    pub status: u16,
}

/// The server's counters, gauges and histograms.
pub(crate) struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub prompt_tokens: Counter,
    pub cached_prompt_tokens: Counter,
    pub generated_tokens: Counter,
    pub cancelled: Counter,
    pub time_to_first_token: Histogram,
    pub time_per_output_token: Histogram,
    pub queue_wait: Histogram,
    pub queue_depth: Gauge,
    pub busy_slots: Gauge,
}

impl Metrics {
    pub fn new(slots: usize) -> Self {
        let mut registry = Registry::with_prefix("etllm");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "HTTP requests answered, by endpoint and status",
            requests.clone(),
        );
        let prompt_tokens = Counter::default();
        registry.register(
            "prompt_tokens",
            "Prompt tokens of finished generations, cached ones included",
            prompt_tokens.clone(),
        );
        let cached_prompt_tokens = Counter::default();
        registry.register(
            "cached_prompt_tokens",
            "Prompt tokens a slot already held (prefix reuse), not fed again",
            cached_prompt_tokens.clone(),
        );
        let generated_tokens = Counter::default();
        registry.register(
            "generated_tokens",
            "Tokens generated",
            generated_tokens.clone(),
        );
        let cancelled = Counter::default();
        registry.register(
            "cancelled_requests",
            "Generations cancelled: the client went away or the server shut down",
            cancelled.clone(),
        );
        // 1 ms to about 33 s.
        let time_to_first_token = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "time_to_first_token_seconds",
            "From the request's arrival (queue included) to its first generated token",
            time_to_first_token.clone(),
        );
        // 0.25 ms to about 4 s.
        let time_per_output_token = Histogram::new(exponential_buckets(0.00025, 2.0, 15));
        registry.register(
            "time_per_output_token_seconds",
            "Mean time per generated token after the first, one sample a request",
            time_per_output_token.clone(),
        );
        let queue_wait = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "queue_wait_seconds",
            "Time requests waited in the queue for the model",
            queue_wait.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Requests waiting for the model",
            queue_depth.clone(),
        );
        let busy_slots = Gauge::default();
        registry.register("busy_slots", "Slots generating now", busy_slots.clone());
        let slots_gauge: Gauge = Gauge::default();
        slots_gauge.set(slots as i64);
        registry.register("slots", "Slots (--parallel)", slots_gauge);
        Metrics {
            registry,
            requests,
            prompt_tokens,
            cached_prompt_tokens,
            generated_tokens,
            cancelled,
            time_to_first_token,
            time_per_output_token,
            queue_wait,
            queue_depth,
            busy_slots,
        }
    }

    /// Counts one answered request.
    pub fn count_request(&self, endpoint: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                endpoint: endpoint.to_string(),
                status,
            })
            .inc();
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
