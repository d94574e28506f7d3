//! The HTTP API as a client reaches it: arbitrary bytes on one connection, through hyper, the
//! route table and the handlers, to the `echo` function and a pipeline. Every request gets an
//! answer or a closed connection; nothing panics, nothing hangs past the deadline.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use edgefn::config::Config;
use edgefn::ingress::http::Api;
use edgefn::metrics::Metrics;
use edgefn::pipeline::Pipelines;
use edgefn::runtime::Runtime;
use edgefn::sinks::outbox::Outbox;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct World {
    rt: tokio::runtime::Runtime,
    api: Arc<Api>,
    _dir: tempfile::TempDir,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let fixtures = std::env::var("EDGEFN_FUZZ_FUNCTIONS")
            .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../functions/out/fixtures").to_string());
        let dir = tempfile::tempdir().unwrap();
        let functions = dir.path().join("functions");
        std::fs::create_dir_all(&functions).unwrap();
        std::fs::copy(format!("{fixtures}/echo.wasm"), functions.join("echo.wasm")).expect("echo.wasm (functions/build.sh)");
        let cfg = Config::parse(&format!(
            "[runtime]\nfunctions_dir = {:?}\ncache_dir = {:?}\nstate_dir = {:?}\n\n[outbox]\nmax_bytes = \"16 MiB\"\n\n\
             [[pipeline]]\nname = \"echo\"\nfunctions = [\"echo\"]\n",
            functions,
            dir.path().join("cache"),
            dir.path().join("state"),
        ))
        .unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let metrics = Arc::new(Metrics::new());
        let runtime = Arc::new(Runtime::load(&cfg, metrics.clone(), None, &Default::default()).unwrap());
        let outbox = rt.block_on(async { Outbox::open(&dir.path().join("state/outbox.redb"), &cfg.outbox, metrics.clone()) }).unwrap();
        let pipelines = Pipelines::new(&cfg.pipelines, |_| unreachable!("no sinks"), runtime.clone(), outbox, metrics, Default::default(), "fuzz");
        // Closed from the start, so an event stream ends at once instead of holding the run.
        let (_tx, closing) = tokio::sync::watch::channel(true);
        let fleet = edgefn::fleet::Context::new(
            Arc::new(cfg.clone()),
            runtime.clone(),
            edgefn::fleet::events::nowhere(),
            closing.clone(),
        );
        let api = Arc::new(Api {
            runtime,
            fleet,
            channel: None,
            pipelines: Some(pipelines),
            max_body: 1 << 20,
            bodies: edgefn::ingress::http::bodies_in_flight(1 << 20),
            app_token: None,
            token: None,
            allowed_hosts: Vec::new(),
            notice: Default::default(),
            closing,
            event_streams: Default::default(),
            daemon_problems: Default::default(),
        });
        World { rt, api, _dir: dir }
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let w = world();
    w.rt.block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let conn = tokio::spawn(edgefn::ingress::listener::serve_connection(w.api.clone(), server));
        let data = data.to_vec();
        let talk = async move {
            client.write_all(&data).await.ok();
            client.shutdown().await.ok();
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.ok();
        };
        tokio::time::timeout(Duration::from_secs(5), talk).await.expect("the connection hung");
        conn.abort();
    });
});
