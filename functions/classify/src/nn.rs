//! The wasi-nn calls classify makes, on the witx ABI (`wasi_ephemeral_nn`), which both
//! wasmtime-wasi-nn and WasmEdge's wasi-nn plugin implement. Each call returns an errno
//! (0 is success) and writes its result through the last pointer. [`sys`] is the raw ABI,
//! public for the test fixture that misuses it on purpose.

pub mod sys {
    /// u8 in WasmEdge's `tensor_type` (f16, f32, u8, ...). wasmtime's newer witx puts f64
    /// before u8; edgefn's host accepts either number for a u8 input, so this works on both.
    pub const TENSOR_U8: u8 = 2;

    /// The witx `tensor` record as laid out in linear memory.
    #[repr(C)]
    pub struct Tensor {
        pub dims: *const u32,
        pub dims_len: u32,
        pub ty: u8,
        pub data: *const u8,
        pub data_len: u32,
    }

    #[link(wasm_import_module = "wasi_ephemeral_nn")]
    extern "C" {
        pub fn load_by_name(name: *const u8, name_len: u32, graph: *mut u32) -> u32;
        pub fn init_execution_context(graph: u32, context: *mut u32) -> u32;
        pub fn set_input(context: u32, index: u32, tensor: *const Tensor) -> u32;
        pub fn compute(context: u32) -> u32;
        pub fn get_output(context: u32, index: u32, out: *mut u8, out_max: u32, written: *mut u32) -> u32;
    }
}

use sys::*;

/// `nn_errno` names, for the one-line error.
fn errno(call: &str, code: u32) -> String {
    const NAMES: [&str; 9] = [
        "success",
        "invalid argument",
        "invalid encoding",
        "missing memory",
        "busy",
        "runtime error",
        "unsupported operation",
        "too large",
        "not found",
    ];
    format!("wasi-nn {call}: {}", NAMES.get(code as usize).unwrap_or(&"unknown error"))
}

fn ok(call: &str, code: u32) -> Result<(), String> {
    if code == 0 {
        Ok(())
    } else {
        Err(errno(call, code))
    }
}

/// Runs model `name` on one u8 input tensor and returns output 0's bytes.
pub fn infer(name: &str, dims: &[u32], input: &[u8], out_max: usize) -> Result<Vec<u8>, String> {
    let (mut graph, mut context, mut written) = (0u32, 0u32, 0u32);
    let tensor = Tensor {
        dims: dims.as_ptr(),
        dims_len: dims.len() as u32,
        ty: TENSOR_U8,
        data: input.as_ptr(),
        data_len: input.len() as u32,
    };
    let mut out = vec![0u8; out_max];
    // SAFETY: every pointer is to live memory of the stated length for the call's duration.
    unsafe {
        ok(&format!("load_by_name({name})"), load_by_name(name.as_ptr(), name.len() as u32, &mut graph))?;
        ok("init_execution_context", init_execution_context(graph, &mut context))?;
        ok("set_input", set_input(context, 0, &tensor))?;
        ok("compute", compute(context))?;
        ok("get_output", get_output(context, 0, out.as_mut_ptr(), out.len() as u32, &mut written))?;
    }
    out.truncate(written as usize);
    Ok(out)
}
