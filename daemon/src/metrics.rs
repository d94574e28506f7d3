//! Prometheus metrics for the whole daemon, served at `GET /metrics`.
//!
//! One registry, created at start and shared by reference; components record into the
//! families they own and never format text themselves.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FunctionLabel {
    pub function: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    pub function: String,
    pub kind: &'static str,
}

type LatencyFamily = Family<FunctionLabel, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 µs .. ~26 s: a no-op call sits at the bottom, a slow classify near the top.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        50e-6, 2.0, 20,
    ))
}

pub struct Metrics {
    registry: Registry,
    pub invocations: Family<FunctionLabel, Counter>,
    pub errors: Family<ErrorLabel, Counter>,
    pub latency: LatencyFamily,
    /// `.wasm` files compiled to native code (an AOT cache miss).
    pub aot_compiles: Counter,
    /// Native code loaded from the AOT cache or a `.cwasm` file.
    pub aot_loads: Counter,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("edgefn");
        let invocations = Family::<FunctionLabel, Counter>::default();
        let errors = Family::<ErrorLabel, Counter>::default();
        let latency = LatencyFamily::new_with_constructor(latency_histogram as fn() -> Histogram);
        let aot_compiles = Counter::default();
        let aot_loads = Counter::default();
        registry.register("invocations", "Function invocations", invocations.clone());
        registry.register(
            "errors",
            "Failed function invocations by kind",
            errors.clone(),
        );
        registry.register(
            "invocation_duration_seconds",
            "Function invocation latency, queueing included",
            latency.clone(),
        );
        registry.register(
            "aot_compiles",
            "Modules compiled to native code",
            aot_compiles.clone(),
        );
        registry.register("aot_loads", "Modules loaded precompiled", aot_loads.clone());
        Metrics {
            registry,
            invocations,
            errors,
            latency,
            aot_compiles,
            aot_loads,
        }
    }

    /// The registry in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
