//! The wasi-nn host calls as a guest makes them, with arbitrary arguments: tensors of any type,
//! shape and length, any input or output index, compute at any point, a second context. Runs
//! on the real LiteRT model (`EDGEFN_FUZZ_LITERT`, `EDGEFN_FUZZ_MODEL`), so a host mistake shows
//! as a crash here instead of in a board's daemon.
#![no_main]

use std::sync::{Arc, OnceLock};

use edgefn::config::Config;
use edgefn::metrics::Metrics;
use edgefn::runtime::nn::{Model, Models};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use wasmtime_wasi_nn::backend::Id;
use wasmtime_wasi_nn::wit::TensorType;

#[derive(Arbitrary, Debug)]
enum Op {
    SetInput {
        index: u32,
        ty: u8,
        dims: Vec<u32>,
        data: Vec<u8>,
    },
    /// A well-formed input (the model's own shape), so compute gets reached.
    SetExactInput {
        index: u32,
        byte: u8,
    },
    Compute,
    GetOutput {
        index: u32,
    },
    GetNamedOutput {
        name: String,
    },
    SecondContext,
    Grant {
        name: String,
    },
}

fn model() -> &'static (Models, Arc<Model>) {
    static MODEL: OnceLock<(Models, Arc<Model>)> = OnceLock::new();
    MODEL.get_or_init(|| {
        let lib = std::env::var("EDGEFN_FUZZ_LITERT").unwrap_or("/var/cache/edgefn/litert/amd64/libLiteRt.so".into());
        let path = std::env::var("EDGEFN_FUZZ_MODEL").unwrap_or("/var/cache/edgefn/assets/efficientnet_lite0.tflite".into());
        let cfg = Config::parse(&format!(
            "[runtime]\nlitert = {lib:?}\n\n[models.m]\npath = {path:?}\nencoding = \"tflite\"\nthreads = 1\ncontexts = 1\n"
        ))
        .unwrap();
        let models = Models::load(&cfg, &Metrics::new());
        let m = models.loaded().next().cloned().unwrap_or_else(|| panic!("model not loaded: {:?}", models.failed()));
        (models, m)
    })
}

const TYPES: [TensorType; 7] = [
    TensorType::Fp16,
    TensorType::Fp32,
    TensorType::Fp64,
    TensorType::Bf16,
    TensorType::U8,
    TensorType::I32,
    TensorType::I64,
];

libfuzzer_sys::fuzz_target!(|ops: Vec<Op>| {
    let (models, m) = model();
    let Ok(mut ctx) = m.graph().init_execution_context() else { panic!("the pool lost a context") };
    for op in ops.into_iter().take(16) {
        match op {
            Op::SetInput { index, ty, dims, data } => {
                let dims: Vec<u32> = dims.into_iter().take(8).collect();
                let t = wasmtime_wasi_nn::Tensor::new(dims, TYPES[ty as usize % TYPES.len()], data);
                let _ = ctx.set_input(Id::Index(index), &t);
            }
            Op::SetExactInput { index, byte } => {
                let t = wasmtime_wasi_nn::Tensor::new(vec![1, 224, 224, 3], TensorType::U8, vec![byte; 224 * 224 * 3]);
                let _ = ctx.set_input(Id::Index(index % 2), &t);
            }
            Op::Compute => {
                let _ = ctx.compute();
            }
            Op::GetOutput { index } => {
                let _ = ctx.get_output(Id::Index(index));
            }
            Op::GetNamedOutput { name } => {
                let _ = ctx.get_output(Id::Name(name));
            }
            Op::SecondContext => {
                assert!(m.graph().init_execution_context().is_err(), "a second context from a pool of one");
            }
            Op::Grant { name } => {
                let _ = models.grant(Some(&[name]));
            }
        }
    }
    drop(ctx);
    assert_eq!(m.idle(), 1, "the context did not come back to the pool");
});
