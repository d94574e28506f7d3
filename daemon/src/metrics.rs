//! Prometheus metrics for the whole daemon, served at `GET /metrics`.
//!
//! One registry, created at start and shared by reference; components record into the
//! families they own and never format text themselves.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FunctionLabel {
    pub function: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeploymentLabel {
    pub function: String,
    /// started, committed, rolled_back, refused (pull or signature), failed_to_load.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabel {
    pub function: String,
    /// sha256 of the module serving.
    pub sha256: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    pub function: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabel {
    pub sink: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CameraLabel {
    pub pipeline: String,
    pub camera: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PipelineError {
    pub pipeline: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DaprRequestLabel {
    /// `publish` or `bulk`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model: String,
}

type LatencyFamily = Family<FunctionLabel, Histogram, fn() -> Histogram>;
pub type InferenceFamily = Family<ModelLabel, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 µs .. ~26 s: a no-op call sits at the bottom, a slow classify near the top.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(50e-6, 2.0, 20))
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
    /// Function versions deployed from a registry, by outcome.
    pub deployments: Family<DeploymentLabel, Counter>,
    /// 1 for the version each function serves (an info series).
    pub function_version: Family<VersionLabel, Gauge>,

    /// Frames accepted into a pipeline, per camera.
    pub frames: Family<CameraLabel, Counter>,
    /// Frames dropped by the latest-frame-wins policy, per camera.
    pub drops: Family<CameraLabel, Counter>,
    /// Frames that produced a committed result.
    pub results: Family<CameraLabel, Counter>,
    /// Frames that failed, by kind (function error kinds, `oversized`, `outbox`).
    pub pipeline_errors: Family<PipelineError, Counter>,

    pub outbox_depth: Family<SinkLabel, Gauge>,
    pub outbox_oldest_age: Family<SinkLabel, Gauge<f64, AtomicU64>>,
    pub outbox_delivered: Family<SinkLabel, Counter>,
    pub outbox_retried: Family<SinkLabel, Counter>,
    pub outbox_dead: Family<SinkLabel, Counter>,
    pub outbox_evicted: Family<SinkLabel, Counter>,

    /// 1 while connected to the MQTT broker.
    /// When this process started (Unix seconds): a change is a restart, by the watchdog or not.
    pub start_time: Gauge<f64, AtomicU64>,
    /// 1 while the health loop withholds the watchdog ping (pipelines made no progress).
    pub wedged: Gauge,
    pub mqtt_connected: Gauge,
    pub mqtt_reconnects: Counter,
    /// Frames the broker sent again (DUP set) after a lost connection. If the first copy was
    /// processed and only its acknowledgement was lost, the copy gives a second result.
    pub mqtt_redelivered: Counter,
    /// Frames whose topic no pipeline takes: logged and acknowledged, never silently.
    pub mqtt_unrouted: Counter,
    /// QoS 0 frames dropped because the pipelines were behind (the handoff's byte budget).
    pub mqtt_shed: Counter,
    /// 1 while the Dapr sidecar answers.
    pub dapr_reachable: Gauge,
    /// Publish requests sent to the sidecar, single or bulk.
    pub dapr_requests: Family<DaprRequestLabel, Counter>,

    /// Model files loaded; stays at the number of models until a reload.
    pub model_loads: Family<ModelLabel, Counter>,
    /// Compiled contexts per model: the most inferences that run at once.
    pub model_contexts: Family<ModelLabel, Gauge>,
    /// Time in the model itself (wasi-nn `compute`), per model.
    pub inference: InferenceFamily,
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
        registry.register("errors", "Failed function invocations by kind", errors.clone());
        registry.register(
            "invocation_duration_seconds",
            "Function invocation latency, queueing included",
            latency.clone(),
        );
        registry.register("aot_compiles", "Modules compiled to native code", aot_compiles.clone());
        registry.register("aot_loads", "Modules loaded precompiled", aot_loads.clone());
        let deployments = Family::<DeploymentLabel, Counter>::default();
        registry.register("deployments", "Function versions deployed from a registry, by outcome", deployments.clone());
        let function_version = Family::<VersionLabel, Gauge>::default();
        registry.register("function_version_info", "The module version each function serves", function_version.clone());
        let m = Metrics {
            registry,
            invocations,
            errors,
            latency,
            aot_compiles,
            aot_loads,
            deployments,
            function_version,
            frames: Default::default(),
            drops: Default::default(),
            results: Default::default(),
            pipeline_errors: Default::default(),
            outbox_depth: Default::default(),
            outbox_oldest_age: Default::default(),
            outbox_delivered: Default::default(),
            outbox_retried: Default::default(),
            outbox_dead: Default::default(),
            outbox_evicted: Default::default(),
            start_time: Default::default(),
            wedged: Default::default(),
            mqtt_connected: Default::default(),
            mqtt_reconnects: Default::default(),
            mqtt_redelivered: Default::default(),
            mqtt_unrouted: Default::default(),
            mqtt_shed: Default::default(),
            dapr_reachable: Default::default(),
            dapr_requests: Default::default(),
            model_loads: Default::default(),
            model_contexts: Default::default(),
            inference: InferenceFamily::new_with_constructor(latency_histogram as fn() -> Histogram),
        };
        m.register_rest()
    }

    fn register_rest(mut self) -> Metrics {
        let r = &mut self.registry;
        r.register("frames", "Frames accepted into a pipeline", self.frames.clone());
        r.register("frames_dropped", "Frames dropped by latest-frame-wins", self.drops.clone());
        r.register("results", "Frames whose result is committed to the outbox", self.results.clone());
        r.register("pipeline_errors", "Frames that failed, by kind", self.pipeline_errors.clone());
        r.register("outbox_depth", "Results waiting for their sink", self.outbox_depth.clone());
        r.register("outbox_oldest_age_seconds", "Age of the oldest waiting result", self.outbox_oldest_age.clone());
        r.register("outbox_delivered", "Results delivered", self.outbox_delivered.clone());
        r.register("outbox_retried", "Delivery attempts that will be retried", self.outbox_retried.clone());
        r.register("outbox_dead", "Results moved to the dead letters", self.outbox_dead.clone());
        r.register("outbox_evicted", "Results evicted by the outbox caps", self.outbox_evicted.clone());
        self.start_time.set(process_start());
        r.register("start_time_seconds", "When the process started, in Unix seconds", self.start_time.clone());
        r.register("wedged", "1 while the watchdog ping is withheld: frames wait, none settle", self.wedged.clone());
        r.register("mqtt_connected", "1 while connected to the broker", self.mqtt_connected.clone());
        r.register("mqtt_reconnects", "Broker connections lost", self.mqtt_reconnects.clone());
        r.register(
            "mqtt_redelivered",
            "Frames the broker sent again after a lost connection",
            self.mqtt_redelivered.clone(),
        );
        r.register("mqtt_shed", "QoS 0 frames dropped while the pipelines were behind", self.mqtt_shed.clone());
        r.register(
            "mqtt_unrouted",
            "Frames acknowledged because no pipeline takes their topic",
            self.mqtt_unrouted.clone(),
        );
        r.register("dapr_reachable", "1 while the Dapr sidecar answers", self.dapr_reachable.clone());
        r.register("dapr_requests", "Publish requests sent to the sidecar", self.dapr_requests.clone());
        r.register("model_loads", "Model files loaded", self.model_loads.clone());
        r.register("model_contexts", "Compiled contexts per model", self.model_contexts.clone());
        r.register("inference_duration_seconds", "Time in the model per inference", self.inference.clone());
        self
    }

    // Series that exist at zero from the start. Prometheus's `increase()` cannot see a counter's
    // first event: a series first scraped at 3 has, as far as it knows, always been 3, so an
    // alert on the first dead letters or errors would never fire.

    /// A loaded function's calls, latency and every error kind.
    pub fn declare_function(&self, function: &str, kinds: &[&'static str]) {
        let label = FunctionLabel { function: function.to_string() };
        drop(self.invocations.get_or_create(&label));
        drop(self.latency.get_or_create(&label));
        for &kind in kinds {
            drop(self.errors.get_or_create(&ErrorLabel { function: function.to_string(), kind }));
        }
    }

    /// A pipeline's failures, by every kind it can count.
    pub fn declare_pipeline(&self, pipeline: &str, kinds: impl IntoIterator<Item = &'static str>) {
        for kind in kinds {
            drop(self.pipeline_errors.get_or_create(&PipelineError { pipeline: pipeline.to_string(), kind }));
        }
    }

    /// A configured sink's delivery counters.
    pub fn declare_sink(&self, sink: &str) {
        let label = SinkLabel { sink: sink.to_string() };
        for family in [&self.outbox_delivered, &self.outbox_retried, &self.outbox_dead, &self.outbox_evicted] {
            drop(family.get_or_create(&label));
        }
    }

    /// A camera's frames, drops and results, once it sends its first frame.
    pub fn declare_camera(&self, label: &CameraLabel) {
        for family in [&self.frames, &self.drops, &self.results] {
            drop(family.get_or_create(label));
        }
    }

    /// The registry in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

/// The process's start, read once: each generation's registry reports the same instant.
fn process_start() -> f64 {
    static START: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *START.get_or_init(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
    })
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
